"""Launching the integrations' workers: a fresh port per launch, one more try on a failed launch."""
import pathlib
import socket
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
WORKERS = pathlib.Path(__file__).resolve().parent


def free_port():
    """A port nothing listens on: launches one after another must not meet the last one's port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launched(command, env, cwd=None):
    """Run a launcher; a second try on a fresh port if the first fails (once in some 40 runs a launch
    here failed before training: a port taken between probe and bind, or gloo aborting at exit), with
    both attempts' output in the failure."""
    failures = []
    for _ in range(2):
        env = dict(env, MASTER_PORT=str(free_port()))
        result = subprocess.run([part.replace("{port}", env["MASTER_PORT"]) for part in command], env=env,
                                capture_output=True, text=True, timeout=240, cwd=cwd)
        if result.returncode == 0:
            return result
        failures.append(result.stderr[-3000:])
    pytest.fail("\n---\n".join(failures))

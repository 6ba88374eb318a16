"""The benchmark scripts stay runnable: what they import of autobatch exists, and the GPU check says
plainly when there is no GPU."""
import ast
import importlib
import pathlib
import subprocess
import sys

import pytest
import torch

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.py")))
def test_every_name_a_benchmark_imports_from_autobatch_exists(script):
    for node in ast.walk(ast.parse((BENCH / script).read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("autobatch"):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name) or importlib.util.find_spec(f"{node.module}.{alias.name}"), \
                    f"{script}: {node.module}.{alias.name}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the check would run")
def test_the_gpu_check_says_there_is_no_gpu_and_exits_2():
    result = subprocess.run([sys.executable, str(BENCH / "gpu_check.py")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "no CUDA device here" in result.stderr


@pytest.mark.slow
def test_the_peer_comparison_runs_every_peer_for_real(monkeypatch):
    """bench/peers.py's arms with the installed Accelerate, transformers and Lightning, on two batches (32 and
    64 pixels) under a cap that fits 14 samples of the first and 2 of the second (the whole batch resident)."""
    pytest.importorskip("lightning")
    pytest.importorskip("transformers")
    monkeypatch.syspath_prepend(str(BENCH))
    peers = importlib.import_module("peers")
    monkeypatch.setattr(peers, "W", peers.images("two sizes", [32, 64]), raising=False)
    cap = 6 * 2**20
    assert [peers.true_largest(batch, cap) for batch in peers.W.batches] == [14, 2]
    runs = {name: arm(peers.W.batches, cap) for name, arm in peers.ARMS.items()}
    autobatch_run, accelerate, hugging_face, lightning = runs.values()
    assert (autobatch_run.samples, autobatch_run.events, autobatch_run.effective) == (64, 0, 32)
    assert accelerate.samples == 64 and accelerate.events > 0 and accelerate.lost_steps > 0
    assert hugging_face.samples == 64 and hugging_face.events > 0 and hugging_face.effective < 14
    assert lightning.stopped == "stopped by out of memory" and lightning.chosen == 8 and lightning.samples == 32

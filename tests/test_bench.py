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

"""The distribution builds as torch-autobatch and installs as itself, from the wheel and the sdist."""
import pathlib
import re
import subprocess
import sys
import sysconfig
import tarfile
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    pytest.importorskip("build")
    out = tmp_path_factory.mktemp("dist")
    result = subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return next(out.glob("*.whl")), next(out.glob("*.tar.gz"))


def test_the_wheel_holds_the_package_its_licence_and_type_marker(built):
    wheel, _ = built
    assert wheel.name.startswith("torch_autobatch-")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "autobatch/py.typed" in names and any(n.endswith("licenses/LICENSE") for n in names)
    assert "Name: torch-autobatch" in metadata and "License-Expression: BSD-3-Clause" in metadata
    assert "Provides-Extra: docs" in metadata and not any(n.startswith("tests/") for n in names)


def test_the_package_page_works_on_the_index(built):
    """The index shows the long description away from the repository: every link and image absolute, the
    project's addresses listed, and classifiers a search on the index can use."""
    wheel, _ = built
    with zipfile.ZipFile(wheel) as archive:
        metadata = archive.read(next(n for n in archive.namelist() if n.endswith("METADATA"))).decode()
    headers, description = metadata.split("\n\n", 1)
    assert description.startswith("# torch-autobatch")
    targets = re.findall(r"\]\(([^)\s]+)\)", description)
    assert targets and all(t.startswith("https://") for t in targets), targets
    for label in ("Documentation", "Source", "Issues", "Changelog"):
        assert f"Project-URL: {label}, https://" in headers, label
    for classifier in ("Programming Language :: Python :: 3.11", "Operating System :: OS Independent",
                       "Intended Audience :: Science/Research", "Topic :: Scientific/Engineering"):
        assert f"Classifier: {classifier}" in headers, classifier
    assert "pip install -e" not in description and "pip install torch-autobatch" in description


def test_the_sdist_carries_the_documentation_and_examples(built):
    _, sdist = built
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    for needed in ("LICENSE", "CHANGELOG.md", "mkdocs.yml", "docs/index.md", "docs/assets/plan.png",
                   "examples/train_classifier.py", "autobatch/py.typed", "bench/planner.py",
                   "bench/results/peers.md", "tests/conftest.py", "tests/common.py",
                   "tests/batchnorm/test_precise.py", "tests/integrations/lightning_worker.py"):
        assert needed in names, needed
    assert not [name for name in names if "__pycache__" in name or name.endswith(".pyc")]


def test_the_tests_run_from_the_unpacked_sdist(built, tmp_path):
    """What the sdist ships is enough to run the suite the README gives (its quick part) away from a checkout."""
    _, sdist = built
    with tarfile.open(sdist) as archive:
        archive.extractall(tmp_path, filter="data")
    unpacked = next(tmp_path.iterdir())
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "not slow", "-p", "no:cacheprovider", "-x"],
                            cwd=unpacked, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert re.search(r"\d+ passed", result.stdout)


@pytest.mark.parametrize("which", ["wheel", "sdist"])
def test_each_installs_in_a_fresh_environment_and_trains(built, which, tmp_path):
    # A fresh venv, the package without its dependencies, and this environment's torch and psutil reached
    # through a .pth file: the install itself, not a download of torch, is under test.
    env = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True, timeout=120)
    python = env / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    pathlib.Path(site, "outer.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    artifact = built[0] if which == "wheel" else built[1]
    install = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "-q",
                              str(artifact)], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    code = ("import autobatch, torch, pathlib; assert pathlib.Path(autobatch.__file__).is_relative_to(pathlib.Path("
            f"{site!r})), autobatch.__file__; m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), "
            "torch.nn.Linear(8, 2)); ab = autobatch.wrap(m, torch.optim.SGD(m.parameters(), lr=0.1), 8, "
            "torch.nn.CrossEntropyLoss(), micro_batch=4, cache=False); "
            "print(ab.step(torch.randn(8, 4), torch.randint(0, 2, (8,))), autobatch.__version__)")
    result = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-1] == __import__("autobatch").__version__

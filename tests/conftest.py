import pytest


@pytest.fixture(autouse=True)
def private_plan_cache(tmp_path, monkeypatch):
    """Plans measured by tests go to a fresh directory, never the user's cache."""
    monkeypatch.setenv("AUTOBATCH_CACHE_DIR", str(tmp_path / "autobatch-cache"))
    return tmp_path / "autobatch-cache"

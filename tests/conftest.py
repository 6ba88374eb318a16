import signal

import pytest

# The Ctrl-C tests raise SIGINT in this process and expect Python's KeyboardInterrupt. A shell that starts a
# job in the background without job control starts it with SIGINT ignored, and Python then installs no
# handler: give the suite Python's own, wherever it was started from.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def private_plan_cache(tmp_path, monkeypatch):
    """Plans measured by tests go to a fresh directory, never the user's cache."""
    monkeypatch.setenv("AUTOBATCH_CACHE_DIR", str(tmp_path / "autobatch-cache"))
    return tmp_path / "autobatch-cache"

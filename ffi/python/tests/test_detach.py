"""An engine that gave up on operations the daemon never answered keeps their requests'
blocks only until the daemon is done with its pages: the session begins to detach, and
once the daemon has ended it (closed its end of the connection) the blocks are released.
Before, such requests kept their blocks for as long as the engine ran."""
import signal
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "ffi" / "python"))
sys.path.insert(0, str(ROOT / "tests" / "vllm"))

import kvplane  # noqa: E402
from kvplane import pages  # noqa: E402


class FakeSession:
    """What DirectPages asks of a session when it gives up on it."""

    def __init__(self, refuse=False):
        self.refuse = refuse
        self.detaching = self.closed = self.done = False

    def begin_detach(self):
        if self.refuse:
            raise kvplane.KvplaneError("begin_detach: connection gone")
        self.detaching = True

    def daemon_done(self):
        return self.done

    def close(self):
        self.closed = True


def direct_pages():
    layout = SimpleNamespace(num_layers=1, kv_planes=2, page_tokens=16, kv_heads=1, head_bytes=128)
    stats = SimpleNamespace(save_failed_blocks=0)
    return pages.DirectPages(SimpleNamespace(layout=layout, device="cpu"), stats), stats


def test_unanswered_ops_hold_their_requests_until_the_daemon_is_done():
    d, stats = direct_pages()
    d._track(1, "save", "req-a", 4)
    d._track(2, "load", "req-b", 2)
    old = FakeSession()
    d.release_all(old)
    assert old.detaching and not old.closed
    assert d.per_request == {"req-a": 1, "req-b": 1}
    assert stats.save_failed_blocks == 4
    # A new session's op counts on top.
    d._track(3, "save", "req-c", 1)
    assert d.reap_detached() == 0
    assert d.per_request == {"req-a": 1, "req-b": 1, "req-c": 1}
    old.done = True
    assert d.reap_detached() == 1
    assert old.closed and not d.detaching
    assert d.per_request == {"req-c": 1}, "released once the daemon was done"


def test_a_session_that_cannot_detach_keeps_its_requests_blocks():
    d, _ = direct_pages()
    d._track(1, "save", "req-a", 1)
    s = FakeSession(refuse=True)
    d.release_all(s)
    assert s.closed and not d.detaching
    assert d.per_request == {"req-a": 1}
    assert d.reap_detached() == 0
    assert d.per_request == {"req-a": 1}, "never released: when the daemon is done is unknown"


def test_a_session_the_daemon_already_closed_keeps_nothing():
    d, _ = direct_pages()
    d._track(1, "save", "req-a", 1)
    s = FakeSession(refuse=True)
    s.done = True  # shutting down a connection the daemon closed may fail; it is done
    d.release_all(s)
    assert s.closed and not d.detaching and d.per_request == {}


def test_a_preemption_waits_until_the_daemon_has_ended_the_sessions_given_up_on():
    """The connector's wait before a forward pass that may write freed blocks: a request
    with an unanswered op in a detaching session must not have its pages reused before
    the daemon is done."""
    pytest.importorskip("vllm")  # installed by scripts/test-vllm.sh, which runs this file
    import threading

    from kvplane import vllm as connector

    d, _ = direct_pages()
    d._track(1, "load", "req-a", 1)
    s = FakeSession()
    d.release_all(s)
    c = object.__new__(connector.KvplaneConnector)
    c._direct, c._session, c._timeout_ms = d, None, 50
    c.stats = connector._Stats()
    threading.Timer(0.3, lambda: setattr(s, "done", True)).start()
    t0 = time.monotonic()
    c.handle_preemptions(connector.KvplaneMetadata(preempted=["req-a"]))
    assert time.monotonic() - t0 >= 0.25, "returned before the daemon was done"
    assert s.closed and not d.detaching and d.per_request == {}
    assert c.stats.detached_late == 1


def test_ops_answered_or_ended_by_the_daemon_keep_nothing():
    d, _ = direct_pages()
    d._track(1, "save", "req-a", 1)
    d.release_all(None)
    assert d.per_request == {} and not d.detaching
    s = FakeSession()
    d.release_all(s)  # no op left: the session is simply closed
    assert s.closed and not s.detaching


def test_a_detaching_client_is_done_once_the_daemon_has_ended_its_session(tmp_path):
    """libkvplane's begin_detach / daemon_done against a real `kvplane serve`, stopped
    (SIGSTOP: alive, answering nothing) while the engine gives up on it."""
    from daemon import Daemon  # tests/vllm/daemon.py: `kvplane serve`, host tier

    daemon = Daemon(tmp_path, block_bytes=4096)
    try:
        client = kvplane.Client(daemon.socket, namespaces=["detach"])
        first = client.session_id
        daemon.proc.send_signal(signal.SIGSTOP)
        try:
            client.begin_detach()
            time.sleep(0.3)
            assert not client.daemon_done(), "a stopped daemon cannot have ended the session"
        finally:
            daemon.proc.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + 10
        while not client.daemon_done():
            assert time.monotonic() < deadline, "the daemon never closed its end"
            time.sleep(0.01)
        client.close()
        # The daemon serves the next engine.
        again = kvplane.Client(daemon.socket, namespaces=["detach"])
        assert again.session_id != first
        again.close()
    finally:
        daemon.stop()

"""`kvplane serve` (the repository's binary) for the Python tests: a host tier of 128 MiB
with `block_bytes` blocks, no control server."""
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def kvplane_bin():
    for profile in ("debug", "release"):
        p = ROOT / "target" / profile / "kvplane"
        if p.exists():
            return p
    pytest.fail("target/*/kvplane not built (cargo build -p kvplane)")


class Daemon:
    def __init__(self, work, block_bytes):
        self.socket = work / "kvplane.sock"
        cfg = work / "kvplane.toml"
        cfg.write_text(
            f"[blocks]\nblock_bytes = {block_bytes}\n"
            "[tiers.host]\ncapacity_bytes = 134217728\nlock = false\nhugepages = \"never\"\n"
            "touch_threads = 1\n[control]\nmetrics_addr = \"\"\n")
        self.log = work / "daemon.log"
        self.proc = subprocess.Popen(
            [str(kvplane_bin()), "serve", "--config", str(cfg), "--socket", str(self.socket)],
            stdout=subprocess.DEVNULL, stderr=open(self.log, "w"))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"kvplane serve exited:\n{self.log.read_text()}"
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(self.socket))
                return
            except OSError:
                time.sleep(0.05)
        pytest.fail(f"kvplane serve did not listen:\n{self.log.read_text()}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait()

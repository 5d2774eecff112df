"""The dashboard as a process: in a real pseudo-terminal (draws, `d` detaches), and served over
HTTP by `qlora-watch serve`. (In-process Pilot tests: tests/tui/.)"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.support import FIXTURES, ROOT


def test_real_terminal_detach(tmp_path: Path) -> None:
    """In a real pty: the dashboard draws, `d` leaves it, the process says "detached"."""
    pexpect = pytest.importorskip("pexpect")
    code = (
        "from supervisor.tui.app import make_app; from supervisor.tui.replay import ReplayClient; "
        f"print('RESULT', make_app(ReplayClient({str(FIXTURES / 'recorded_run_training.json')!r})).run())"
    )
    env = {
        "PATH": "/usr/bin:/bin",
        "TERM": "xterm-256color",
        "PYTHONPATH": str(ROOT),
        "HOME": str(ROOT),
    }
    child = pexpect.spawn(
        sys.executable, ["-c", code], dimensions=(24, 80), env=env, timeout=30, cwd=ROOT
    )
    try:
        child.expect("TRAINING")
        child.expect("amber-falcon")
        child.send("d")
        child.expect("RESULT detached")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_serve_starts_and_stops() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = f"from supervisor.tui.serve import serve; serve(['true'], {port})"
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        url = proc.stdout.readline().split(" at ")[-1].strip()  # the URL with its token, printed once
        deadline, page = time.monotonic() + 30, ""
        while time.monotonic() < deadline and not page:
            try:
                page = urllib.request.urlopen(url, timeout=2).read().decode()
            except OSError:
                time.sleep(0.2)
        assert "qlora-watch" in page
    finally:
        proc.terminate()
        proc.wait(timeout=10)

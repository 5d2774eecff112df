"""RELIABILITY_PLAN E: log and metric parsing, and the readers fuzzed with random bytes.

E6 (divergence) is tests/e2e/test_relaunch.py::test_nan_stops_the_run_as_diverged; the socket
decoder's fuzzing is in tests/unit/test_protocol.py (see docs/reliability.md).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from pathlib import Path

import psutil
import pytest

from tests.support import (
    EVIL,
    ROOT,
    create_run,
    fake_recipe,
    read_state,
    reap,
    run_dir,
    spawn_patched,
    start,
    wait_end,
    wait_for,
)

pytestmark = pytest.mark.timeout(90)



# ------------------------------------------------------------------------------ E1 E2


def test_e1_e2_garbage_output_end_to_end(qlw_home: Path, tmp_path: Path) -> None:
    """Binary bytes, invalid UTF-8, NUL, ANSI/OSC escapes, a 10 MB line with no newline and a
    1000-frame tqdm \\r stream: no crash, one capped line, bounded log, metrics still parse."""
    recipe = fake_recipe(tmp_path, ["--steps", "20", "--step-time", "0.02", "--save-every", "10", "--garbage"])
    run_id = start(recipe)
    assert wait_end(run_id, 60) == 0
    run = run_dir(qlw_home, run_id)
    log = (run / "trainer.log").read_bytes()
    assert len(log) < 1_000_000  # the 10 MB line cost 64 KiB, not 10 MB
    assert log.count(b"[line truncated]") == 1
    assert log.count(b"progress 1%") == 1000  # \r splits frames
    text = log.decode("utf-8")  # valid UTF-8 now: \xff became U+FFFD
    assert "\ufffd" in text and "fake trainer: training from step 0" in text
    exit_info = json.loads((run / "attempts" / "1" / "exit.json").read_text())
    assert exit_info["truncated_lines"] == 1
    st_ = read_state(qlw_home, run_id)
    assert st_["step"] == 20 and st_["state"] == "completed"
    import sqlite3

    db = sqlite3.connect(run / "db.sqlite")
    assert db.execute("SELECT COUNT(*) FROM steps").fetchone()[0] == 20  # "garbage" step skipped


# ------------------------------------------------------------------------------ E3


def test_e3_dashboard_renders_escapes_as_inert_text() -> None:
    """The log panel of the real app, fed escape sequences over the live protocol: what it
    paints contains no control character."""
    from textual.app import App, ComposeResult

    from supervisor.tui.logview import LogTail
    from supervisor.tui.model import RunModel

    model = RunModel()
    model.apply({"type": "log", "lines": EVIL})

    class One(App[None]):
        def compose(self) -> ComposeResult:
            yield LogTail(model, max_lines=100)

    async def run() -> list[str]:
        app = One()
        async with app.run_test(size=(100, 20)) as pilot:
            tail = app.query_one(LogTail)
            tail.update_from()
            await pilot.pause()
            return [strip.text for strip in tail.lines]

    painted = asyncio.run(run())
    assert any("clipboard" in x for x in painted) and any("clear" in x for x in painted)
    for x in painted:
        assert not any(ord(ch) < 32 or 0x7F <= ord(ch) <= 0x9F for ch in x), repr(x)


def test_e3_cli_logs_and_status_do_not_pass_escapes_to_the_terminal(qlw_home: Path, tmp_path: Path) -> None:
    """`qlora-watch logs` and `status` in a real pty (pexpect): the trainer's escapes arrive
    as text, so the terminal's clipboard, title and screen are untouched."""
    import pexpect

    recipe = fake_recipe(tmp_path, ["--steps", "3", "--garbage", "--crash-at", "2"])
    run_id = start(recipe, "--set", "guards.crash.max_restarts=0")
    assert wait_end(run_id, 60) == 1  # FAILED: the message quotes the trainer's last lines
    for args in (["logs", run_id, "-n", "2000"], ["status", run_id]):
        child = pexpect.spawn(os.sys.executable, ["-m", "supervisor", *args], cwd=str(tmp_path.parents[0]),
                              env={**os.environ, "PYTHONPATH": str(ROOT)},
                              timeout=30, encoding=None)
        out = child.read()
        child.close()
        assert child.exitstatus == 0, out[-500:]
        assert b"\x1b]52" not in out and b"\x1b]0;" not in out and b"\x1b[2J" not in out, args
        assert b"\x9b" not in out and b"\x07" not in out


# ------------------------------------------------------------------------------ E4 E5


# ------------------------------------------------------------------------------ E7


def test_e7_flood_and_a_client_that_never_reads(proc_guard, tmp_path: Path) -> None:
    """The trainer prints 40 MB as fast as it can while a client attaches and never reads: the
    trainer is not blocked, the supervisor answers pings, the stalled client is dropped, and
    the supervisor's CPU stays under one core."""
    from supervisor import paths
    from supervisor import protocol as proto
    from supervisor.control.client import request

    recipe = fake_recipe(tmp_path, ["--steps", "200", "--step-time", "0.01", "--flood-mb", "40"])
    store = create_run(recipe, "supervisor.log_max_bytes=8000000", "supervisor.log_backups=1")
    sup = spawn_patched(store, {"server_limits": {"queue_messages": 200, "queue_bytes": 1 << 20}})
    sock_path = paths.socket_path(store.run_id)
    wait_for(sock_path.exists, what="socket")
    lazy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lazy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    lazy.connect(str(sock_path))
    lazy.sendall(proto.encode(proto.attach()))
    cpu0 = psutil.Process(sup.pid).cpu_times()
    t0 = time.monotonic()
    pings = []
    while read_state(proc_guard.home, store.run_id).get("state") not in ("completed", "failed"):
        p0 = time.monotonic()
        assert request(sock_path, "ping", timeout=10)["pong"]
        pings.append(time.monotonic() - p0)
        assert time.monotonic() - t0 < 60, "the flood blocked the trainer"
        time.sleep(0.2)
    wall = time.monotonic() - t0
    cpu1 = psutil.Process(sup.pid).cpu_times()
    assert read_state(proc_guard.home, store.run_id)["state"] == "completed"
    cpu = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
    assert cpu < 0.9 * wall + 1.0, (cpu, wall)
    assert max(pings) < 5.0, pings
    log = (store.path / "supervisor.log").read_text()
    assert "dropping slow client" in log
    lazy.setblocking(True)
    lazy.settimeout(10)
    got = b""
    try:
        while chunk := lazy.recv(1 << 20):
            got += chunk
    except OSError:
        pass
    lazy.close()  # the server closed it: EOF (after what had fit in the buffers)
    reap(sup)

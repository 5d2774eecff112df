"""RELIABILITY_PLAN E: log and metric parsing, and the readers fuzzed with random bytes.

E6 (divergence) is tests/test_relaunch.py::test_nan_stops_the_run_as_diverged; the socket
decoder's fuzzing is in tests/test_protocol.py (see docs/reliability.md).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import socket
import time
from pathlib import Path

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import fake_recipe, read_state, wait_for
from tests.rel_helpers import (
    create_run,
    reap,
    run_dir,
    spawn_patched,
    start,
    wait_end,
)

pytestmark = pytest.mark.timeout(90)

EVIL = [
    "\x1b]52;c;cHduZWQ=\x07clipboard",  # OSC 52: write the user's clipboard
    "\x1b]0;owned title\x07title",  # OSC 0: window title
    "\x1b[2J\x1b[Hclear",  # clear the screen, cursor home
    "\x9b31mc1-csi\x9d0;x\x9c",  # 8-bit C1 CSI and OSC
    "bell\x07 backspace\x08 nul\x00 del\x7f",
    "\x1bP1$qm\x1b\\dcs",  # DCS request
]


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


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.binary(max_size=300), st.sampled_from([b"\n", b"\r", b"\r\n", b"x" * 70000])),
                max_size=30))
def test_e1_line_splitter_is_bounded_and_loses_no_short_line(chunks: list[bytes]) -> None:
    from supervisor.wrapper import MAX_LINE, TRUNCATED, LineSplitter

    s = LineSplitter()
    out: list[bytes] = []
    for c in chunks:
        out += s.feed(c)
        assert len(s.buf) <= MAX_LINE
    out += s.flush()
    assert all(len(x) <= MAX_LINE + len(TRUNCATED) for x in out)
    assert all(b"\n" not in x and b"\r" not in x for x in out)
    data = b"".join(chunks)
    if max((len(p) for p in data.replace(b"\r", b"\n").split(b"\n")), default=0) <= MAX_LINE:
        assert out == [p for p in data.replace(b"\r", b"\n").split(b"\n") if p]
        assert s.truncated == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=2000), max_size=15), st.booleans())
def test_e2_followers_survive_random_bytes(tmp_path_factory, chunks: list[bytes], truncate: bool) -> None:
    """JsonlFollower and LogFollower fed random bytes (and a truncation): only dicts and
    strings come out, never an exception; a fragment is never parsed."""
    from supervisor.daemon.followers import MAX_LINE, JsonlFollower, LogFollower

    d = tmp_path_factory.mktemp("f")
    path = d / "f.log"
    path.write_bytes(b"")
    jf, lf = JsonlFollower(path), LogFollower(path)
    for i, c in enumerate(chunks):
        with open(path, "ab") as f:
            f.write(c)
        if truncate and i == len(chunks) // 2:
            os.truncate(path, 0)
        assert all(isinstance(o, dict) for o in jf.read())
        assert all(isinstance(x, str) for x in lf.read())
        assert len(jf.buf) <= MAX_LINE + 2000 and len(lf.buf) <= MAX_LINE + 2000


# ------------------------------------------------------------------------------ E3


@pytest.mark.parametrize("line", EVIL)
def test_e3_sanitize_leaves_inert_text(line: str) -> None:
    from supervisor.sanitize import sanitize

    out = sanitize(line)
    assert not any(ord(ch) < 32 or 0x7F <= ord(ch) <= 0x9F for ch in out), repr(out)
    assert "52;" not in out and "owned title" not in out  # OSC payloads gone, not just ESC


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
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
                              timeout=30, encoding=None)
        out = child.read()
        child.close()
        assert child.exitstatus == 0, out[-500:]
        assert b"\x1b]52" not in out and b"\x1b]0;" not in out and b"\x1b[2J" not in out, args
        assert b"\x9b" not in out and b"\x07" not in out


# ------------------------------------------------------------------------------ E4 E5


def test_e4_metrics_line_cut_mid_write(tmp_path: Path) -> None:
    from supervisor.daemon.followers import JsonlFollower

    p = tmp_path / "events.jsonl"
    p.write_bytes(b'{"event": "step", "step": 11}\n{"event": "step", "step": 12, "lo')
    f = JsonlFollower(p)
    assert [o["step"] for o in f.read()] == [11]  # the fragment is buffered, not parsed
    assert f.read() == [] and f.bad_records == 0
    with open(p, "ab") as fh:
        fh.write(b'ss": 1.5}\n')
    assert f.read() == [{"event": "step", "step": 12, "loss": 1.5}]
    # A writer killed mid-line, then a new writer appending: one bad record, then clean.
    with open(p, "ab") as fh:
        fh.write(b'{"event": "step", "step": 13, "lo')
        fh.write(b'{"event": "step", "step": 13}\n{"event": "step", "step": 14}\n')
    assert [o["step"] for o in f.read()] == [14] and f.bad_records == 1


def test_e5_bad_values_are_skipped_or_blanked(tmp_path: Path) -> None:
    from supervisor.records import Step
    from supervisor.store import RunStore, continuous

    assert Step.from_trainer({"step": "garbage"}, 1) is None
    assert Step.from_trainer({}, 1) is None and Step.from_trainer({"step": None}, 1) is None
    s = Step.from_trainer({"step": 5, "loss": "NaN", "grad_norm": "Infinity", "lr": "fast", "epoch": 1e400,
                           "tokens": float("nan"), "max_steps": "1e400", "t": "yesterday"}, 2)
    assert s.step == 5 and math.isnan(s.loss) and math.isinf(s.grad_norm) and s.lr is None
    assert s.tokens is None and s.max_steps is None and s.t > 1e9
    store = RunStore(tmp_path)
    store.add_steps([Step(t=1.0, step=7, attempt=1, loss=2.0)], lineage=1)
    store.add_steps([Step(t=2.0, step=7, attempt=2, loss=1.5), Step(t=3.0, step=8, attempt=2, loss=float("nan"))],
                    lineage=1)  # the same step again after a resume: both attempts' rows kept
    rows = store.steps()
    assert [(r["step"], r["attempt"], r["loss"]) for r in rows[:2]] == [(7, 1, 2.0), (7, 2, 1.5)]
    line = continuous(rows)  # what charts draw: the later attempt's step 7 replaces the earlier
    assert [(r["step"], r["attempt"], r["loss"]) for r in line[:1]] == [(7, 2, 1.5)]
    assert math.isnan(rows[2]["loss"])  # NaN kept (the divergence guard counts it)


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

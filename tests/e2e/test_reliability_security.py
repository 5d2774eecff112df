"""RELIABILITY_PLAN H (socket, client, secrets) and the security checklist, against a REAL
running supervisor. Server-level tests with a test server are in tests/e2e/test_server.py (H1/H2
modes and SO_PEERCRED, H4 stale/live sockets, H5 long paths, H6 protocol abuse) and the
decoder fuzzing in tests/unit/test_protocol.py; see docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import stat
import uuid
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.support import (
    AWS,
    HF,
    HUB,
    WANDB,
    fake_recipe,
    launches,
    qlw,
    read_state,
    run_dir,
    start,
    stop_now,
    supervisor_pid,
    trainer_pid,
    wait_end,
    wait_for,
    wait_step,
)

pytestmark = pytest.mark.timeout(90)



# ------------------------------------------------------------------------------ H1 H2


def _nobody_connect(path: Path) -> dict[str, Any]:
    from tests.support import Raw, as_nobody

    def attempt() -> dict[str, Any]:
        try:
            raw = Raw(path, timeout=5)
        except PermissionError:
            return {"result": "EACCES"}
        return {"result": "connected", "messages": raw.until_closed()}

    return as_nobody(attempt)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop privileges in a child")
def test_h1_h2_real_supervisor_socket_modes_and_peer_check(shared_home: Path, tmp_path: Path) -> None:
    """The live supervisor's socket: 0600 in a 0700 dir owned by us; uid 65534 gets EACCES; with
    the modes loosened to 0777 it connects but SO_PEERCRED refuses it, and the refusal is
    logged with its pid and uid; the supervisor and the run are unaffected."""
    from supervisor import paths
    from supervisor.control.client import request

    recipe = fake_recipe(tmp_path, ["--steps", "100000", "--step-time", "0.03"])
    run_id = start(recipe)
    wait_step(shared_home, run_id, 2)
    sock = paths.socket_path(run_id)
    st_sock, st_dir = os.lstat(sock), os.lstat(sock.parent)
    assert stat.S_ISSOCK(st_sock.st_mode) and stat.S_IMODE(st_sock.st_mode) == 0o600
    assert stat.S_IMODE(st_dir.st_mode) == 0o700 and st_dir.st_uid == os.geteuid()
    assert _nobody_connect(sock) == {"result": "EACCES"}
    sock.parent.chmod(0o777)
    sock.chmod(0o777)
    got = _nobody_connect(sock)
    assert got["result"] == "connected" and got["messages"][-1]["type"] == "bye"
    assert "permission denied" in got["messages"][-1]["reason"]
    log = (run_dir(shared_home, run_id) / "supervisor.log").read_text()
    assert re.search(r"refused peer pid \d+ uid 65534", log)
    assert request(sock, "ping")["pong"] and read_state(shared_home, run_id)["state"] in ("training", "saving")
    sock.parent.chmod(0o700)
    stop_now(run_id)


# ------------------------------------------------------------------------------ H3


def test_h3_no_inet_listener_and_no_abstract_socket(qlw_home: Path, tmp_path: Path) -> None:
    from supervisor import paths
    from supervisor.control.client import request
    from tests.support import own_socket_inodes

    recipe = fake_recipe(tmp_path, ["--steps", "100000", "--step-time", "0.03"])
    run_id = start(recipe)
    wait_step(qlw_home, run_id, 2)
    sock = paths.socket_path(run_id)
    assert request(sock, "ping")["pong"]  # a connection served as well as the listener
    procs = [psutil.Process(supervisor_pid(qlw_home, run_id))]
    procs += [psutil.Process(trainer_pid(qlw_home, run_id))]
    for p in procs:
        assert p.net_connections("inet") == [], p
    inodes = own_socket_inodes(procs[0].pid)
    names = {}
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            parts = line.split()
            if int(parts[6]) in inodes:
                names[int(parts[6])] = parts[7] if len(parts) > 7 else ""
    assert str(sock) in names.values()
    assert not [n for n in names.values() if n.startswith("@")]
    stop_now(run_id)


# ------------------------------------------------------------------------------ G5 / launch


def test_g5_shell_metacharacters_in_argv_arrive_literally(qlw_home: Path, tmp_path: Path) -> None:
    """argv elements full of shell syntax reach the trainer byte for byte; nothing runs them."""
    tag = uuid.uuid4().hex[:12]
    pwned = [Path(f"/tmp/pwned-{tag}-{i}") for i in range(5)]
    evil = [f"$(touch {pwned[0]})", f"; touch {pwned[1]}", f"`touch {pwned[2]}`",
            f"| touch {pwned[3]}", f"&& touch {pwned[4]} #", "$HOME", "~", "*", "'\"\\"]
    rec = tmp_path / "rec.jsonl"
    recipe = fake_recipe(tmp_path, ["--steps", "3", "--record", str(rec), *evil])
    run_id = start(recipe)
    assert wait_end(run_id, 30) == 0
    (got,) = launches(rec)
    assert got["argv"][-len(evil):] == evil
    assert not [p for p in pwned if p.exists()]


def test_launch_hygiene_session_stdin_fds_no_shell(qlw_home: Path, tmp_path: Path) -> None:
    """The trainer runs in its own session under the exit-file wrapper (a Python process, not a
    shell), stdin is /dev/null, and it inherits no descriptor but 0, 1, 2."""
    recipe = fake_recipe(tmp_path, ["--steps", "100000", "--step-time", "0.03"])
    run_id = start(recipe)
    wait_step(qlw_home, run_id, 2)
    pid = trainer_pid(qlw_home, run_id)
    t = psutil.Process(pid)
    wrapper = t.parent()
    assert "supervisor.wrapper" in wrapper.cmdline() and not any(
        Path(x).name in ("sh", "bash", "dash") for x in wrapper.cmdline()[:1])
    assert os.getsid(pid) == wrapper.pid == os.getpgid(pid)  # its own session and group
    assert os.getsid(supervisor_pid(qlw_home, run_id)) != os.getsid(pid)
    assert os.readlink(f"/proc/{pid}/fd/0") == "/dev/null"
    fds = sorted(int(x) for x in os.listdir(f"/proc/{pid}/fd"))
    assert fds[:3] == [0, 1, 2] and len(fds) <= 4, fds  # (+ a transient open of events.jsonl)
    assert os.readlink(f"/proc/{wrapper.pid}/fd/0") == "/dev/null"
    stop_now(run_id)


def test_running_as_root_is_said(qlw_home: Path, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("only as root")
    recipe = fake_recipe(tmp_path, ["--steps", "2"])
    res = qlw("start", str(recipe), "--detach", "--force")
    assert res.returncode == 0 and "running as root" in res.stderr
    assert wait_end(res.stdout.split()[-1], 30) == 0


# ------------------------------------------------------------------------------ file modes


def test_file_modes_run_folder_0700_files_0600(qlw_home: Path, tmp_path: Path) -> None:
    """Every folder the run creates is 0700 and every file 0600 (no group or other bits):
    run folder, state, logs, database, attempts, socket dir, output dir and checkpoints."""
    from supervisor import paths

    recipe = fake_recipe(tmp_path, ["--steps", "12", "--step-time", "0.03", "--save-every", "5",
                                    "--crash-at", "8", "--once-file", str(tmp_path / "once")])
    run_id = start(recipe, "--set", "supervisor.log_max_bytes=4096")
    sock_dir = paths.socket_path(run_id).parent
    wait_for(sock_dir.exists, what="socket dir")
    assert stat.S_IMODE(os.lstat(sock_dir).st_mode) == 0o700
    assert wait_end(run_id, 60) == 0
    bad = []
    for root in (run_dir(qlw_home, run_id), tmp_path / "out"):
        for dirpath, _dirnames, filenames in os.walk(root):
            for name in [dirpath] + [os.path.join(dirpath, f) for f in filenames]:
                st = os.lstat(name)
                if stat.S_ISLNK(st.st_mode):
                    continue
                if stat.S_IMODE(st.st_mode) & 0o077:
                    bad.append(f"{oct(stat.S_IMODE(st.st_mode))} {name}")
    assert not bad, bad
    assert stat.S_IMODE(os.stat(run_dir(qlw_home, run_id)).st_mode) == 0o700
    for name in ("state.json", "trainer.log", "db.sqlite", "supervisor.log", "recipe.toml", "run.json"):
        assert stat.S_IMODE(os.stat(run_dir(qlw_home, run_id) / name).st_mode) == 0o600, name


# ------------------------------------------------------------------------------ H7


def _secrets_in(text: str) -> list[str]:
    return [s for s in (HF, WANDB, HUB, AWS) if s in text]


def test_h7_tokens_are_redacted_everywhere(qlw_home: Path, tmp_path: Path, monkeypatch) -> None:
    """HF_TOKEN, WANDB_API_KEY and an AWS key in the trainer's environment, --hub_token on its
    command line, all printed by the trainer (--print-env): none reaches the trainer log, the
    supervisor's log, state.json, the events (messages and evidence), `status --json`,
    `logs`, the exit file (the crash report), or what a dashboard receives."""
    from supervisor import paths
    from supervisor.control.client import request

    monkeypatch.setenv("HF_TOKEN", HF)
    monkeypatch.setenv("WANDB_API_KEY", WANDB)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", AWS)
    recipe = fake_recipe(tmp_path, [f"--hub_token={HUB}", "--steps", "100000", "--step-time", "0.03",
                                    "--print-env", "--crash-at", "30", "--once-file", str(tmp_path / "once")])
    run_id = start(recipe)
    wait_for(lambda: (read_state(qlw_home, run_id).get("attempt") or 0) >= 2, timeout=40,
             what="the relaunch after a crash")
    wait_step(qlw_home, run_id, 35)
    run = run_dir(qlw_home, run_id)
    log = (run / "trainer.log").read_text()
    assert "HF_TOKEN=***" in log and "WANDB_API_KEY=***" in log and "--hub_token=***" in log
    sock = paths.socket_path(run_id)
    live = json.dumps(request(sock, "status"))
    snap = json.dumps(__import__("asyncio").run(_snapshot(sock)))
    outputs = {
        "trainer.log": log,
        "supervisor.log": (run / "supervisor.log").read_text(),
        "supervisor.out": (run / "supervisor.out").read_text(),
        "state.json": (run / "state.json").read_text(),
        "exit.json": (run / "attempts" / "1" / "exit.json").read_text(),
        "status --json": qlw("status", run_id, "--json", check=True).stdout,
        "status": qlw("status", run_id, check=True).stdout,
        "logs": qlw("logs", run_id, "-n", "5000", check=True).stdout,
        "socket status": live,
        "dashboard snapshot": snap,
    }
    db = sqlite3.connect(run / "db.sqlite")
    outputs["events"] = json.dumps(db.execute("SELECT message, evidence FROM events").fetchall())
    db.close()
    stop_now(run_id)
    leaks = {k: _secrets_in(v) for k, v in outputs.items() if _secrets_in(v)}
    assert not leaks, leaks


async def _snapshot(sock: Path) -> dict[str, Any]:
    from supervisor.control.client import AsyncRunClient

    c = AsyncRunClient(sock)
    snap = await c.connect()
    await c.close()
    return snap


# ------------------------------------------------------------------------------ deletion


MOUNTED_CHECKPOINT = r"""
import json, os, sys
from pathlib import Path
from supervisor.checkpoints.folders import safe_delete
mnt = Path(sys.argv[0]).parent / "checkpoint-3"
(mnt / "precious").write_text("on another filesystem")
(r,) = safe_delete(mnt.parent, ["checkpoint-3"], None)
print(json.dumps({"deleted": r.deleted, "error": r.error, "left": os.listdir(mnt)}))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root and unshare")
def test_deletion_never_crosses_a_mount_point(tmp_path: Path) -> None:
    """A checkpoint-N that is a mount point (another st_dev than the output dir) is refused."""
    from tests.support import run_in_tmpfs

    (tmp_path / "out").mkdir()
    got = run_in_tmpfs(tmp_path / "out" / "checkpoint-3", "1m", MOUNTED_CHECKPOINT)
    assert got == {"deleted": False, "error": "EXDEV on another filesystem (mount point?): checkpoint-3",
                   "left": ["precious"]}

"""RELIABILITY_PLAN A: process lifecycle and signals, with real processes.

Rows already covered elsewhere (see docs/reliability.md): A1, A2 (tests/e2e/test_supervisor.py,
tests/e2e/test_relaunch.py), A9 adoption, A10, A11, A13 (tests/e2e/test_supervisor.py).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.support import (
    create_run,
    events,
    fake_recipe,
    kill_run_processes,
    kinds,
    launches,
    qlw,
    read_state,
    reap,
    run_dir,
    run_processes,
    spawn_patched,
    start,
    stop_now,
    supervisor_pid,
    trainer_pid,
    wait_end,
    wait_for,
    wait_state,
    wait_step,
)

pytestmark = pytest.mark.timeout(90)


def test_a3_crash_after_progress_resets_the_restart_budget(qlw_home: Path, tmp_path: Path) -> None:
    """Five crashes, each after a new complete checkpoint: more than max_restarts (3), no FAILED."""
    rec = tmp_path / "rec.jsonl"
    recipe = fake_recipe(tmp_path, ["--steps", "30", "--step-time", "0.02", "--save-every", "5",
                                    "--crash-after", "6", "--record", str(rec)])
    run_id = start(recipe)
    assert wait_end(run_id, 90) == 0
    runs = launches(rec)
    assert len(runs) == 6  # 5 crashes + the attempt that completes
    assert [r["resume"].rsplit("-", 1)[-1] for r in runs[1:]] == ["5", "10", "15", "20", "25"]
    st = read_state(qlw_home, run_id)
    assert st["state"] == "completed" and st["restarts_since_progress"] == 0 and st["restarts"] == 5
    assert "failed" not in kinds(qlw_home, run_id)


def test_a4_a6_stop_reaches_a_sigstopped_trainer(qlw_home: Path, tmp_path: Path) -> None:
    """SIGSTOPped trainer, then `stop`: SIGTERM and SIGCONT to the group; it saves and exits 0."""
    sigs = tmp_path / "signals.txt"
    recipe = fake_recipe(tmp_path, ["--steps", "100000", "--step-time", "0.02", "--save-every", "100000",
                                    "--sigterm-save", "--record-signals", str(sigs)])
    run_id = start(recipe)
    wait_step(qlw_home, run_id, 5)
    pid = trainer_pid(qlw_home, run_id)
    os.kill(pid, signal.SIGSTOP)
    wait_for(lambda: psutil.Process(pid).status() == psutil.STATUS_STOPPED, what="stopped")
    assert qlw("stop", run_id).returncode == 0
    assert wait_end(run_id, 30) == 1
    st = read_state(qlw_home, run_id)
    assert st["state"] == "stopped" and st["exit_code"] == 0
    got = [line.split()[0] for line in sigs.read_text().splitlines()]
    assert "SIGTERM" in got and "SIGCONT" in got
    from supervisor.checkpoints.folders import newest_complete

    newest = newest_complete(tmp_path / "out")
    assert newest is not None and f"newest complete checkpoint: {newest.name}" in st["message"]
    assert "killed" not in st["message"]


def test_a5_stubborn_trainer_is_killed_after_the_grace(qlw_home: Path, tmp_path: Path) -> None:
    recipe = fake_recipe(tmp_path, ["--steps", "100000", "--step-time", "0.02", "--ignore-sigterm"])
    run_id = start(recipe, "--set", "supervisor.stop_grace_s=1")
    wait_step(qlw_home, run_id, 3)
    t0 = time.monotonic()
    assert qlw("stop", run_id).returncode == 0
    assert wait_end(run_id, 30) == 1
    assert time.monotonic() - t0 >= 1.0  # the grace was given
    st = read_state(qlw_home, run_id)
    assert st["state"] == "stopped" and "killed after grace" in st["message"]
    assert st["exit_signal"] == signal.SIGKILL or st["exit_code"] in (-9, None)
    evs = events(qlw_home, run_id)
    assert any(e["kind"] == "stop" and "did not exit within 1 s" in e["message"] for e in evs)


@pytest.mark.parametrize("escape", [False, True], ids=["workers", "escaped-workers"])
def test_a7_workers_are_gone_after_stop(proc_guard, tmp_path: Path, escape: bool) -> None:
    """The trainer exits leaving its workers alive; after the stop none of them survives."""
    recipe = fake_recipe(tmp_path, ["--steps", "100000", "--step-time", "0.02", "--workers", "2",
                                    "--leave-workers", *(["--escape"] if escape else [])])
    run_id = start(recipe)
    wait_step(proc_guard.home, run_id, 3)
    workers = [p for p in run_processes(run_id) if "supervisor.wrapper" not in p.cmdline()
               and p.pid != trainer_pid(proc_guard.home, run_id)]
    assert len(workers) == 2
    if escape:
        assert all(os.getsid(w.pid) == w.pid for w in workers)  # they left the trainer's session
    assert qlw("stop", run_id).returncode == 0
    assert wait_end(run_id, 30) == 1
    wait_for(lambda: not run_processes(run_id), timeout=15, what="no process of the run")


def test_a7_crashed_trainer_with_escaped_workers_is_relaunched(proc_guard, tmp_path: Path) -> None:
    """The crashed trainer's escaped workers hold its stdout: the exit is still seen, the
    workers are killed before the relaunch, and the relaunch completes."""
    rec = tmp_path / "rec.jsonl"
    recipe = fake_recipe(tmp_path, ["--steps", "20", "--step-time", "0.02", "--save-every", "5",
                                    "--workers", "2", "--escape", "--crash-at", "8", "--record", str(rec),
                                    "--once-file", str(tmp_path / "once")])
    run_id = start(recipe)
    assert wait_end(run_id, 60) == 0
    assert len(launches(rec)) == 2
    wait_for(lambda: not run_processes(run_id), timeout=15, what="no process of the run")


def test_a7_unkillable_group_is_reported_and_not_relaunched(proc_guard, tmp_path: Path) -> None:
    """SIGKILL does not take (D state, simulated): FAILED naming the group; no second launch."""
    rec = tmp_path / "rec.jsonl"
    recipe = fake_recipe(tmp_path, ["--steps", "100", "--step-time", "0.02", "--save-every", "5",
                                    "--workers", "1", "--crash-at", "8", "--record", str(rec)])
    store = create_run(recipe, "guards.oom.release_timeout_s=1.5")
    sup = spawn_patched(store, {"unkillable": True})
    try:
        st = wait_state(proc_guard.home, store.run_id, "failed", timeout=40)
        assert "still alive" in st["message"] and "not relaunching" in st["message"]
        assert len(launches(rec)) == 1
        assert run_processes(store.run_id)  # the "unkillable" worker is indeed still there
    finally:
        kill_run_processes(store.run_id)
        reap(sup)


def test_a8_no_zombies_under_the_supervisor(qlw_home: Path, tmp_path: Path) -> None:
    """Grandchildren orphaned by the trainer are re-parented to the supervisor (a subreaper),
    which reaps them: no zombie with the supervisor as parent stays around."""
    recipe = fake_recipe(tmp_path, ["--steps", "120", "--step-time", "0.03", "--spawn-orphans", "1"])
    run_id = start(recipe)
    wait_step(qlw_home, run_id, 5)
    sup = psutil.Process(supervisor_pid(qlw_home, run_id))
    adopted = 0
    seen: dict[int, int] = {}
    for _ in range(12):
        try:
            kids = sup.children()
        except psutil.NoSuchProcess:
            break
        wrapper = (read_state(qlw_home, run_id).get("wrapper") or {}).get("pid")
        for k in kids:
            try:
                if k.pid != wrapper:
                    adopted += 1
                if k.status() == psutil.STATUS_ZOMBIE:
                    seen[k.pid] = seen.get(k.pid, 0) + 1
            except psutil.NoSuchProcess:
                continue
        time.sleep(0.25)
    assert adopted > 0, "no orphan was ever re-parented to the supervisor (not a subreaper?)"
    assert not [pid for pid, n in seen.items() if n >= 3], f"zombies not reaped: {seen}"
    assert wait_end(run_id, 60) == 0


def test_a9_exit_while_no_supervisor_runs_is_read_from_the_exit_file(qlw_home: Path, tmp_path: Path) -> None:
    """The supervisor dies; the trainer crashes meanwhile. The next supervisor learns the exit
    from the wrapper's exit file (it is not the trainer's parent) and relaunches."""
    rec = tmp_path / "rec.jsonl"
    recipe = fake_recipe(tmp_path, ["--steps", "40", "--step-time", "0.05", "--save-every", "5",
                                    "--crash-at", "16", "--record", str(rec),
                                    "--once-file", str(tmp_path / "once")])
    run_id = start(recipe)
    wait_step(qlw_home, run_id, 6)
    os.kill(supervisor_pid(qlw_home, run_id), signal.SIGKILL)
    exit_file = run_dir(qlw_home, run_id) / "attempts" / "1" / "exit.json"
    wait_for(exit_file.exists, timeout=30, what="the wrapper's exit file")
    # A SIGKILLed multi-threaded process lets go of its flock only when its last thread is
    # gone (one may sit in fsync for a while): wait for that, as `wait` would.
    wait_for(lambda: supervisor_pid(qlw_home, run_id) is None, timeout=20, what="the lock released")
    qlw("status", run_id, check=True)  # starts a supervisor (as a user would)
    assert wait_end(run_id, 60) == 0
    evs = events(qlw_home, run_id)
    assert any(e["kind"] == "adopted" and "ended while no supervisor" in e["message"] for e in evs)
    exited = [e for e in evs if e["kind"] == "trainer_exited"]
    assert exited[0]["evidence"]["returncode"] == 1 and "fake crash" in exited[0]["message"]
    assert len(launches(rec)) == 2 and launches(rec)[1]["resume"].endswith("checkpoint-15")


def test_a9_supervisor_killed_between_spawn_and_record(proc_guard, tmp_path: Path) -> None:
    """The supervisor dies right after spawning the trainer, before state.json names it. The
    next supervisor must not start a second trainer next to the untracked one: it stops the
    stray group (identified by its exit-file path in this run's folder), adopts the
    checkpoints it wrote, and relaunches from the newest of them."""
    rec = tmp_path / "rec.jsonl"
    out = tmp_path / "out"
    recipe = fake_recipe(tmp_path, ["--steps", "60", "--step-time", "0.03", "--save-every", "5",
                                    "--record", str(rec)])
    store = create_run(recipe)
    sup = spawn_patched(store, {"die_after_spawn": True})
    reap(sup)
    wait_for(lambda: (out / "checkpoint-10" / "trainer_state.json").exists(), timeout=30,
             what="the untracked trainer's checkpoint-10")
    stray = launches(rec)[0]["pid"]
    assert read_state(proc_guard.home, store.run_id).get("wrapper") is None  # never recorded
    qlw("status", store.run_id, check=True)  # a user's next command starts a supervisor
    wait_for(lambda: len(launches(rec)) == 2, timeout=30, what="the relaunch")
    assert not psutil.pid_exists(stray) or psutil.Process(stray).status() == psutil.STATUS_ZOMBIE
    second = launches(rec)[1]
    assert second["resume"] and int(second["resume"].rsplit("-", 1)[1]) >= 10
    assert wait_end(store.run_id, 60) == 0
    evs = events(proc_guard.home, store.run_id)
    assert any(e["kind"] == "stray" for e in evs)
    assert len(launches(rec)) == 2


def test_a9_identity_requires_pid_start_time_boot_id_and_cmdline() -> None:
    from supervisor import procgroup

    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        ident = procgroup.identity_of(p.pid).to_dict()
        assert procgroup.verify(ident)
        for key, bad in (("create_time", ident["create_time"] - 1), ("boot_id", "other-boot"),
                         ("cmdline_hash", "0" * 16), ("pid", 1)):
            assert not procgroup.verify({**ident, key: bad}), key
        assert not procgroup.verify({"pid": p.pid}) and not procgroup.verify(None)
        p.kill()
        time.sleep(0.2)  # a zombie (not reaped yet) is not the process either
        assert not procgroup.verify(ident)
    finally:
        p.kill()
        p.wait()


def test_a9_identity_is_recorded_after_exec_completes(monkeypatch) -> None:
    """Popen can return while /proc/PID/cmdline is still empty (execve half done). An identity
    taken then never verifies, and a restarted supervisor would call its own live trainer
    LOST (found by the 30-minute soak). The procgroup waits for the exec'd command line."""
    from supervisor import procgroup

    argv = [sys.executable, "-c", "import time; time.sleep(30)"]
    p = subprocess.Popen(argv)
    try:
        real = procgroup.identity_of
        calls = {"n": 0}

        def racy(pid: int):  # the first look happens mid-exec: empty command line
            calls["n"] += 1
            ident = real(pid)
            if calls["n"] == 1 and ident is not None:
                ident.cmdline_hash = procgroup._cmdline_hash([])
            return ident

        monkeypatch.setattr(procgroup, "identity_of", racy)
        ident = procgroup.identity_after_exec(p.pid, argv)
        monkeypatch.setattr(procgroup, "identity_of", real)
        assert calls["n"] >= 2 and procgroup.verify(ident.to_dict())
        assert ident.cmdline_hash == procgroup._cmdline_hash(argv)
    finally:
        p.kill()
        p.wait()


def test_a12_signals_to_the_supervisor(qlw_home: Path, tmp_path: Path) -> None:
    """SIGHUP is ignored; SIGTERM and SIGINT leave (state flushed, socket removed) while the
    trainer goes on; a second SIGTERM takes the fast path; a new supervisor re-adopts."""
    from supervisor import paths
    from supervisor.control.client import request

    recipe = fake_recipe(tmp_path, ["--steps", "100000", "--step-time", "0.02"])
    run_id = start(recipe)
    wait_step(qlw_home, run_id, 3)
    sock = paths.socket_path(run_id)
    trainer = trainer_pid(qlw_home, run_id)

    pid = supervisor_pid(qlw_home, run_id)
    os.kill(pid, signal.SIGHUP)
    time.sleep(0.5)
    assert psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    assert request(sock, "ping")["pong"]

    for sig in (signal.SIGTERM, signal.SIGINT):
        pid = supervisor_pid(qlw_home, run_id)
        os.kill(pid, sig)
        wait_for(lambda: supervisor_pid(qlw_home, run_id) is None, timeout=15, what="supervisor exit")
        assert not sock.exists()  # removed on the way out
        st = read_state(qlw_home, run_id)
        assert st["state"] in ("training", "saving") and "the trainer keeps running" in st["message"]
        assert psutil.pid_exists(trainer)
        qlw("status", run_id, check=True)  # a new supervisor re-adopts
        wait_for(lambda: supervisor_pid(qlw_home, run_id) is not None and sock.exists(), what="restart")
        assert request(sock, "ping")["pong"]

    pid = supervisor_pid(qlw_home, run_id)
    os.kill(pid, signal.SIGTERM)
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: supervisor_pid(qlw_home, run_id) is None, timeout=15, what="fast exit")
    assert psutil.pid_exists(trainer)
    assert kinds(qlw_home, run_id).count("adopted") == 2 and kinds(qlw_home, run_id).count("launch") == 1
    stop_now(run_id)


@pytest.mark.parametrize("case", ["missing-interpreter", "not-executable"])
def test_a14_spawn_failures_are_config_errors(qlw_home: Path, tmp_path: Path, case: str) -> None:
    if case == "missing-interpreter":
        exe = tmp_path / "no" / "such" / "python3"
        errno_txt = "errno 2"
    else:
        exe = tmp_path / "train.sh"
        exe.write_text("#!/bin/sh\necho hi\n")
        exe.chmod(0o644)
        errno_txt = "errno 13"
    recipe = fake_recipe(tmp_path, [])
    text = recipe.read_text()
    cmd_line = next(x for x in text.splitlines() if x.startswith("command = "))
    recipe.write_text(text.replace(cmd_line, f'command = ["{exe}", "--steps", "3"]'))
    # `start --detach` says so and exits non-zero: no run id on stdout for a run that never ran
    res = qlw("start", str(recipe), "--detach", "--force")
    assert res.returncode == 1 and not res.stdout.strip() and "failed at once" in res.stderr
    run_id = re.search(r"run (\S+) failed at once", res.stderr).group(1)
    assert wait_end(run_id, 30) == 1
    st = read_state(qlw_home, run_id)
    assert st["state"] == "failed" and str(exe) in st["message"] and errno_txt in st["message"]
    assert "config_error" in st["message"]
    time.sleep(0.5)
    assert kinds(qlw_home, run_id).count("launch") == 1 and "relaunch" not in kinds(qlw_home, run_id)


def test_a14_missing_cwd_is_a_config_error(qlw_home: Path, tmp_path: Path, monkeypatch) -> None:
    recipe = fake_recipe(tmp_path, ["--steps", "3"])
    gone = tmp_path / "cwd-that-goes"
    gone.mkdir()
    monkeypatch.chdir(gone)
    store = create_run(recipe)
    monkeypatch.chdir(tmp_path)
    gone.rmdir()
    res = qlw("_supervise", str(store.path), "--no-telemetry", timeout=60)
    assert res.returncode == 0
    st = read_state(qlw_home, store.run_id)
    assert st["state"] == "failed" and str(gone) in st["message"] and "Errno 2" in st["message"]
    assert not run_processes(store.run_id)


def test_a14_emfile_when_spawning_is_a_config_error(proc_guard, tmp_path: Path) -> None:
    recipe = fake_recipe(tmp_path, ["--steps", "3"])
    store = create_run(recipe)
    sup = spawn_patched(store, {"emfile_on_spawn": True})
    assert reap(sup) == 0
    st = read_state(proc_guard.home, store.run_id)
    assert st["state"] == "failed" and "Too many open files" in st["message"]
    assert "launch" not in kinds(proc_guard.home, store.run_id)

"""RELIABILITY_PLAN B: OOM relaunch and failure classes, with real processes.

Covered elsewhere (see docs/reliability.md): B2, B3, B4 (tests/e2e/test_relaunch.py); B7 through
A14 (config error), C10 (disk full) and F2 (GPU lost) here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

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
    wait_end,
    wait_for,
    wait_state,
)

pytestmark = pytest.mark.timeout(90)


def test_b1_oom_ladder_keeps_the_effective_batch_and_resumes(qlw_home: Path, tmp_path: Path) -> None:
    """OOM at step 25 with checkpoints at 10 and 20: batch 2 x accum 4 becomes 1 x 8, resuming
    from checkpoint-20; the event is in the run's events (what the TUI shows) and its log."""
    rec = tmp_path / "rec.jsonl"
    recipe = fake_recipe(tmp_path, ["--steps", "40", "--step-time", "0.02", "--save-every", "10",
                                    "--oom-at", "25", "--record", str(rec),
                                    "--once-file", str(tmp_path / "once")],
                         ladder='oom_ladder = [{ "train.per_device_batch" = 1 }]')
    run_id = start(recipe)
    assert wait_end(run_id, 60) == 0
    first, second = launches(rec)
    assert (first["per_device_batch"], first["grad_accum"]) == (2, 4)
    assert (second["per_device_batch"], second["grad_accum"]) == (1, 8)
    assert first["resume"] is None and second["resume"].endswith("checkpoint-20")
    st = read_state(qlw_home, run_id)
    assert st["state"] == "completed" and st["rung"] == 1
    assert "per_device_batch 2 -> 1" in st["rung_desc"]
    evs = events(qlw_home, run_id)
    relaunch = [e for e in evs if e["kind"] == "relaunch"]
    assert len(relaunch) == 1 and "CUDA OOM" in relaunch[0]["message"]
    assert relaunch[0]["evidence"]["resume_from"] == "checkpoint-20"
    status = json.loads(qlw("status", run_id, "--json", check=True).stdout)
    assert any(e["kind"] == "relaunch" for e in status["events"])
    assert "relaunch: CUDA OOM" in (run_dir(qlw_home, run_id) / "supervisor.log").read_text()


def test_b3_sigkill_with_the_kernel_oom_counter_risen_is_a_confirmed_host_oom_kill(
        proc_guard, tmp_path: Path) -> None:
    """The kernel's oom_kill count is taken at launch and at exit: a SIGKILL in between with the
    count risen is the OOM killer's, said so in the event (the count stands in /proc/vmstat)."""
    rec, counter = tmp_path / "rec.jsonl", tmp_path / "oom_kills"
    counter.write_text("7")
    recipe = fake_recipe(tmp_path, ["--steps", "100000", "--step-time", "0.02", "--record", str(rec)])
    store = create_run(recipe)
    sup = spawn_patched(store, {"oom_kills_file": str(counter)})
    try:
        wait_for(lambda: (read_state(proc_guard.home, store.run_id).get("step") or 0) > 3, what="steps")
        assert read_state(proc_guard.home, store.run_id)["oom_kills_at_launch"] == 7
        counter.write_text("8")
        os.kill(launches(rec)[0]["pid"], signal.SIGKILL)
        wait_for(lambda: len(launches(rec)) == 2, timeout=30, what="a relaunch")
        exited = [e["message"] for e in events(proc_guard.home, store.run_id) if e["kind"] == "trainer_exited"]
        assert "killed by the kernel OOM killer (oom_kill +1)" in exited[0], exited
        qlw("stop", store.run_id, "--now", check=True)
        assert reap(sup) == 0
    finally:
        kill_run_processes(store.run_id)
        reap(sup)


def test_b5_oom_text_in_a_successful_run_is_not_an_oom(qlw_home: Path, tmp_path: Path) -> None:
    rec = tmp_path / "rec.jsonl"
    recipe = fake_recipe(tmp_path, ["--steps", "10", "--print-oom-text", "--record", str(rec)])
    run_id = start(recipe)
    assert wait_end(run_id, 30) == 0
    assert len(launches(rec)) == 1
    assert "relaunch" not in kinds(qlw_home, run_id)
    assert "CUDA out of memory" in (run_dir(qlw_home, run_id) / "trainer.log").read_text()


def test_b6_gpu_memory_held_by_an_unkillable_escaped_worker_fails_the_relaunch(
        proc_guard, tmp_path: Path) -> None:
    """FakeNVML keeps 4 GiB attributed to the dead trainer's PID while its escaped worker
    lives; killing does not work: a bounded wait, then FAILED, and no second launch."""
    rec = tmp_path / "rec.jsonl"
    recipe = fake_recipe(tmp_path, ["--steps", "100", "--step-time", "0.03", "--save-every", "5",
                                    "--workers", "1", "--escape", "--crash-at", "10", "--record", str(rec)])
    store = create_run(recipe, "guards.oom.release_timeout_s=2")
    sup = spawn_patched(store, {"unkillable": True, "nvml": {"hold_mib": 4096}})
    try:
        st = wait_state(proc_guard.home, store.run_id, "failed", timeout=40)
        assert "GPU memory still held (4096 MiB)" in st["message"], st["message"]
        assert str(launches(rec)[0]["pid"]) in st["message"]  # NVML names the dead trainer
        assert len(launches(rec)) == 1
    finally:
        kill_run_processes(store.run_id)
        reap(sup)


def test_b6_released_memory_allows_the_relaunch_and_a_foreign_holder_is_never_killed(
        proc_guard, tmp_path: Path) -> None:
    """The same crash, killable this time: the escaped worker is killed, NVML shows the memory
    released, the relaunch goes ahead. A foreign process using the GPU is left alone."""
    rec = tmp_path / "rec.jsonl"
    recipe = fake_recipe(tmp_path, ["--steps", "30", "--step-time", "0.03", "--save-every", "5",
                                    "--workers", "1", "--escape", "--crash-at", "10", "--record", str(rec),
                                    "--once-file", str(tmp_path / "once")])
    store = create_run(recipe, "guards.oom.release_timeout_s=20")
    foreign = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    proc_guard.track(foreign.pid)
    try:
        sup = spawn_patched(store, {"nvml": {"hold_mib": 4096, "foreign_mib": 8192,
                                             "foreign_pid": foreign.pid}})
        st = wait_state(proc_guard.home, store.run_id, "completed", timeout=60)
        assert st["attempt"] == 2 and len(launches(rec)) == 2
        assert foreign.poll() is None  # never signalled
        assert not run_processes(store.run_id)
        reap(sup)
    finally:
        foreign.kill()
        foreign.wait()

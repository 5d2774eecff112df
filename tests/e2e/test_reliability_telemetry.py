"""RELIABILITY_PLAN F: telemetry faults against the real supervisor (FakeNVML injected).

Unit-level coverage is in tests/unit/test_telemetry.py (F1 no library, F3 hung call, F4 per-field
errors, F5 psutil races); see docs/reliability.md.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest

from tests.support import (
    create_run,
    fake_recipe,
    kinds,
    launches,
    read_state,
    reap,
    run_dir,
    spawn_patched,
    start,
    supervisor_pid,
    wait_end,
    wait_for,
    wait_state,
)

pytestmark = pytest.mark.timeout(90)
NO_PERMISSION = 4


def samples(home: Path, run_id: str) -> list[dict]:
    db = sqlite3.connect(run_dir(home, run_id) / "db.sqlite")
    try:
        return [json.loads(r[0]) for r in db.execute("SELECT data FROM samples ORDER BY rowid")]
    except sqlite3.OperationalError:  # the supervisor has not created the schema yet
        return []
    finally:
        db.close()


def test_f1_no_nvml_warns_once_and_training_is_unaffected(qlw_home: Path, tmp_path: Path) -> None:
    """This CI box has no NVIDIA driver: telemetry says unavailable, host sampling goes on, the
    run completes, and the supervisor log carries one warning, not one per sample."""
    recipe = fake_recipe(tmp_path, ["--steps", "60", "--step-time", "0.03", "--save-every", "20"])
    run_id = start(recipe)
    assert wait_end(run_id, 60) == 0
    got = samples(qlw_home, run_id)
    assert len(got) >= 5
    assert all(s["nvml"].startswith("unavailable") or s["nvml"] == "ok" for s in got)
    assert any(s["host"]["mem_available_mib"] for s in got)
    log = (run_dir(qlw_home, run_id) / "supervisor.log").read_text()
    if all(s["nvml"].startswith("unavailable") for s in got):
        assert log.count("GPU telemetry unavailable") == 1


def test_f2_f4_gpu_lost_mid_run_is_not_retried(proc_guard, tmp_path: Path) -> None:
    """Power readings are NO_PERMISSION (F4: that field is None, the rest is there); then the
    GPU falls off the bus (F2): the supervisor stays up while the trainer runs, and when the
    trainer dies the run FAILS as gpu_lost, with no relaunch and checkpoints kept."""
    rec = tmp_path / "rec.jsonl"
    recipe = fake_recipe(tmp_path, ["--steps", "1000", "--step-time", "0.03", "--save-every", "10",
                                    "--crash-at", "70", "--record", str(rec)])
    store = create_run(recipe)
    sup = spawn_patched(store, {"nvml": {"lose_after_s": 1.2, "fail": {"nvmlDeviceGetPowerUsage": NO_PERMISSION}}})
    try:
        wait_for(lambda: any(s["nvml"] == "lost" for s in samples(proc_guard.home, store.run_id)),
                 timeout=30, what="a lost GPU in the samples")
        assert read_state(proc_guard.home, store.run_id)["state"] in ("training", "saving")
        assert supervisor_pid(proc_guard.home, store.run_id) is not None  # still up
        st = wait_state(proc_guard.home, store.run_id, "failed", timeout=40)
        assert "gpu_lost" in st["message"] and "reboot" in st["message"]
        assert "newest complete: checkpoint-" in st["message"]
        assert len(launches(rec)) == 1 and "relaunch" not in kinds(proc_guard.home, store.run_id)
        assert list((tmp_path / "out").glob("checkpoint-*"))
        got = samples(proc_guard.home, store.run_id)
        ok = [s for s in got if s["nvml"] == "ok"]
        assert ok and all(g["power_w"] is None and g["temp_c"] is not None and g["util_pct"] is not None
                          for s in ok for g in s["gpus"])
        assert all(g["lost"] for s in got if s["nvml"] == "lost" for g in s["gpus"])
    finally:
        reap(sup)


def test_f3_hung_nvml_keeps_the_loop_and_socket_responsive(proc_guard, tmp_path: Path) -> None:
    """Every NVML call hangs from 1 s on: samples go on with "unavailable: timeout" and host
    data, commands are answered promptly, and the run completes."""
    from supervisor import paths
    from supervisor.control.client import request

    recipe = fake_recipe(tmp_path, ["--steps", "100", "--step-time", "0.04", "--save-every", "20"])
    store = create_run(recipe)
    sup = spawn_patched(store, {"nvml": {"hang_after_s": 1.0, "timeout_s": 0.5}})
    sock = paths.socket_path(store.run_id)
    wait_for(lambda: any(s["nvml"] == "unavailable: timeout" for s in samples(proc_guard.home, store.run_id)),
             timeout=30, what="timed-out samples")
    for _ in range(5):
        t0 = time.monotonic()
        assert request(sock, "ping", timeout=10)["pong"]
        assert time.monotonic() - t0 < 2.0
        time.sleep(0.1)
    n = len(samples(proc_guard.home, store.run_id))
    wait_for(lambda: len(samples(proc_guard.home, store.run_id)) > n + 3, timeout=20, what="more samples")
    timed_out = [s for s in samples(proc_guard.home, store.run_id) if s["nvml"] == "unavailable: timeout"]
    assert any(s["host"]["mem_available_mib"] for s in timed_out)
    assert wait_state(proc_guard.home, store.run_id, "completed", timeout=40)
    assert reap(sup) == 0  # exits despite a thread stuck in NVML
    log = (store.path / "supervisor.log").read_text()
    assert log.count("sampling took longer than") == 1  # one warning, not one per tick


def test_f3_a_native_crash_in_the_sampler_costs_the_supervisor_not_the_run(proc_guard, tmp_path: Path) -> None:
    """os.abort() inside sampling (what a crashing libnvidia-ml does) kills the supervisor; the
    trainer, in its own session, goes on; the next `qlora-watch wait` restarts a supervisor
    that re-adopts it, and the run completes with a single launch."""
    rec = tmp_path / "rec.jsonl"
    recipe = fake_recipe(tmp_path, ["--steps", "150", "--step-time", "0.03", "--save-every", "25",
                                    "--record", str(rec)])
    store = create_run(recipe)
    sup = spawn_patched(store, {"nvml": {"abort_on_sample": 5}})
    assert reap(sup, timeout=30) != 0  # SIGABRT
    assert launches(rec) and read_state(proc_guard.home, store.run_id)["state"] not in ("failed", "lost")
    assert wait_end(store.run_id, 60) == 0  # `wait` restarts the supervisor
    assert "adopted" in kinds(proc_guard.home, store.run_id) and len(launches(rec)) == 1

"""The detached supervisor with real processes: survive the terminal, stop, re-adopt, lock."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import random
import signal
import sqlite3
import time
from pathlib import Path

import psutil
import pytest

from tests.support import fake_recipe, qlw, read_state, start, supervisor_pid, wait_for


def test_detached_run_completes_and_records(qlw_home: Path, tmp_path: Path) -> None:
    recipe = fake_recipe(tmp_path, ["--steps", "30", "--save-every", "5", "--step-time", "0.02"])
    run_id = start(recipe, force=False)
    assert qlw("wait", run_id, "--timeout", "60").returncode == 0
    st = read_state(qlw_home, run_id)
    assert st["state"] == "completed" and st["step"] == 30 and st["exit_code"] == 0
    status = json.loads(qlw("status", run_id, "--json", check=True).stdout)
    assert status["state"] == "completed"
    kinds = [e["kind"] for e in status["events"]]
    assert "trainer_exited" in kinds
    # save_total_limit 3 is enforced by the supervisor (the trainer's own rotation is off)
    ckpts = sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*"))
    assert ckpts == ["checkpoint-20", "checkpoint-25", "checkpoint-30"]
    db = sqlite3.connect(qlw_home / "runs" / run_id / "db.sqlite")
    assert db.execute("SELECT COUNT(*) FROM steps").fetchone()[0] == 30
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    ls = json.loads(qlw("ls", "--json", check=True).stdout)
    assert [r["run_id"] for r in ls] == [run_id]
    logs = qlw("logs", run_id[:4], check=True).stdout
    assert "fake trainer: training from step 0" in logs


def test_closing_the_terminal_does_not_stop_the_run(qlw_home: Path, tmp_path: Path) -> None:
    """start in a pty (a terminal), then hang the terminal up under it: the run completes."""
    recipe = fake_recipe(tmp_path, ["--steps", "40", "--step-time", "0.05"])
    pid, fd = pty.fork()
    if pid == 0:  # the "terminal session": qlora-watch start without --detach
        os.execvpe(os.sys.executable, [os.sys.executable, "-m", "supervisor", "start", str(recipe)],
                   os.environ)
    run_id = wait_for(lambda: next((p.name for p in (qlw_home / "runs").glob("*")), None),
                      what="run folder")
    wait_for(lambda: read_state(qlw_home, run_id).get("state") == "training", what="training")
    os.kill(pid, signal.SIGHUP)  # the SSH connection drops
    os.close(fd)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert qlw("wait", run_id, "--timeout", "60").returncode == 0


def test_two_clients_receive_live_steps(qlw_home: Path, tmp_path: Path) -> None:
    from supervisor import paths
    from supervisor.control.client import AsyncRunClient

    recipe = fake_recipe(tmp_path, ["--steps", "60", "--step-time", "0.05"])
    run_id = start(recipe, force=False)
    sock = paths.socket_path(run_id)

    async def watch() -> list[int]:
        c = AsyncRunClient(sock)
        snap = await c.connect()
        assert snap["run"]["run_id"] == run_id
        seen: list[int] = []
        async for msg in c.messages():
            if msg.get("type") == "step":
                seen.append(msg["step"]["step"])
            if len(seen) >= 5:
                break
        await c.close()
        return seen

    async def both() -> list[list[int]]:
        return await asyncio.gather(watch(), watch())

    a, b = asyncio.run(asyncio.wait_for(both(), 30))
    assert len(a) >= 5 and len(b) >= 5
    assert qlw("wait", run_id, "--timeout", "60").returncode == 0


def test_stop_saves_a_complete_checkpoint(qlw_home: Path, tmp_path: Path) -> None:
    from supervisor.checkpoints.folders import checkpoint_status

    recipe = fake_recipe(tmp_path, ["--steps", "10000", "--save-every", "100000", "--step-time", "0.02"])
    run_id = start(recipe, force=False)
    wait_for(lambda: (read_state(qlw_home, run_id).get("step") or 0) > 5, what="steps")
    assert qlw("stop", run_id, check=True).returncode == 0
    assert qlw("wait", run_id, "--timeout", "30").returncode == 1  # stopped, not completed
    st = read_state(qlw_home, run_id)
    assert st["state"] == "stopped"
    ckpts = list((tmp_path / "out").glob("checkpoint-*"))
    assert len(ckpts) == 1 and checkpoint_status(ckpts[0]).complete
    assert "newest complete checkpoint" in st["message"]


def test_stop_now_kills_a_stubborn_trainer(qlw_home: Path, tmp_path: Path) -> None:
    recipe = fake_recipe(tmp_path, ["--steps", "10000", "--ignore-sigterm", "--step-time", "0.02"],
                         extra="")
    run_id = start(recipe, force=False)
    wait_for(lambda: (read_state(qlw_home, run_id).get("step") or 0) > 2, what="steps")
    qlw("stop", run_id, "--now", check=True)
    assert qlw("wait", run_id, "--timeout", "30").returncode == 1
    assert read_state(qlw_home, run_id)["state"] == "stopped"


def test_supervisor_killed_trainer_goes_on_and_is_readopted(qlw_home: Path, tmp_path: Path) -> None:
    recipe = fake_recipe(tmp_path, ["--steps", "150", "--step-time", "0.05", "--save-every", "50"])
    run_id = start(recipe, force=False)
    wait_for(lambda: (read_state(qlw_home, run_id).get("step") or 0) > 3, what="steps")
    trainer_wrapper = read_state(qlw_home, run_id)["wrapper"]["pid"]
    os.kill(supervisor_pid(qlw_home, run_id), signal.SIGKILL)
    time.sleep(0.5)
    assert psutil.pid_exists(trainer_wrapper)
    events = qlw_home / "runs" / run_id / "attempts" / "1" / "events.jsonl"
    size = events.stat().st_size
    wait_for(lambda: events.stat().st_size > size, what="the trainer keeps training")
    # `status` notices the dead supervisor and starts one that re-adopts the trainer.
    qlw("status", run_id, check=True)
    assert qlw("wait", run_id, "--timeout", "60").returncode == 0
    st = read_state(qlw_home, run_id)
    assert st["state"] == "completed" and st["exit_code"] == 0
    db = sqlite3.connect(qlw_home / "runs" / run_id / "db.sqlite")
    kinds = [r[0] for r in db.execute("SELECT kind FROM events ORDER BY id")]
    assert "adopted" in kinds and kinds.count("launch") == 1  # re-adopted, not relaunched


def test_second_supervisor_refuses(qlw_home: Path, tmp_path: Path) -> None:
    recipe = fake_recipe(tmp_path, ["--steps", "10000", "--step-time", "0.02"])
    run_id = start(recipe, force=False)
    res = qlw("_supervise", str(qlw_home / "runs" / run_id), "--no-telemetry", timeout=30)
    assert res.returncode != 0 and "already supervised" in res.stdout + res.stderr
    qlw("stop", run_id, "--now", check=True)
    qlw("wait", run_id, "--timeout", "30")


def test_pid_reuse_is_never_adopted(qlw_home: Path, tmp_path: Path) -> None:
    """A state file pointing at an unrelated process: marked lost, the process untouched."""
    import subprocess
    import sys

    from supervisor.control import runs
    from supervisor.recipe import load_recipe
    from supervisor.store import RunStore

    recipe_path = fake_recipe(tmp_path, ["--steps", "5"])
    store = runs.create(str(recipe_path), load_recipe(recipe_path), None)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        ident = {"pid": sleeper.pid, "create_time": psutil.Process(sleeper.pid).create_time() - 5,
                 "boot_id": "x", "cmdline_hash": "y"}
        store.write_state({"state": "training", "attempt": 1, "wrapper": ident, "lineage": 1})
        qlw("status", store.run_id, check=True)
        wait_for(lambda: read_state(qlw_home, store.run_id).get("state") == "lost", what="lost")
        assert sleeper.poll() is None  # never signalled
        assert RunStore(store.path).read_state()["state"] == "lost"
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.timeout(600)
def test_state_and_db_survive_sigkill_at_random_moments(qlw_home: Path, tmp_path: Path) -> None:
    """SIGKILL the supervisor 50 times at random instants: state.json and the DB always open."""
    recipe = fake_recipe(tmp_path, ["--steps", "100000", "--step-time", "0.005", "--save-every", "50"])
    run_id = start(recipe, force=False)
    run = qlw_home / "runs" / run_id
    rng = random.Random(7)
    for _ in range(50):
        wait_for(lambda: (run / "supervisor.lock").exists() and _lock_held(run), timeout=20,
                 what="a supervisor")
        time.sleep(rng.uniform(0.0, 0.3))
        try:
            os.kill(supervisor_pid(qlw_home, run_id), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
        time.sleep(0.05)
        json.loads((run / "state.json").read_text())  # always parses
        db = sqlite3.connect(run / "db.sqlite")
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        db.close()
        from supervisor.control import runs
        from supervisor.store import RunStore

        runs.ensure_supervisor(RunStore(run))
    qlw("stop", run_id, "--now", check=True)
    assert qlw("wait", run_id, "--timeout", "60").returncode == 1


def _lock_held(run: Path) -> bool:
    from supervisor.control import runs
    from supervisor.store import RunStore

    return runs.supervisor_running(RunStore(run))


def test_run_writes_telemetry_scalars_for_tensorboard(qlw_home: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = fake_recipe(tmp_path, ["--steps", "40", "--step-time", "0.05"])
    run_id = start(recipe, force=False)
    assert qlw("wait", run_id, "--timeout", "60").returncode == 0
    logdir = tmp_path / "out" / "tensorboard" / "system"
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "host/mem_available_gib" in tags and "host/trainer_rss_gib" in tags, tags
    assert len(acc.Scalars("host/mem_available_gib")) >= 3

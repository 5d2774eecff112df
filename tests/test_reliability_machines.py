"""Issue #14, "robust on real machines": logout, shared GPUs, slow downloads, preemption,
the run's environment, secrets, serve's key, errors in words, `attach --ssh`. Real processes;
fakes only for the hardware this machine lacks (NVML). Rows: docs/reliability.md, section R."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, fake_recipe, qlw, read_state, wait_for
from tests.rel_helpers import (
    create_run,
    kinds,
    reap,
    supervisor_pid,
    wait_end,
    wait_state,
    wait_step,
)

pytestmark = pytest.mark.timeout(120)


def _supervise(store, env: dict[str, str] | None = None) -> subprocess.Popen:
    """The supervisor as a batch job runs it: in the foreground of its own process group."""
    out = open(store.path / "supervisor.out", "ab")
    try:
        proc = subprocess.Popen([sys.executable, "-m", "supervisor", "_supervise", str(store.path)],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=str(ROOT), env={**os.environ, **(env or {})})
    finally:
        out.close()
    return proc


# ------------------------------------------------------------------------------ 4. preemption


def test_r4_sigterm_mode() -> None:
    from supervisor.preempt import sigterm_preempts

    assert not sigterm_preempts({}, pid=4242)  # a workstation: SIGTERM detaches (A12)
    assert sigterm_preempts({"SLURM_JOB_ID": "77"}, pid=4242)
    assert sigterm_preempts({}, pid=1)  # a container's pid 1: `docker stop`
    assert sigterm_preempts({"QLW_ON_SIGTERM": "preempt"}, pid=4242)
    assert not sigterm_preempts({"QLW_ON_SIGTERM": "detach", "SLURM_JOB_ID": "77"}, pid=1)


@pytest.mark.parametrize("how", ["usr1-then-term", "term-under-slurm"])
def test_r4_preemption_saves_records_preempted_exits_0_and_resumes(
        qlw_home: Path, tmp_path: Path, how: str) -> None:
    """Slurm's --signal=USR1@120 then SIGTERM (or SIGTERM alone in a Slurm job) to the
    supervisor's process group: the trainer saves a complete checkpoint, the run is PREEMPTED,
    the supervisor exits 0, and `qlora-watch resume` completes the run from that checkpoint."""
    from supervisor.checkpoints.folders import checkpoint_status

    recipe = fake_recipe(tmp_path, ["--steps", "60", "--step-time", "0.05", "--save-every", "1000"])
    store = create_run(recipe)
    env = {"SLURM_JOB_ID": "4242"} if how == "term-under-slurm" else {}
    sup = _supervise(store, env)
    try:
        wait_step(qlw_home, store.run_id, 8)
        pgid = os.getpgid(sup.pid)
        if how == "usr1-then-term":
            os.killpg(pgid, signal.SIGUSR1)
            time.sleep(0.3)
        os.killpg(pgid, signal.SIGTERM)  # Slurm: SIGTERM, then SIGKILL after KillWait
        assert sup.wait(30) == 0
    finally:
        reap(sup, 5)
    st = read_state(qlw_home, store.run_id)
    assert st["state"] == "preempted", st
    assert "killed" not in st["message"] and "qlora-watch resume" in st["message"]
    ckpt = checkpoint_status(st["last_checkpoint"])
    assert ckpt.complete and ckpt.step is not None and 8 <= ckpt.step < 60
    assert "preempt" in kinds(qlw_home, store.run_id)

    res = qlw("resume", store.run_id, "--detach")
    assert res.returncode == 0, res.stderr
    assert wait_end(store.run_id, 60) == 0
    st = read_state(qlw_home, store.run_id)
    assert st["state"] == "completed" and st["resume_from"] == str(ckpt.path) and st["step"] == 60


def test_r4_preempted_while_waiting_to_relaunch(qlw_home: Path, tmp_path: Path) -> None:
    """No trainer alive (a back-off between attempts): PREEMPTED at once, exit 0."""
    recipe = fake_recipe(tmp_path, ["--steps", "60", "--step-time", "0.05", "--crash-at", "3"])
    recipe.write_text(recipe.read_text().replace("backoff_base_s = 0.05", "backoff_base_s = 30")
                      .replace("backoff_max_s = 0.2", "backoff_max_s = 30"))
    store = create_run(recipe)
    sup = _supervise(store)
    try:
        wait_state(qlw_home, store.run_id, "backoff")
        os.killpg(os.getpgid(sup.pid), signal.SIGUSR1)
        assert sup.wait(30) == 0
    finally:
        reap(sup, 5)
    assert read_state(qlw_home, store.run_id)["state"] == "preempted"
    wait_for(lambda: supervisor_pid(qlw_home, store.run_id) is None, what="supervisor gone")

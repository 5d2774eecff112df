"""Slurm runs (`qlora-watch submit`, docs/slurm.md) against a real single-node Slurm.

tests/support/slurm_cluster.py starts munged + slurmctld + slurmd with their own config in a temp
folder (localhost only); the cluster tests skip with the reason when Slurm is not installed
or this is not root. The script, the argv and the no-Slurm errors are checked without one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import (
    ROOT,
    events,
    fake_recipe,
    qlw,
    read_state,
    slurm_cluster,
    steps_seen,
    wait_for,
)

TINY = str(ROOT / "recipes" / "tiny.toml")


# ------------------------------------------------------------------------------ no cluster


def test_submit_dry_run_prints_the_script_and_creates_nothing(qlw_home: Path) -> None:
    res = qlw("submit", TINY, "--gpus", "0", "--dry-run", "--sbatch-arg=--qos=low", check=True)
    assert "#SBATCH --requeue" in res.stdout and "#SBATCH --qos=low" in res.stdout
    assert "--gpus-per-node" not in res.stdout and "dry run" in res.stderr
    assert not (qlw_home / "runs").exists() or not list((qlw_home / "runs").iterdir())


def test_submit_without_slurm_says_so_in_one_line(qlw_home: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}  # no sbatch on it
    res = qlw("submit", TINY, "--gpus", "0", env=env)
    assert res.returncode == 2
    assert "`sbatch` is not on PATH" in res.stderr and "Traceback" not in res.stderr
    assert not (qlw_home / "runs").exists() or not list((qlw_home / "runs").iterdir())


# ------------------------------------------------------------------------------ the cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    why = slurm_cluster.unavailable()
    if why:
        pytest.skip(f"no Slurm here: {why}")
    c = slurm_cluster.start(tmp_path_factory.mktemp("slurm"))
    yield c
    c.stop()


def _env(cluster: slurm_cluster.Cluster) -> dict[str, str]:
    return {**os.environ, "SLURM_CONF": cluster.env["SLURM_CONF"]}


def _ls(cluster, rid: str) -> dict:
    rows = json.loads(qlw("ls", "--json", env=_env(cluster), check=True).stdout)
    return next(r for r in rows if r["run_id"] == rid)


def _ls_line(cluster, rid: str) -> str:
    out = qlw("ls", env=_env(cluster), check=True).stdout
    return next(x for x in out.splitlines() if x.startswith(rid))


def _submit(cluster, tmp_path: Path, recipe: str, *extra: str) -> tuple[str, str]:
    res = qlw("submit", recipe, "--gpus", "0", *extra, env=_env(cluster), cwd=tmp_path, check=True)
    rid, jid = res.stdout.split()
    return rid, jid


def _start_now(cluster, jid: str) -> None:
    """Slurm holds a requeued job ~2 min (BeginTime); a test need not wait for that. But not
    in the second its last run ended: slurmd refuses that start ("Job credential revoked")."""
    wait_for(lambda: (cluster.squeue() or [""])[0].startswith(f"{jid} PENDING"), timeout=30, interval=0.2,
             what=f"job {jid} pending again")
    time.sleep(2.0)
    cluster.cmd("scontrol", "update", f"jobid={jid}", "StartTime=now")


def _attach_sees_steps(cluster, home: Path, rid: str) -> None:
    pexpect = pytest.importorskip("pexpect")

    env = {**_env(cluster), "QLORA_WATCH_HOME": str(home), "TERM": "xterm-256color"}
    child = pexpect.spawn(sys.executable, ["-m", "supervisor", "attach", rid], dimensions=(48, 160),
                          env=env, timeout=60, cwd=str(ROOT))
    try:
        seen = steps_seen(child, 2, timeout=60)
        assert max(seen) > min(seen), seen
        child.send("d")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)


@pytest.mark.timeout(240)
def test_submit_pending_running_attach_requeue_resumes_from_checkpoint(
        cluster, qlw_home: Path, tmp_path: Path) -> None:
    rid, jid = _submit(cluster, tmp_path, TINY, "--sbatch-arg=--hold",
                       "--set", f'train.output_dir="{tmp_path / "out"}"', "--set", "train.max_steps=40",
                       "--set", "train.save_steps=10", "--set", "debug.step_sleep_s=0.25")
    script = (qlw_home / "runs" / rid / "job.sbatch").read_text()
    assert "#SBATCH --requeue" in script and "#SBATCH --hold" in script
    row = _ls(cluster, rid)
    assert row["slurm"]["job_id"] == jid and row["slurm"]["state"] == "PENDING"
    assert row["state"] == "queued" and "PENDING (JobHeldUser)" in _ls_line(cluster, rid)
    cluster.cmd("scontrol", "release", jid)
    wait_for(lambda: _ls(cluster, rid)["slurm"]["state"] == "RUNNING", timeout=30, interval=0.3,
             what="RUNNING in ls")
    assert f"RUNNING on {cluster.host}" in _ls_line(cluster, rid)
    wait_for(lambda: (read_state(qlw_home, rid).get("step") or 0) >= 2, timeout=90, interval=0.3,
             what="training steps")
    _attach_sees_steps(cluster, qlw_home, rid)  # the node is this host: attached locally
    wait_for(lambda: str(read_state(qlw_home, rid).get("last_checkpoint") or "").endswith("checkpoint-10"),
             timeout=60, interval=0.2, what="checkpoint-10")
    cluster.cmd("scontrol", "requeue", jid)  # SIGTERM to the job, then pending again
    wait_for(lambda: read_state(qlw_home, rid).get("state") == "preempted", timeout=40, interval=0.2,
             what="PREEMPTED (the supervisor saved a checkpoint on SIGTERM)")
    saved = read_state(qlw_home, rid)["last_checkpoint"]
    wait_for(lambda: _ls(cluster, rid)["slurm"]["state"] == "PENDING", timeout=40, interval=0.3,
             what="requeued job pending")
    assert _ls(cluster, rid)["state"] == "requeued" and "PENDING (BeginTime)" in _ls_line(cluster, rid)
    _start_now(cluster, jid)
    wait_for(lambda: read_state(qlw_home, rid).get("state") == "completed", timeout=150, interval=0.5,
             what="the resumed run to complete")
    st = read_state(qlw_home, rid)
    assert st["attempt"] == 2 and st["step"] == 40
    assert st["slurm"]["restart"] == 1 and st["slurm"]["job_id"] == jid
    assert Path(st["resume_from"]).name == Path(saved).name  # the checkpoint the preemption saved
    ckpt = int(Path(saved).name.split("-")[1])
    assert 10 <= ckpt < 40, saved
    msgs = [e["message"] for e in events(qlw_home, rid) if e["kind"] == "slurm"]
    assert msgs[0] == f"Slurm job {jid} started on {cluster.host}"
    assert any(f"restart 1: resuming {rid} from checkpoint-{ckpt}" in m and "gap" in m for m in msgs), msgs
    starts = json.loads((qlw_home / "runs" / rid / "slurm.json").read_text())["starts"]
    assert [s["restart"] for s in starts] == [0, 1] and starts[1]["env"]["SLURM_RESTART_COUNT"] == "1"
    wait_for(lambda: not cluster.squeue(), timeout=30, interval=0.3, what="the job to leave squeue")


@pytest.mark.timeout(120)
def test_stop_a_running_slurm_run_stops_gracefully_and_leaves_no_job(
        cluster, qlw_home: Path, tmp_path: Path) -> None:
    recipe = fake_recipe(tmp_path, ["--steps", "100000", "--step-time", "0.05", "--save-every", "20"])
    rid, jid = _submit(cluster, tmp_path, str(recipe))
    wait_for(lambda: (read_state(qlw_home, rid).get("step") or 0) >= 5, timeout=60, interval=0.2,
             what="steps")
    res = qlw("stop", rid, env=_env(cluster), check=True)
    assert "cancelled" in res.stdout
    assert cluster.squeue() == []  # nothing pending, nothing running
    st = read_state(qlw_home, rid)
    assert st["state"] == "stopped" and "stopped by user" in st["message"]
    saved = st["last_checkpoint"]
    # `resume` of a Slurm run: a new job of the same script resumes it on its node
    res = qlw("resume", rid, env=_env(cluster), check=True)
    rid_again, jid_again = res.stdout.split()
    assert rid_again == rid and jid_again != jid
    wait_for(lambda: read_state(qlw_home, rid).get("attempt") == 2
             and read_state(qlw_home, rid).get("state") == "training", timeout=60, interval=0.2,
             what="the resumed attempt training")
    assert Path(read_state(qlw_home, rid)["resume_from"]).name == Path(saved).name
    assert qlw("resume", rid, env=_env(cluster)).returncode == 2  # its job is queued/running
    qlw("stop", rid, env=_env(cluster), check=True)
    assert cluster.squeue() == []
    # the queued case: never started, scancel only
    rid2, jid2 = _submit(cluster, tmp_path, str(recipe), "--sbatch-arg=--hold",
                         "--set", f'train.output_dir="{tmp_path / "out2"}"')
    assert qlw("attach", rid2, env=_env(cluster)).returncode == 1  # "attach once it runs"
    rm = qlw("rm", rid2, "--yes", env=_env(cluster))
    assert rm.returncode == 1 and f"job {jid2} is still in the queue" in rm.stdout
    qlw("stop", rid2, env=_env(cluster), check=True)
    assert cluster.squeue() == []
    assert read_state(qlw_home, rid2)["state"] == "stopped"
    assert f"{jid2} ended" in _ls_line(cluster, rid2)


@pytest.mark.timeout(120)
def test_usr1_time_limit_warning_preempts_requeues_and_resumes(cluster, qlw_home: Path, tmp_path: Path) -> None:
    """`--signal=B:USR1@grace` before the time limit: checkpoint, PREEMPTED, the job step
    requeues its own job (Slurm would just end it), and the next start resumes."""
    recipe = fake_recipe(tmp_path, ["--steps", "120", "--step-time", "0.05", "--save-every", "20"])
    rid, jid = _submit(cluster, tmp_path, str(recipe))
    wait_for(lambda: (read_state(qlw_home, rid).get("step") or 0) >= 25, timeout=60, interval=0.2,
             what="steps")
    waiter = subprocess.Popen([sys.executable, "-m", "supervisor", "wait", rid, "--timeout", "90"],
                              env=_env(cluster), stdout=subprocess.PIPE, text=True)
    cluster.cmd("scancel", "--signal=USR1", "--batch", jid)  # what Slurm sends at time - grace
    wait_for(lambda: read_state(qlw_home, rid).get("state") == "preempted", timeout=30, interval=0.2,
             what="PREEMPTED")
    saved = read_state(qlw_home, rid)["last_checkpoint"]
    wait_for(lambda: (cluster.squeue() or [""])[0].startswith(f"{jid} PENDING"), timeout=30, interval=0.3,
             what="the job requeued by its own step")
    _start_now(cluster, jid)
    wait_for(lambda: read_state(qlw_home, rid).get("state") == "completed", timeout=60, interval=0.3,
             what="the resumed run to complete")
    st = read_state(qlw_home, rid)
    assert st["attempt"] == 2 and Path(st["resume_from"]).name == Path(saved).name
    # `wait` went on through PREEMPTED while the job was queued again
    assert waiter.wait(30) == 0 and waiter.stdout.read().strip() == f"{rid}: completed"
    status = qlw("status", rid, env=_env(cluster), check=True).stdout
    assert f"slurm     job {jid} not in the queue (ended); started on {cluster.host}, " \
           f"{cluster.host} (restart 1)" in status, status
    out = (qlw_home / "runs" / rid / f"slurm-{jid}.out").read_text()
    assert f"requeued job {jid}" in out
    wait_for(lambda: not cluster.squeue(), timeout=30, interval=0.3, what="the job to leave squeue")


@pytest.mark.timeout(120)
def test_stop_and_attach_from_another_host_go_through_ssh_to_the_node(
        cluster, qlw_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """From a login node the job's node is another machine: stop runs `qlora-watch stop` there
    and attach asks it for the socket, both with the run store's QLORA_WATCH_HOME."""
    from supervisor.control.remote import SSH_OPTS, remote_socket
    from supervisor.slurm import commands
    from supervisor.slurm import runs as slurm_runs
    from supervisor.store import RunStore

    recipe = fake_recipe(tmp_path, ["--steps", "100000", "--step-time", "0.05", "--save-every", "20"])
    rid, jid = _submit(cluster, tmp_path, str(recipe))
    wait_for(lambda: (read_state(qlw_home, rid).get("step") or 0) >= 5, timeout=60, interval=0.2,
             what="steps")
    log = tmp_path / "ssh.log"
    for k, v in {**_env(cluster), "QLORA_WATCH_SSH": str(ROOT / "tests" / "fakes" / "fake_ssh.py"),
                 "FAKE_SSH_LOG": str(log),
                 "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(commands, "is_local", lambda node: False)  # we are "the login node"
    store = RunStore(qlw_home / "runs" / rid)
    assert slurm_runs.attach_target(store) == ("ssh", cluster.host)
    sock = remote_socket(str(ROOT / "tests" / "fakes" / "fake_ssh.py"), cluster.host, rid, home=qlw_home)
    assert sock.endswith(f"{rid}.sock")
    assert slurm_runs.stop(store, now=False) == 0
    assert cluster.squeue() == [] and read_state(qlw_home, rid)["state"] == "stopped"
    calls = [json.loads(x) for x in log.read_text().splitlines()]
    assert calls[0] == [*SSH_OPTS, cluster.host, "env", f"QLORA_WATCH_HOME={qlw_home}", "qlora-watch",
                        "_socket", rid]
    assert calls[1][-3:] == ["qlora-watch", "stop", rid]


@pytest.mark.timeout(120)
def test_a_job_killed_outright_is_resumed_by_the_next_start(cluster, qlw_home: Path, tmp_path: Path) -> None:
    """SIGKILL (a node lost, an OOM-killed step): nothing records PREEMPTED; the next start
    marks the run LOST with the reason, adopts the checkpoint completed while nobody recorded
    it, and resumes from it."""
    from supervisor.checkpoints.folders import checkpoint_status

    recipe = fake_recipe(tmp_path, ["--steps", "80", "--step-time", "0.05", "--save-every", "20"])
    rid, jid = _submit(cluster, tmp_path, str(recipe))
    wait_for(lambda: str(read_state(qlw_home, rid).get("last_checkpoint") or "").endswith("checkpoint-20"),
             timeout=60, interval=0.2, what="checkpoint-20")
    sup_pid = int((qlw_home / "runs" / rid / "supervisor.lock").read_text().strip())
    os.kill(sup_pid, signal.SIGSTOP)  # the supervisor hangs; the trainer saves on unrecorded
    wait_for(lambda: checkpoint_status(tmp_path / "out" / "checkpoint-40").complete, timeout=30,
             interval=0.1, what="checkpoint-40 on disk")
    cluster.cmd("scancel", "--signal=KILL", "--batch", jid)  # the supervisor dies, no record
    wait_for(lambda: not cluster.squeue(), timeout=30, interval=0.3, what="the killed job to end")
    assert read_state(qlw_home, rid)["state"] not in ("preempted", "completed")
    cluster.cmd("scontrol", "requeue", jid)  # what a node failure does with --requeue
    _start_now(cluster, jid)
    wait_for(lambda: read_state(qlw_home, rid).get("state") == "completed", timeout=60, interval=0.3,
             what="the resumed run to complete")
    st = read_state(qlw_home, rid)
    assert st["attempt"] == 2 and int(Path(st["resume_from"]).name.split("-")[1]) >= 40
    evs = [e["message"] for e in events(qlw_home, rid) if e["kind"] == "slurm"]
    assert any("ended while the run was training" in m for m in evs), evs
    assert any(m.startswith("adopted checkpoint-40") for m in evs), evs
    wait_for(lambda: not cluster.squeue(), timeout=30, interval=0.3, what="the job to leave squeue")

"""`qlora-watch _slurm_job RUN_DIR`: what a Slurm run's batch step runs (job.sbatch `exec`s it).

At every job start (the first, and each requeue or preemption restart) it records where and
how the job runs (job id, node, restart count, Slurm's and CUDA's environment) in the run's
slurm.json and as an event, then:

- a run that never started: supervise it (the first attempt);
- a run the last job left PREEMPTED, or LOST, or still marked live because that job was
  killed outright: resume it (resume.request_resume: a new attempt from the newest complete
  checkpoint, same settings), with an event naming the gap and the node change;
- completed, stopped, failed or diverged: nothing to do, the job ends.

The supervisor then runs in this process, in the foreground of the batch step, until the run
ends. A run PREEMPTED by the time-limit warning (USR1) while the job still runs is requeued
here (`scontrol requeue`): Slurm itself requeues only preempted or failed nodes' jobs.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from supervisor import paths
from supervisor.slurm import commands as slurm
from supervisor.states import RunState
from supervisor.store import RunStore

ENV_KEYS = ("SLURM_JOB_ID", "SLURM_JOB_NAME", "SLURM_JOB_PARTITION", "SLURM_JOB_NODELIST",
            "SLURM_JOB_NUM_NODES", "SLURM_RESTART_COUNT", "SLURM_CPUS_ON_NODE", "SLURM_GPUS_ON_NODE",
            "SLURM_JOB_GPUS", "SLURM_MEM_PER_NODE", "CUDA_VISIBLE_DEVICES", "SLURMD_NODENAME")
LOCK_WAIT_S = 30.0  # the last job's supervisor, still closing on a shared filesystem


def capture_env() -> dict[str, str]:
    """What this job start got from Slurm (no secrets live in these)."""
    env = {k: os.environ[k] for k in ENV_KEYS if k in os.environ}
    env["hostname"] = slurm.short_hostname()
    return env


def _event(store: RunStore, message: str, level: str = "info", **evidence: Any) -> None:
    from supervisor.records import Event, EventKind

    store.add_event(Event(t=time.time(), kind=EventKind.SLURM_JOB_SEEN, level=level, message=message,
                          attempt=store.read_state().get("attempt"), evidence=dict(evidence)))


def _gap_text(s: float) -> str:
    from supervisor.control.runs import fmt_duration

    return fmt_duration(s)


def _last_alive(store: RunStore, starts: list[dict[str, Any]], st: dict[str, Any]) -> float | None:
    """When the previous job was last seen doing something: its recorded end, the run's end,
    or the last write of state.json (a job killed outright records nothing)."""
    seen = [x for x in ((starts[-1].get("ended_at") if starts else None), st.get("ended_at")) if x]
    try:
        seen.append(store.state_path.stat().st_mtime)
    except OSError:
        pass
    return max(seen) if seen else None


def _adopt(store: RunStore) -> None:
    """Checkpoints the trainer completed while nobody recorded them (its supervisor killed by
    KillWait's SIGKILL while the save finished, or a node lost mid-job) are this run's: the
    output folder is claimed by it. Marked, so that the resume can start from the newest."""
    from supervisor.checkpoints.folders import adopt_checkpoints

    out = store.read_state().get("output_dir") or store.info().get("output_dir")
    if not out:
        return
    adopted = adopt_checkpoints(out, store.run_id)
    if adopted:
        _event(store, f"adopted {', '.join(adopted)}: completed while the last job ended, "
               "unrecorded", checkpoints=adopted)


def _wait_for_lock(store: RunStore) -> bool:
    from supervisor.control.runs import supervisor_running

    deadline = time.monotonic() + LOCK_WAIT_S
    while supervisor_running(store):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def main(run_dir: str) -> int:
    from supervisor.slurm.meta import meta_lock, read_meta, write_meta

    store = RunStore(Path(run_dir))
    if not store.path.is_dir():
        print(f"qlora-watch: {run_dir}: no such run folder (QLORA_WATCH_HOME must be on a "
              "filesystem this node shares with the login node)", file=sys.stderr, flush=True)
        return 2
    job_id = os.environ.get("SLURM_JOB_ID", "")
    node = os.environ.get("SLURMD_NODENAME") or slurm.short_hostname()
    restart = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    st = store.read_state()
    state = st.get("state")
    now = time.time()
    with meta_lock(store):  # `submit` may be recording the job id right now
        meta = read_meta(store)
        starts: list[dict[str, Any]] = meta.setdefault("starts", [])
        last_alive = _last_alive(store, starts, st)
        prev_node = starts[-1].get("node") if starts else None
        starts.append({"job_id": job_id, "node": node, "restart": restart, "t": now, "env": capture_env()})
        meta["job_id"] = job_id or meta.get("job_id")
        write_meta(store, meta)
    print(f"qlora-watch: job {job_id} (restart {restart}) on {node}: run {store.run_id} is "
          f"{state or 'new'}", flush=True)

    if state in (RunState.COMPLETED.value, RunState.STOPPED.value):
        return _end(store, meta, f"run {store.run_id} is {state}; nothing to do", 0)
    if state in (RunState.FAILED.value, RunState.DIVERGED.value):
        return _end(store, meta, f"run {store.run_id} is {state}; not resumed automatically "
                    f"(`qlora-watch resume {store.run_id}` after a look)", 1)
    if state == RunState.STARTING.value and st.get("resume_request"):  # `qlora-watch resume`
        _event(store, f"Slurm job {job_id} started on {node}: {st.get('message') or 'resuming'}",
               job_id=job_id, node=node, restart=restart)
    elif state:  # a restart: resume the same run
        if not _wait_for_lock(store):
            return _end(store, meta, f"run {store.run_id} is supervised elsewhere still "
                        f"(supervisor.lock held for {LOCK_WAIT_S:.0f} s); not starting a second", 1)
        status = store.read_status()
        if status.run_state.live:  # the last job was killed outright
            why = (f"the previous Slurm job ended while the run was {status.run_state.value} "
                   "(no preemption record)")
            status.change(RunState.LOST, why="Slurm: the previous job was killed outright", message=why,
                          exited=True, ended_at=last_alive or now)
            store.write_status(status)
            _event(store, why, level="warning")
        _adopt(store)
        from supervisor.control.resume import ResumeError, request_resume

        try:
            plan = request_resume(store)
        except ResumeError as e:
            return _end(store, meta, f"cannot resume: {e}", 1)
        gap = now - last_alive if last_alive else None
        moved = f"; node {prev_node} -> {node}" if prev_node and prev_node != node else f"; on {node}"
        _event(store, f"Slurm job {job_id} restart {restart}: {plan.describe()}"
               + (f" after a {_gap_text(gap)} gap" if gap is not None else "") + moved,
               job_id=job_id, node=node, prev_node=prev_node, restart=restart, gap_s=gap,
               resume_from=plan.from_path)
    else:
        _event(store, f"Slurm job {job_id} started on {node}", job_id=job_id, node=node, restart=restart)
    status = store.read_status()
    status.update(slurm={"job_id": job_id, "node": node, "restart": restart, "job_started_at": now})
    store.write_status(status)
    store.close()

    from supervisor.daemon.core import run_supervisor

    rc = run_supervisor(store.path, socket_path=paths.socket_path(store.run_id))
    final = store.read_state().get("state")
    if rc == 3:  # AlreadySupervised
        return _end(store, meta, f"run {store.run_id} is already supervised", 1)
    if final == RunState.PREEMPTED.value and job_id:
        _requeue_if_running(job_id)
    code = 0 if final in (RunState.COMPLETED.value, RunState.PREEMPTED.value, RunState.STOPPED.value) else 1
    return _end(store, meta, f"run {store.run_id} {final}", code)


def _requeue_if_running(job_id: str) -> None:
    """Preempted by the time-limit warning: the job still runs and would just end. Requeue it.
    (Preemption, `scontrol requeue` and scancel have the job COMPLETING already.)"""
    try:
        if slurm.job_state(job_id) == "RUNNING":
            slurm.requeue(job_id)
            print(f"qlora-watch: requeued job {job_id}", flush=True)
    except slurm.SlurmError as e:
        print(f"qlora-watch: could not requeue job {job_id}: {e}", file=sys.stderr, flush=True)


def _end(store: RunStore, meta: dict[str, Any], message: str, code: int) -> int:
    from supervisor.slurm.meta import meta_lock, read_meta, write_meta

    with meta_lock(store):
        meta = read_meta(store) or meta
        if meta.get("starts"):
            meta["starts"][-1].update(ended_at=time.time(), outcome=store.read_state().get("state"))
        write_meta(store, meta)
    print(f"qlora-watch: {message}", file=sys.stderr if code else sys.stdout, flush=True)
    return code

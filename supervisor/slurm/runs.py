"""Slurm runs from the login node: `submit`, their job in `ls`, `stop` (graceful, then scancel)
and `attach` (finds the node; ssh stream-local forwarding unless the node is this machine).

A Slurm run is an ordinary run folder with a slurm.json beside info.json: the job id, the
script and one record per job start (node, restart count, environment; slurm/job.py). The
run's supervisor runs only inside the job: nothing here starts one on the login node.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from supervisor import paths
from supervisor.slurm import commands as slurm
from supervisor.slurm.meta import (
    is_slurm,
    job_id,
    meta_lock,
    read_meta,
    write_meta,
)
from supervisor.states import TERMINAL_VALUES, RunState
from supervisor.store import RunStore, atomic_write

SCRIPT = "job.sbatch"
STOP_GONE_S = 60.0  # how long `stop` waits for the job to leave squeue after scancel


def status_line(store: RunStore) -> str:
    """`status`'s Slurm line: the job now, and where the run's job starts were."""
    meta = read_meta(store)
    jid = meta.get("job_id")
    try:
        j = slurm.job(jid) if jid else None
        now = j.describe() if j else "not in the queue (ended)"
    except slurm.SlurmError as e:
        now = f"? ({e})"
    starts = meta.get("starts") or []
    where = ", ".join(f"{s.get('node')}" + (f" (restart {s.get('restart')})" if s.get("restart") else "")
                      for s in starts[-4:])
    return f"slurm     job {jid or '-'} {now}" + (f"; started on {where}" if where else "")


# ------------------------------------------------------------------------------ submit


def submit(recipe_path: str, recipe: Any, opts: Any, dry_run: bool = False) -> int:
    """Create the run, write job.sbatch into it and sbatch it; print `RUN_ID JOB_ID`."""
    from supervisor.control import runs
    from supervisor.slurm.script import ScriptError, render
    from supervisor.store import new_run_id

    home = paths.state_home()
    if dry_run:
        root = paths.runs_dir()
        rid = new_run_id({p.name for p in root.iterdir()} if root.is_dir() else set())
        try:
            print(render(run_id=rid, run_dir=root / rid, home=home, cwd=os.getcwd(),
                         recipe=recipe, opts=opts), end="")
        except ScriptError as e:
            print(f"qlora-watch: {e}", file=sys.stderr)
            return 2
        print("# (dry run: no run created, nothing submitted; the run id will differ)", file=sys.stderr)
        return 0
    try:
        slurm.binary("sbatch")  # said before a run folder exists
    except slurm.SlurmError as e:
        print(f"qlora-watch: {e}", file=sys.stderr)
        return 2
    try:
        store = runs.create(recipe_path, recipe, None)
    except runs.StartError as e:
        print(f"qlora-watch: {e}", file=sys.stderr)
        return 2
    try:
        text = render(run_id=store.run_id, run_dir=store.path, home=home,
                      cwd=store.info().get("cwd") or os.getcwd(), recipe=recipe, opts=opts)
    except ScriptError as e:
        _refused(store, str(e))
        print(f"qlora-watch: {e}", file=sys.stderr)
        return 2
    script = store.path / SCRIPT
    atomic_write(script, text, mode=0o700)
    meta = {"job_id": None, "script": str(script), "submitted_at": time.time(), "starts": [],
            "options": {k: v for k, v in vars(opts).items()}}
    write_meta(store, meta)
    try:
        jid = slurm.sbatch(str(script))
    except slurm.SlurmError as e:
        _refused(store, f"not submitted: {e}")
        print(f"qlora-watch: {e} (run {store.run_id} marked failed; its script: {script})",
              file=sys.stderr)
        return 1
    with meta_lock(store):  # a job that already started has added its start
        meta = read_meta(store)
        meta["job_id"] = meta.get("job_id") or jid
        write_meta(store, meta)
    print(f"{store.run_id} {jid}")
    print(f"submitted run {store.run_id} as Slurm job {jid}; `qlora-watch ls` shows it, "
          f"`qlora-watch attach {store.run_id}` once it runs", file=sys.stderr)
    return 0


def resubmit(store: RunStore, from_ckpt: str | None = None, overrides: Any = ()) -> int:
    """`qlora-watch resume` of a Slurm run: record the resume (checkpoint, --set) as for any run,
    then sbatch the run's job.sbatch again; that job's start launches the resumed attempt."""
    from supervisor.control.resume import ResumeError, request_resume

    old = job_id(store)
    try:
        if old and slurm.job(old) is not None:
            print(f"qlora-watch: run {store.run_id}'s Slurm job {old} is still in the queue; a "
                  "requeued job resumes by itself (`qlora-watch stop` it first to change it)",
                  file=sys.stderr)
            return 2
        slurm.binary("sbatch")
    except slurm.SlurmError as e:
        print(f"qlora-watch: {e}", file=sys.stderr)
        return 2
    try:
        plan = request_resume(store, from_ckpt, overrides)
    except ResumeError as e:
        print(f"qlora-watch: {e}", file=sys.stderr)
        return 2
    try:
        jid = slurm.sbatch(str(store.path / SCRIPT))
    except slurm.SlurmError as e:
        _refused(store, f"resume not submitted: {e}")
        print(f"qlora-watch: {e}", file=sys.stderr)
        return 1
    with meta_lock(store):
        meta = read_meta(store)
        meta["jobs"] = [*meta.get("jobs", []), old] if old else meta.get("jobs", [])
        meta["job_id"] = jid
        write_meta(store, meta)
    print(plan.describe(), file=sys.stderr)
    print(f"{store.run_id} {jid}")
    return 0


def _refused(store: RunStore, message: str) -> None:
    status = store.read_status()
    status.change(RunState.FAILED, why="Slurm refused the job", message=message, ended_at=time.time(),
                  exited=True)
    store.write_status(status)


# ------------------------------------------------------------------------------ ls


def annotate(stores: list[RunStore], rows: list[dict[str, Any]]) -> str | None:
    """Add each Slurm run's job (id, squeue state, reason, node) to its `ls` row; one squeue
    call for all. Returns a one-line note when Slurm cannot be asked, else None."""
    ids = {s.run_id: job_id(s) for s in stores if is_slurm(s)}
    if not ids:
        return None
    note, jobs = None, {}
    try:
        jobs = slurm.squeue([j for j in ids.values() if j])
    except slurm.SlurmError as e:
        note = f"(squeue: {e})"
    for store, row in zip(stores, rows, strict=True):
        if store.run_id not in ids:
            continue
        jid = ids[store.run_id]
        j = jobs.get(jid or "")
        row["slurm"] = {"job_id": jid, "state": j.state if j else ("?" if note else "ended"),
                        "reason": j.reason if j else None, "nodes": j.nodes if j else None}
        row["job"] = f"{jid} {j.describe()}" if j else f"{jid or '-'} {'?' if note else 'ended'}"
        if not store.read_state().get("state"):  # submitted, never started
            row["state"] = "queued" if j else ("?" if note else "never ran")
        elif j and j.state == "PENDING" and row.get("state") in (RunState.PREEMPTED.value,
                                                                  RunState.LOST.value):
            row["state"] = "requeued"  # waiting for its next job start
    return note


# ------------------------------------------------------------------------------ stop


def stop(store: RunStore, now: bool) -> int:
    """Stop gracefully (the trainer saves), then scancel: nothing is left pending."""
    jid = job_id(store)
    try:
        j = slurm.job(jid) if jid else None
    except slurm.SlurmError as e:
        print(f"qlora-watch: {e}", file=sys.stderr)
        return 1
    st = store.read_state()
    running = j is not None and j.state in slurm.ACTIVE and st.get("state") not in TERMINAL_VALUES
    if running and not now:
        code = _graceful(store, j)
        if code:
            return code
    try:
        if jid and j is not None:
            slurm.scancel(jid, signal="KILL" if now else None)
    except slurm.SlurmError as e:
        print(f"qlora-watch: {e}", file=sys.stderr)
        return 1
    if jid and not _gone(jid):
        print(f"qlora-watch: job {jid} is still in squeue after {STOP_GONE_S:.0f} s", file=sys.stderr)
        return 1
    status = store.read_status()
    if status.run_state.live or status.state in (RunState.PREEMPTED, RunState.LOST):
        status.change(RunState.STOPPED, why=f"stopped by user: Slurm job {jid} cancelled", exited=True,
                      ended_at=time.time(), message=f"stopped by user (Slurm job {jid} cancelled"
                      + (" while queued)" if not running else ")"))
        store.write_status(status)
    print(f"stopped {store.run_id}; Slurm job {jid or '-'} cancelled")
    return 0


def _graceful(store: RunStore, j: slurm.Job) -> int:
    """Ask the run's supervisor (on its node) to stop; wait for the run to end. If it cannot be
    reached, the scancel that follows still sends SIGTERM: a save within Slurm's KillWait."""
    from supervisor.control import runs

    try:
        from supervisor.recipe import recipe_from_json

        grace = recipe_from_json((store.path / "recipe.json").read_text()).supervisor.stop_grace_s
    except (OSError, ValueError):
        grace = 120.0
    node = j.first_node
    if slurm.is_local(node):
        try:
            runs.request(store, "stop")
        except Exception as e:  # noqa: BLE001 - the job may be ending by itself
            print(f"qlora-watch: cannot reach the supervisor of {store.run_id}: {e}; cancelling",
                  file=sys.stderr)
            return 0
    else:  # `qlora-watch stop` on the node: it stops, waits, and cancels there
        from supervisor.control.remote import RemoteError, run_remote

        print(f"stopping {store.run_id} on {node} over ssh", flush=True)
        try:
            run_remote(node or "", ["stop", store.run_id], home=paths.state_home(),
                       timeout=grace + STOP_GONE_S + 60)
        except RemoteError as e:
            print(f"qlora-watch: {e}; cancelling the job instead", file=sys.stderr)
            return 0
    print(f"stopping {store.run_id} on {node} (the trainer saves a checkpoint first)", flush=True)
    deadline = time.monotonic() + grace + 30
    while store.read_state().get("state") not in TERMINAL_VALUES and time.monotonic() < deadline:
        time.sleep(0.3)
    return 0


def _gone(jid: str) -> bool:
    deadline = time.monotonic() + STOP_GONE_S
    while time.monotonic() < deadline:
        try:
            if slurm.job(jid) is None:
                return True
        except slurm.SlurmError:
            pass
        time.sleep(0.5)
    return False


# ------------------------------------------------------------------------------ attach


def attach_target(store: RunStore) -> tuple[str, str | None]:
    """('local', None), ('ssh', NODE), or ('wait', message) for a run not running now."""
    st = store.read_state()
    jid = job_id(store)
    try:
        j = slurm.job(jid) if jid else None
    except slurm.SlurmError as e:
        j = None
        if st.get("state") not in TERMINAL_VALUES:
            return "wait", str(e)
    if st.get("state") in TERMINAL_VALUES and (j is None or j.state != "RUNNING"):
        if j is not None and j.state == "PENDING":
            return "wait", f"run {store.run_id} is {st.get('state')}; job {jid} is {j.describe()}"
        return "local", None  # history, read from the shared store
    if j is None:
        return "wait", f"run {store.run_id}: job {jid or '-'} is not in squeue (ended?)"
    if j.state != "RUNNING" or not st.get("state"):
        return "wait", f"run {store.run_id}: job {jid} is {j.describe()}; attach once it runs"
    node = j.first_node or (st.get("slurm") or {}).get("node")
    return ("local", None) if slurm.is_local(node) else ("ssh", node)

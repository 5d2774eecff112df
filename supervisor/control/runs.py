"""Run-level operations for the CLI: create, spawn the supervisor, status, logs, stop, wait."""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from supervisor import ladder, numbers, paths
from supervisor.recipe import Recipe, recipe_to_json
from supervisor.redact import redact_argv
from supervisor.states import TERMINAL_VALUES, RunState
from supervisor.store import RunStore, atomic_write, create_run, list_runs


class StartError(Exception):
    pass


def create(recipe_path: str | None, recipe: Recipe, report: Any, start_rung: int | None = None) -> RunStore:
    """A new run folder with the recipe snapshot; nothing is launched yet. recipe_path None:
    a recipe built on the command line (`qlora-watch run`), saved as recipe.json only."""
    from supervisor.checkpoints.folders import OutputDirError, check_output_dir
    from supervisor.store import new_run_id

    runs_root = paths.runs_dir()
    run_id = new_run_id({p.name for p in runs_root.iterdir()} if runs_root.is_dir() else set())
    # "{run_id}" in output_dir gives every run a folder of its own (runs/tiny-amber-falcon)
    out = Path(recipe.train.output_dir.replace("{run_id}", run_id)).expanduser()
    out = (Path.cwd() / out).resolve() if not out.is_absolute() else out.resolve()
    try:  # what the supervisor would refuse, refused before anything is detached
        check_output_dir(out, run_id)
    except OutputDirError as e:
        raise StartError(str(e)) from None
    for rid in list_running_ids():
        other = RunStore(paths.run_dir(rid))
        if other.info().get("output_dir") == str(out):
            raise StartError(f"output folder {out} is in use by live run {rid}")
    raw = Path(recipe_path).read_bytes() if recipe_path else recipe_to_json(recipe).encode()
    info = {
        "recipe": recipe.name, "recipe_path": str(Path(recipe_path).resolve()) if recipe_path else None,
        "recipe_sha256": hashlib.sha256(raw).hexdigest(),
        "model": recipe.model.name if recipe.model else "(your command)",
        "output_dir": str(out), "cwd": os.getcwd(),
        "estimate": report.to_dict() if report is not None else None,
        "start_rung": start_rung,
    }
    if recipe.foreign and recipe.trainer.command:
        info["command"] = redact_argv(recipe.trainer.command)
    store = create_run(runs_root, info, run_id=run_id)
    from supervisor import runenv

    runenv.capture(store.path)  # every launch of this run gets this environment (runenv.py)
    if recipe_path:
        atomic_write(store.path / "recipe.toml", raw.decode("utf-8"))  # 0600
    atomic_write(store.path / "recipe.json", recipe_to_json(recipe))  # 0600, like every run file
    return store


def start_failure(store: RunStore, settle_s: float = 1.5) -> str | None:
    """The reason, when the supervisor refused a just-started run before any trainer ran (an
    output folder it may not use, a command it cannot launch): `start --detach` must not print
    a run id and exit 0 for it. A trainer that ran and crashed is the run's own story."""
    deadline = time.monotonic() + settle_s
    while time.monotonic() < deadline:
        st = store.read_status()
        msg = str(st.message or (st.state.value if st.state else None))
        if st.state in (RunState.FAILED, RunState.LOST):
            refused = not st.wrapper or msg.startswith("config_error: could not start")
            return msg if refused else None
        if st.state not in (None, RunState.STARTING):
            return None  # the trainer runs: from here on it speaks through status and events
        time.sleep(0.05)
    return None


def spawn_supervisor(store: RunStore) -> subprocess.Popen:
    """The detached supervisor: new session, no terminal, stdin from /dev/null."""
    from supervisor.control.logind import scope_argv

    # logind's KillUserProcesses without linger: a scope of its own outlives the login session
    argv, _ = scope_argv([sys.executable, "-m", "supervisor", "_supervise", str(store.path)])
    from supervisor import logrotate
    from supervisor.recipe import recipe_from_json

    try:  # an earlier supervisor's output, past the size limit: to supervisor.out.1 first
        cfg = recipe_from_json((store.path / "recipe.json").read_text()).supervisor
        logrotate.rotate(store.path / "supervisor.out", cfg.log_max_bytes, cfg.log_backups)
    except (OSError, ValueError):
        pass
    out = os.fdopen(os.open(store.path / "supervisor.out", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab")
    try:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True, cwd=store.info().get("cwd") or os.getcwd(),
        )
    finally:
        out.close()


def supervisor_running(store: RunStore) -> bool:
    """True when some process holds the run's flock."""
    lock = store.path / "supervisor.lock"
    if not lock.exists():
        return False
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def wait_started(store: RunStore, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    sock = paths.socket_path(store.run_id)
    while time.monotonic() < deadline:
        st = store.read_status()
        if st.state and sock.exists():
            return True
        if st.state and st.state.terminal:
            return True
        time.sleep(0.05)
    return False


def is_live(store: RunStore) -> bool:
    return store.read_status().run_state.live


def ensure_supervisor(store: RunStore) -> bool:
    """Restart a supervisor for a live run whose supervisor died; it re-adopts the trainer.
    Never for a Slurm run: its supervisor runs only inside its job (slurm_job.py)."""
    if not is_live(store) or supervisor_running(store) or (store.path / "slurm.json").exists():
        return False
    spawn_supervisor(store)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not supervisor_running(store):
        time.sleep(0.05)
    time.sleep(0.3)
    return True


def all_runs() -> list[RunStore]:
    return list_runs(paths.runs_dir())


def list_running_ids() -> list[str]:
    return [s.run_id for s in all_runs() if is_live(s) and supervisor_running(s)]


def summary(store: RunStore) -> dict[str, Any]:
    info, st = store.run_info(), store.read_status()
    started = info.created_at
    end = st.ended_at if st.run_state.terminal else time.time()
    return {
        "run_id": store.run_id, "recipe": info.recipe, "model": info.model,
        "state": st.run_state.value, "step": st.step,
        "max_steps": st.max_steps, "last_loss": st.last_loss,
        "attempt": st.attempt, "rung": st.rung,
        "last_checkpoint": st.last_checkpoint,
        "wall_s": (end - started) if started and end else None,
        "started": datetime.fromtimestamp(started).strftime("%Y-%m-%d %H:%M") if started else "?",
    }


def status(store: RunStore) -> dict[str, Any]:
    from supervisor.redact import redact

    st = store.read_status()
    events = [
        {"t": e.t, "kind": e.kind, "level": e.level, "message": redact(e.message),
         "guard": e.guard, "evidence": e.evidence, "acked": e.acked, "id": e.id}
        for e in store.events(limit=10)
    ]
    store.close()
    return {**{k: v for k, v in st.to_json().items() if k != "wrapper"}, "run_id": store.run_id,
            "rung_label": ladder.label(st.rung),
            "run": store.info(), "supervisor_running": supervisor_running(store),
            "events": events}


def fmt_duration(s: float | None) -> str:
    """numbers.fmt_duration (the dashboard's), with the CLI's "-" when there is none."""
    return numbers.fmt_duration(s, na="-")


def _clean(text: Any) -> str:
    """Trainer text for a terminal: escape sequences and control characters removed (OSC 52
    would write the user's clipboard, CSI 2J clear the screen), line breaks kept."""
    from supervisor.sanitize import sanitize

    return "\n".join(sanitize(line) for line in str(text).split("\n"))


def _num(v: Any, digits: int) -> str:
    """A number for a person: rounded, thousands separated; "-" when missing or not a number."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
        return "-"
    return f"{v:,.{digits}f}"


def render_status(d: dict[str, Any]) -> str:
    rung = d.get("rung")
    ended = d.get("state") in TERMINAL_VALUES
    step, total = d.get("step"), d.get("max_steps")
    lines = [
        f"run       {d['run_id']}  ({d['run'].get('recipe')}, {d['run'].get('model')})",
        f"state     {d.get('state')}" + (f"  ({_clean(d.get('message'))})" if d.get("message") else ""),
        f"attempt   {d.get('attempt') or 1}  ladder {ladder.label(rung)}"
        + (f"  [{d.get('rung_desc')}]" if d.get("rung_desc") else ""),
        f"step      {_num(step, 0)}/{_num(total, 0)}",
        f"loss      {_num(d.get('last_loss'), 3)}",
        f"speed     {_num(d.get('tokens_per_s'), 0)} tok/s",
    ]
    if not ended:  # an ended run has no time left
        lines.append(f"ETA       {fmt_duration(d.get('eta_s'))}")
        from supervisor.download import describe

        if dl := describe(d.get("download")):
            lines.append(f"download  {dl}")
    if d.get("last_checkpoint"):
        lines.append(f"checkpoint {_clean(d['last_checkpoint'])}")
    lines += [
        f"output    {d.get('output_dir') or d['run'].get('output_dir')}",
        f"supervisor {'running' if d.get('supervisor_running') else 'not running'}",
        "events:",
    ]
    for e in d.get("events", []):
        ts = datetime.fromtimestamp(e["t"]).strftime("%H:%M:%S")
        lines.append(f"  {ts} {e['level']:<7} {_clean(e['message'])}")
    return "\n".join(lines)


def print_logs(store: RunStore, follow: bool, lines: int) -> int:
    from supervisor.daemon.followers import LogFollower

    for line in store.log_tail(lines):
        print(_clean(line))
    if not follow:
        return 0
    f = LogFollower(store.log_path)
    f.offset = store.log_path.stat().st_size if store.log_path.exists() else 0
    f.ino = store.log_path.stat().st_ino if store.log_path.exists() else None
    try:
        while True:
            for line in f.read():
                print(_clean(line), flush=True)
            if not is_live(store) and not supervisor_running(store):
                for line in f.read():
                    print(_clean(line), flush=True)
                return 0
            time.sleep(0.25)
    except KeyboardInterrupt:
        return 0


def request(store: RunStore, cmd: str, **kw: Any) -> dict[str, Any]:
    from supervisor.control.client import request as sock_request

    return sock_request(paths.socket_path(store.run_id), cmd, **kw)


STOP_REPLY_S = 30.0


def stop(store: RunStore, now: bool) -> int:
    if not is_live(store):
        print(f"run {store.run_id} is already {store.read_status().run_state.value}")
        return 0
    ensure_supervisor(store)
    try:
        # A supervisor that was just (re)started answers once it has re-adopted the trainer: on a
        # loaded box that takes seconds, so a stop waits longer than a status query does.
        request(store, "stop_now" if now else "stop", timeout=STOP_REPLY_S)
    except Exception as e:  # noqa: BLE001
        print(f"qlora-watch: cannot reach the supervisor of {store.run_id}: {e}", file=sys.stderr)
        return 1
    print(f"stopping {store.run_id}" + ("" if now else " (the trainer saves a checkpoint first)"))
    return 0


FLUSH_WAIT_S = 60.0  # how long `wait` lets an ended run's supervisor finish its writes


def remaining(deadline: float | None) -> float:
    """Seconds to a monotonic deadline (infinite when there is none)."""
    return float("inf") if deadline is None else max(0.0, deadline - time.monotonic())


_REQUEUABLE = frozenset({RunState.PREEMPTED.value, RunState.LOST.value})


def _requeue_pending(store: RunStore) -> bool:
    """A Slurm run, preempted or lost, whose job is still in the queue (its next start resumes it)."""
    if not (store.path / "slurm.json").exists():
        return False
    from supervisor.slurm.meta import job_in_queue

    return job_in_queue(store)


def wait(store: RunStore, timeout: float | None) -> int:
    """Exit 0 when completed, 1 for another terminal state, 124 on timeout."""
    deadline = None if timeout is None else time.monotonic() + timeout
    checked = 0.0
    requeue_checked = (0.0, False)
    while True:
        st = store.read_state().get("state")
        if st in _REQUEUABLE:  # a Slurm run whose job is queued again goes on (asked each 1 s)
            if time.monotonic() - requeue_checked[0] > 1:
                requeue_checked = (time.monotonic(), _requeue_pending(store))
            if requeue_checked[1]:
                st = None
        if st in TERMINAL_VALUES:
            # Its supervisor still flushes the trackers (W&B, MLflow) and closes the store: a
            # script that goes on to `wandb sync` or `report` must see it all. Bounded.
            flush_until = time.monotonic() + min(FLUSH_WAIT_S, remaining(deadline))
            while supervisor_running(store) and time.monotonic() < flush_until:
                time.sleep(0.1)
            print(f"{store.run_id}: {st}")
            return 0 if st == RunState.COMPLETED.value else 1
        if time.monotonic() - checked > 5:  # a dead supervisor is restarted (re-adoption)
            checked = time.monotonic()
            ensure_supervisor(store)
        if deadline is not None and time.monotonic() > deadline:
            print(f"{store.run_id}: still {st} after {timeout} s", file=sys.stderr)
            return 124
        time.sleep(0.2)


def client_for(store: RunStore) -> Any:
    """A socket client for a live run; a store reader for a finished one."""
    if is_live(store):
        ensure_supervisor(store)
        from supervisor.control.client import AsyncRunClient

        return AsyncRunClient(paths.socket_path(store.run_id))
    from supervisor.control.client import StoreClient

    return StoreClient(store.path)


def follow_plain(store: RunStore) -> int:
    """Plain progress lines for terminals without the dashboard."""
    last = None
    try:
        while True:
            st = store.read_status()
            line = (f"{st.state.value if st.state else None} step {st.step or 0}/{st.max_steps or '?'} "
                    f"loss {st.last_loss}")
            if line != last:
                print(line, flush=True)
                last = line
            if st.run_state.terminal:
                return 0 if st.state == RunState.COMPLETED else 1
            time.sleep(1)
    except KeyboardInterrupt:
        return 0



"""Trainer events: everything the trainer says, turned into state changes and steps, in one place.

Three sources, best first: "events" (events.jsonl, our callback or any trainer that speaks
the protocol), "log" (HF Trainer log dicts and the tqdm bar in trainer.log, logprogress.py),
"history" (a checkpoint's log_history, for a command that sends neither; foreign.py). A
better source replaces a worse one for the rest of the attempt. Steps are stored, sent to
clients and trackers; phases move the run between LOADING, TRAINING and SAVING; checkpoints
are checked, marked as this run's and count as progress.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

from supervisor import protocol as proto
from supervisor.checkpoints import folders as checkpoints
from supervisor.daemon import foreign
from supervisor.daemon.followers import JsonlFollower, LogFollower
from supervisor.daemon.logprogress import LogProgress
from supervisor.daemon.runio import RunIO
from supervisor.guards.relaunch import restarts_after
from supervisor.records import EventKind, Step, to_dict
from supervisor.states import RunState

log = logging.getLogger("qlora-watch.events")

LOG_RING = 500
RECENT_STEPS = 2000
STEP_SOURCES = ("events", "log", "history")
PHASE_STATES = {
    "loading_model": RunState.LOADING,
    "tokenising": RunState.LOADING,
    "training": RunState.TRAINING,
    "saving": RunState.SAVING,
}
# A phase moves the run only while a trainer is up and not being stopped: a late line of a
# killed trainer (BACKOFF, STOPPING, an ended run) changes the phase shown, not the state.
PHASE_MOVES_FROM = frozenset({RunState.STARTING, RunState.LOADING, RunState.TRAINING, RunState.SAVING})


class TrainerEvents:
    """Follows the current attempt's events file and the trainer's log."""

    def __init__(self, io: RunIO, *, recipe: Any, tb: Any, mark_time: Callable[[float], None],
                 output_dir: Callable[[], Path], on_phase: Callable[[str], None] = lambda phase: None) -> None:
        self.io = io
        self.recipe = recipe
        self.tb = tb  # trackers: every attempt's steps in one tracker run
        self.mark_time = mark_time  # the guards' clock (guard_window.GuardClock.mark)
        self.output_dir = output_dir
        self.on_phase = on_phase  # the lifecycle's hook (attempts.on_phase: the warm standby)
        self.events_follower: JsonlFollower | None = None
        self.log_follower = LogFollower(io.store.log_path)
        self.log_follower.offset = _size(io.store.log_path)
        self.log_follower.ino = _ino(io.store.log_path)
        self.log_ring: list[str] = io.store.log_tail(LOG_RING)
        self.recent_steps: list[Step] = []
        self.step_source: str | None = None
        self.log_progress = LogProgress()
        self.last_state_write = 0.0
        self.said: set[str] = set()  # warnings said once per run

    # -- attempts -----------------------------------------------------------------------
    def follow_attempt(self, attempt: int, offset: int = 0) -> None:
        path = self.io.store.attempt_dir(attempt) / "events.jsonl"
        self.events_follower = JsonlFollower(path, offset=offset)

    def new_attempt(self) -> None:
        """A launch: step sources start over."""
        self.step_source = None
        self.io.set_state(speaks_events=False, persist=False)
        self.log_progress = LogProgress()

    def read(self) -> None:
        """Everything new in the events file and the log (each tick, and once more at an exit)."""
        self.read_events()
        self.read_log()

    # -- the events file ----------------------------------------------------------------
    def read_events(self) -> None:
        f = self.events_follower
        if f is None:
            return
        steps: list[dict[str, Any]] = []
        for obj in f.read():
            if obj.get("event") != "settings":
                # kept in state.json: a re-adopting supervisor knows
                self.io.set_state(speaks_events=True, persist=False)
            if obj.get("event") == "step":
                steps.append(obj)
            else:
                self.on_trainer_event(obj)
        self.take_steps(steps, source="events")

    def on_trainer_event(self, obj: dict[str, Any]) -> None:
        io, st = self.io, self.io.status
        kind = obj.get("event")
        if kind == "phase":
            phase = str(obj.get("phase"))
            new = PHASE_STATES.get(phase)
            fields: dict[str, Any] = {"phase": phase, "phase_since": time.time()}
            self.mark_time(fields["phase_since"])
            if new is not None and st.run_state in PHASE_MOVES_FROM:
                io.set_state(new, why=f"trainer phase {phase}", **fields)
            else:
                io.set_state(**fields)
            if phase not in ("saving", "training") or not st.step:
                io.record(EventKind.PHASE_CHANGED, f"trainer phase: {phase}")  # not every save's toggles
            self.on_phase(phase)
        elif kind == "checkpoint":
            path = Path(str(obj.get("path", "")))
            info = checkpoints.checkpoint_status(path)
            if info.complete:
                try:
                    checkpoints.mark_checkpoint(path, io.store.run_id)
                except OSError as e:  # ENOSPC: a full disk must not take the supervisor down
                    io.record(EventKind.CHECKPOINT_UNMARKED, f"{path.name} is complete but could not be "
                              f"marked as this run's ({e.strerror or e}); it will not be "
                              "resumed from automatically", level="warning")
                    return
                self.accepted(info)
            else:
                io.record(EventKind.CHECKPOINT_INCOMPLETE, f"{path.name}: {info.reason}", level="warning")
        elif kind == "finished":
            io.set_state(adapter_path=obj.get("adapter_path"), phase="finished")
            io.record(EventKind.TRAINING_FINISHED, f"adapter saved to {obj.get('adapter_path')}")
        elif kind == "notice":
            io.record(EventKind.TRAINER_NOTED, str(obj.get("message", ""))[:2000])
            if isinstance(obj.get("cache_bytes"), int):  # the weight cache: shown in the dashboard
                io.set_state(weight_cache={"bytes": obj["cache_bytes"], "key": obj.get("cache_key"),
                                           "dir": obj.get("cache_dir")})
        elif kind == "settings":  # effective_settings() was called: the ladder reaches it
            io.set_state(settings_read=True)

    def accepted(self, info: Any) -> None:
        """A complete checkpoint of this run: progress (it resets the crash budget)."""
        self.io.set_state(last_checkpoint=str(info.path), last_checkpoint_step=info.step,
                          last_checkpoint_bytes=info.size_bytes,
                          restarts_since_progress=restarts_after(self.io.status.restarts_since_progress or 0,
                                                                 "progress"),
                          last_progress_t=time.time())
        from supervisor.units import size

        self.io.record(EventKind.CHECKPOINT_SAVED, f"{info.name} saved ({size(info.size_bytes)})",
                       evidence={"step": info.step, "bytes": info.size_bytes})

    def discover_checkpoints(self) -> None:
        """A command that sends no checkpoint events: find its saves by scanning (foreign.py)."""
        st = self.io.status
        if not self.recipe.trainer.command or st.speaks_events:
            return  # a trainer that sends `checkpoint` events says itself which saves are its own
        new, no_adapter = foreign.discover(self.output_dir(), self.io.store.run_id)
        for info in new:
            self.accepted(info)
            if self.step_source in (None, "history"):  # no callback, no log lines: its log_history
                self.take_steps(foreign.history_steps(info.path, after=st.step or 0), source="history")
        for info in no_adapter[-1:]:
            if "no_adapter" not in self.said:  # said once, not every scan
                self.said.add("no_adapter")
                self.io.record(EventKind.CHECKPOINT_WITHOUT_ADAPTER, foreign.no_adapter_message(info), level="warning")

    # -- the log ------------------------------------------------------------------------
    def read_log(self) -> None:
        lines = self.log_follower.read()
        if self.recipe.trainer.command and self.step_source in (None, "log", "history"):
            self.take_steps(self.log_progress.feed(lines), source="log")
            bar = self.log_progress.bar
            if bar is not None and self.step_source != "events" and bar[0] != self.io.status.step:
                # between logged steps the bar still moves: status shows it
                self.on_bar(*bar)
        if lines:
            self.log_ring.extend(lines)
            del self.log_ring[:-LOG_RING]
            self.io.broadcast(proto.log(lines[-LOG_RING:]))

    # -- steps --------------------------------------------------------------------------
    def take_steps(self, objs: list[dict[str, Any]], source: str) -> None:
        """Store and broadcast step records from one source, unless a better one speaks."""
        if not objs or STEP_SOURCES.index(source) > STEP_SOURCES.index(self.step_source or "history"):
            return
        self.step_source = source
        st = self.io.status
        attempt = st.attempt or 1
        new_steps = [s for s in (Step.from_trainer(o, attempt) for o in objs) if s is not None]
        if not new_steps:
            return
        lineage = st.lineage or 1
        try:
            self.io.store.add_steps(new_steps, lineage=lineage)
        except Exception as e:  # noqa: BLE001
            log.warning("steps not stored: %s", e)
        self.tb.add_steps(new_steps)  # W&B/MLflow: every attempt's steps in one tracker run
        for s in new_steps:
            self.recent_steps.append(s)
            self.io.broadcast(proto.step({**to_dict(s), "lineage": lineage}))
        del self.recent_steps[:-RECENT_STEPS]
        self.on_steps(new_steps)

    def training_seen(self) -> None:
        """A trainer with no phase events (a foreign command) is training once it shows steps."""
        st = self.io.status
        if st.run_state in (RunState.STARTING, RunState.LOADING) and st.phase is None:
            self.io.set_state(RunState.TRAINING, why="steps from a trainer that sends no phases",
                              phase="training", phase_since=time.time())

    def on_steps(self, steps: list[Step]) -> None:
        last = steps[-1]
        self.training_seen()
        self.mark_time(last.t)
        fields: dict[str, Any] = {"step": last.step, "last_step_t": last.t}
        if last.loss is not None:
            fields["last_loss"] = last.loss
        if last.max_steps:
            fields["max_steps"] = last.max_steps
        if last.tokens_per_s is not None:
            fields["tokens_per_s"] = last.tokens_per_s
        fields["eta_s"] = eta_s(self.recent_steps, last)
        fields["events_offset"] = self.events_follower.offset if self.events_follower else 0
        self._throttled(fields)

    def on_bar(self, step: int, total: int) -> None:
        """A progress bar line (no logged step): the step and total for status and ETA."""
        self.training_seen()
        now = time.time()
        self.mark_time(now)
        self._throttled({"step": step, "max_steps": total, "last_step_t": now})

    def _throttled(self, fields: dict[str, Any]) -> None:
        """state.json (and the clients' `state`) at most once a second for step counters."""
        now = time.monotonic()
        persist = now - self.last_state_write >= 1.0
        if persist:
            self.last_state_write = now
        self.io.set_state(persist=persist, **fields)

def eta_s(recent: list[Step], last: Step) -> float | None:
    """Seconds to max_steps at the pace of the attempt's last 50 steps; None when unknown."""
    steps = [s for s in recent[-50:] if s.attempt == last.attempt]
    if not last.max_steps or len(steps) < 2:
        return None
    dt = steps[-1].t - steps[0].t
    ds = steps[-1].step - steps[0].step
    if dt <= 0 or ds <= 0:
        return None
    return max(0.0, (last.max_steps - last.step) * dt / ds)


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except OSError:
        return 0


def _ino(p: Path) -> int | None:
    try:
        return p.stat().st_ino
    except OSError:
        return None

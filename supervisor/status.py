"""The run's two files as types: `RunInfo` (run.json, written once) and `RunStatus`
(state.json, the live state the supervisor keeps, also the snapshot's and the `state`
message's "state"). Stdlib only: the core writes them; the CLI, the dashboard, the report
and the offline client read them.

On-disk JSON stays as it was: `to_json()` writes the same keys, `from_json()` reads any
earlier version's file. Keys this version does not declare (a field an older or newer
version wrote, a hand-edited file) are tolerated on read and kept in `extra`, so they survive
a rewrite. Writing a field that is not declared is a bug: `RunStatus.update` raises
`UnknownField` under tests (`QLW_STRICT_STATE=1`) and logs an error in production.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

from supervisor.states import IllegalTransition, RunState, allowed, parse, strict

log = logging.getLogger("qlora-watch.status")


class UnknownField(AttributeError):
    """A state field that RunStatus does not declare."""


@dataclass
class RunStatus:
    """state.json. Every field may be absent in an older file: None means "not known yet"."""

    run_id: str | None = None
    state: RunState | None = None  # None: a new run, nothing launched yet
    message: str | None = None  # what the user reads next to the state
    updated_at: float | None = None  # set by the store on every write
    state_error: str | None = None  # "state not saved: ENOSPC" while state.json cannot be written
    # -- the attempt: one launch of the trainer ------------------------------------------------
    attempt: int | None = None  # from 1
    lineage: int | None = None  # a chain of attempts resuming in one output folder
    rung: int | None = None  # the OOM-ladder rung it runs at: rung 1 is the first change (ladder.py)
    rung_desc: str | None = None  # what that rung changed, for the dashboard header
    restarts: int | None = None  # every relaunch of the run (what `status --json` and the report count)
    restarts_since_progress: int | None = None  # the crash budget (guards.relaunch.restarts_after)
    overrides: list[str] = field(default_factory=list)  # the --set of every `qlora-watch resume`
    effective: dict[str, Any] | None = None  # the settings this attempt runs with
    output_dir: str | None = None
    output_dir_id: list[int] | None = None  # [st_dev, st_ino]: deletion refuses a swapped folder
    resume_from: str | None = None  # the checkpoint this attempt resumed from
    resume_request: dict[str, Any] | None = None  # `qlora-watch resume` asked for the next attempt
    started_at: float | None = None
    launched_at: float | None = None
    ended_at: float | None = None
    # -- the trainer's processes ----------------------------------------------------------------
    wrapper: dict[str, Any] | None = None  # procgroup identity of the wrapper (pid, start time, ...)
    exited: bool | None = None
    exit_code: int | None = None
    exit_signal: int | None = None
    oom_kills_at_launch: int | None = None  # the kernel's oom_kill count when it started
    download: dict[str, Any] | None = None  # a model download seen while loading (download.py)
    slurm: dict[str, Any] | None = None  # the Slurm job this run is in now (job_id, node, restart)
    weight_cache: dict[str, Any] | None = None  # the quantised-weight cache (bytes, key, dir): runner/qcache.py
    stop_state: RunState | None = None  # where a stop in progress ends (STOPPED, DIVERGED, ...)
    next_launch_in_s: float | None = None  # BACKOFF's delay
    # -- what the trainer said ------------------------------------------------------------------
    phase: str | None = None  # loading_model | tokenising | training | saving | finished
    phase_since: float | None = None
    events_offset: int | None = None  # bytes of events.jsonl read (a re-adopting supervisor goes on)
    speaks_events: bool | None = None  # it writes events (not only log lines)
    settings_read: bool | None = None  # it called effective_settings(): the ladder reaches it
    step: int | None = None
    max_steps: int | None = None
    last_step_t: float | None = None
    last_loss: float | None = None
    tokens_per_s: float | None = None
    eta_s: float | None = None
    last_checkpoint: str | None = None
    last_checkpoint_step: int | None = None
    last_checkpoint_bytes: int | None = None
    last_progress_t: float | None = None  # the last complete checkpoint (progress for the budget)
    adapter_path: str | None = None
    rung_numbering: int | None = None  # 1: `rung` as ladder.py numbers it (the store renumbers older files)
    # keys this version does not declare, as read (kept on rewrite)
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def run_state(self) -> RunState:
        """The state, STARTING before the first launch."""
        return self.state or RunState.STARTING

    def change(self, new: RunState | None = None, why: str | None = None, **fields: Any) -> str | None:
        """Move to `new` (an edge of states.EDGES, taken for `why`) and set fields; returns the
        edge taken ("training -> backoff"), None when the state stays. An illegal edge or one
        without a reason raises IllegalTransition under QLW_STRICT_STATE, else logs an error."""
        old, edge = self.state, None
        if new is not None and new != old:
            edge = f"{old.value if old else 'new'} -> {new.value}"
            problem = ("illegal state change" if not allowed(old, new)
                       else "state change without a reason" if not why else None)
            if problem:
                if strict():
                    raise IllegalTransition(f"{problem} {edge} (why: {why or '-'})")
                log.error("%s %s (why: %s)", problem, edge, why or "-")
            log.info("%s: %s", edge, why)
        if new is not None:
            fields["state"] = new
        self.update(**fields)
        return edge

    def update(self, **fields: Any) -> None:
        """Set declared fields; an undeclared one is a bug (raises under QLW_STRICT_STATE)."""
        for k, v in fields.items():
            if k not in _STATUS_FIELDS:
                msg = f"RunStatus has no field {k!r} (declare it in supervisor/status.py)"
                if strict():
                    raise UnknownField(msg)
                log.error("%s", msg)
                self.extra[k] = v
                continue
            if k in _STATE_FIELDS:
                v = parse(v.value if isinstance(v, RunState) else v)
            setattr(self, k, v)

    def to_json(self) -> dict[str, Any]:
        """The state.json object: the fields that are set (None is left out, as an absent key
        always read) and the extra keys read."""
        out: dict[str, Any] = dict(self.extra)
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name != "extra" and v is not None:
                out[f.name] = v.value if isinstance(v, RunState) else v
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> "RunStatus":
        """Any version's state.json (or a snapshot's "state"); never raises on its content."""
        st = cls()
        for k, v in (data or {}).items():
            if k in _STATE_FIELDS:
                setattr(st, k, parse(v))
            elif k == "overrides":
                st.overrides = [str(x) for x in v] if isinstance(v, list) else []
            elif k in _STATUS_FIELDS:
                setattr(st, k, v)
            else:
                st.extra[k] = v
        return st


_STATUS_FIELDS = frozenset(f.name for f in dataclasses.fields(RunStatus)) - {"extra"}
_STATE_FIELDS = frozenset({"state", "stop_state"})


@dataclass
class RunInfo:
    """run.json: the run's static facts, written once by `qlora-watch start`."""

    run_id: str | None = None
    created_at: float | None = None
    recipe: str | None = None  # the recipe's name
    recipe_path: str | None = None  # None: built on the command line (`qlora-watch run --`)
    recipe_sha256: str | None = None
    model: str | None = None
    output_dir: str | None = None
    cwd: str | None = None
    estimate: dict[str, Any] | None = None  # preflight's report (host_ram_needed_bytes, ...)
    start_rung: int | None = None  # --auto-fit
    command: list[str] | None = None  # a foreign trainer's argv, redacted
    max_steps: int | None = None  # not written by start; recorded runs may carry it
    rung_numbering: int | None = None  # 1: `start_rung` as ladder.py numbers it
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict[str, Any]:
        out = dict(self.extra)
        out.update({f.name: v for f in dataclasses.fields(self)
                    if f.name != "extra" and (v := getattr(self, f.name)) is not None})
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> "RunInfo":
        """Any version's run.json; "recipe_name" (early recordings) reads as `recipe`."""
        info = cls()
        for k, v in (data or {}).items():
            if k == "recipe_name":
                info.recipe = info.recipe or v
            elif k in _INFO_FIELDS:
                setattr(info, k, v)
            else:
                info.extra[k] = v
        return info


_INFO_FIELDS = frozenset(f.name for f in dataclasses.fields(RunInfo)) - {"extra"}

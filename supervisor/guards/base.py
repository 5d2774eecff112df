"""What guards see (`Window`) and what they may ask for (actions). Pure data, stdlib only.

A guard is `check(window, cfg) -> list[Action]`: no I/O, no clock (time is `window.now`
and the timestamps in samples and steps), no state of its own. The core builds a Window
each tick, runs `guards.run_guards`, and carries out the actions:

- Warn: announce once per `key` (the core adds executed keys to `already_fired`; it may
  forget a key after a cool-down so a condition that persists is announced again).
- StopRun: stop the trainer and end in `state`. graceful=True: SIGTERM, let the callback
  save, SIGKILL after the grace. graceful=False: stop without a save (a diverged model's
  weights are not worth a checkpoint).
- Relaunch: stop the trainer (if alive), wait `delay_s`, start attempt+1 at `rung`
  from `resume_from` (a checkpoint path, or None: from scratch); fresh_output=True: in a
  new output folder, keeping the old one's checkpoints.
- PruneCheckpoints: `checkpoints.safe_delete(output_dir, names, audit_log, reason)`.
- CaptureStacks: dump the trainer's Python stacks (py-spy / faulthandler) into the run log.
- Fail: stop for good in FAILED; checkpoints are kept.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any, Iterable, Union

from supervisor.checkpoints.plan import CheckpointInfo, as_infos
from supervisor.numbers import is_finite
from supervisor.records import Sample, Step
from supervisor.states import RunState

# States in which a trainer is (or is about to be) running and guards should watch it.
WATCHED_STATES = frozenset({RunState.STARTING, RunState.LOADING, RunState.TRAINING, RunState.SAVING})
LOADING_PHASES = frozenset({"loading_model", "tokenising"})
GIB = 1 << 30


@dataclass
class Window:
    """One tick's view of the run, built by the core (daemon/guard_window.py). Lists are oldest first."""

    now: float  # the latest timestamp the core saw (wall seconds, from samples/events)
    state: RunState
    phase: str | None = None  # loading_model | tokenising | training | saving
    phase_since: float | None = None  # when the current phase began (event timestamp)
    samples: list[Sample] = field(default_factory=list)  # recent, e.g. the last 10 minutes
    steps: list[Step] = field(default_factory=list)  # recent logged steps (any attempt)
    attempt: int = 1
    rung: int | None = None  # None: the recipe as written; n: oom_ladder[0..n-1] applied (ladder.py)
    restarts_since_progress: int = 0  # relaunches since the last new complete checkpoint
    last_checkpoint_step: int | None = None
    last_progress_t: float | None = None
    attempt_started_t: float | None = None
    download_progress_t: float | None = None  # the last bytes into the HF cache while loading
    # The current attempt's output folder, as CheckpointInfo or dicts with the same keys
    # (name, step, complete, size_bytes, path, run_id, best_checkpoint).
    checkpoints: list[Any] = field(default_factory=list)
    keep_checkpoints: int = 3  # recipe train.save_total_limit (qlora-watch owns retention)
    protected_checkpoints: set[str] = field(default_factory=set)  # e.g. the one resumed from
    run_id: str | None = None  # for run markers: checkpoints of other runs are never chosen
    disk_free_bytes: int | None = None  # free space where output_dir lives
    estimate: dict[str, Any] | None = None  # preflight: host_ram_needed_bytes, gpu_needed_bytes
    env: dict[str, str] = field(default_factory=dict)  # the trainer's environment (redacted ok)
    already_fired: set[str] = field(default_factory=set)  # Warn keys already announced
    # How a rung's settings reach the trainer (handoff.ladder_reaches); None: they do not
    ladder_reach: str | None = "recipe"

    def infos(self) -> list[CheckpointInfo]:
        return as_infos(self.checkpoints)

    def attempt_steps(self) -> list[Step]:
        """Steps of the current attempt only (a resume repeats step numbers)."""
        return [s for s in self.steps if s.attempt == self.attempt]


# ---------------------------------------------------------------------------- actions


@dataclass
class Warn:
    guard: str
    message: str
    evidence: dict[str, Any] = field(default_factory=dict)
    key: str = ""  # dedupe key; defaults to the guard name


@dataclass
class StopRun:
    guard: str
    reason: str
    state: RunState  # STOPPED, DIVERGED or FAILED
    graceful: bool
    message: str
    evidence: dict[str, Any] = field(default_factory=dict)
    resume_hint: str | None = None  # checkpoint path a human should resume from


@dataclass
class Relaunch:
    guard: str
    reason: str  # cuda_oom | crash | host_oom_kill | stall
    rung: int | None  # the rung to launch at (ladder.py numbering; None: as written)
    resume_from: str | None
    delay_s: float
    fresh_output: bool
    message: str
    evidence: dict[str, Any] = field(default_factory=dict)


@dataclass
class PruneCheckpoints:
    names: list[str]
    reason: str
    guard: str = "checkpoints"
    evidence: dict[str, Any] = field(default_factory=dict)


@dataclass
class CaptureStacks:
    guard: str
    evidence: dict[str, Any] = field(default_factory=dict)


@dataclass
class Fail:
    guard: str
    message: str
    evidence: dict[str, Any] = field(default_factory=dict)


Action = Union[Warn, StopRun, Relaunch, PruneCheckpoints, CaptureStacks, Fail]
# Actions that end or restart the attempt: the core carries out at most one per tick.
TERMINAL_ACTIONS = (Fail, StopRun, Relaunch)


# ---------------------------------------------------------------------------- helpers


def warn(window: Window, guard: str, key: str, message: str, evidence: dict[str, Any]) -> list[Action]:
    """A Warn unless its key was already announced."""
    if key in window.already_fired:
        return []
    return [Warn(guard=guard, message=message, evidence=evidence, key=key)]


def median(xs: Iterable[float]) -> float | None:
    vals = [x for x in xs if is_finite(x)]
    return statistics.median(vals) if vals else None


def mean(xs: Iterable[float | None]) -> float | None:
    vals = [x for x in xs if is_finite(x)]
    return sum(vals) / len(vals) if vals else None  # type: ignore[arg-type]


def gib(n: float | None) -> str:
    """Bytes as a size in a unit that fits (units.py): `0.4 MB`, not `0.0 GB`."""
    from supervisor.units import size

    return size(n)


def num(x: float) -> str:
    """5900.4 -> '5,900'."""
    return f"{x:,.0f}"

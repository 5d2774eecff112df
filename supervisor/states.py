"""Run states and the edges between them. No dependencies: the core, the store, the CLI and
the TUI all read these.

`EDGES` is the state machine: the core's `set_state(new, why=...)` checks every change of
state against it (staying in a state is not an edge). An edge missing from the table is a
bug: it raises `IllegalTransition` under tests (`QLW_STRICT_STATE=1`, set in
tests/conftest.py) and is logged as an error in production, where the run goes on.
"""

from __future__ import annotations

import os
from enum import Enum


class RunState(str, Enum):
    STARTING = "starting"
    LOADING = "loading"
    TRAINING = "training"
    SAVING = "saving"
    BACKOFF = "backoff"
    STOPPING = "stopping"
    COMPLETED = "completed"
    FAILED = "failed"
    STOPPED = "stopped"
    DIVERGED = "diverged"
    LOST = "lost"
    PREEMPTED = "preempted"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL

    @property
    def live(self) -> bool:
        return not self.terminal


S = RunState
TERMINAL = frozenset({S.COMPLETED, S.FAILED, S.STOPPED, S.DIVERGED, S.LOST, S.PREEMPTED})
# The same as plain strings, for code that reads state.json (the CLI, the dashboard, the benches).
TERMINAL_VALUES = frozenset(s.value for s in TERMINAL)
# Ended runs that `qlora-watch resume` continues from a checkpoint (COMPLETED only with more steps).
RESUMABLE = frozenset({S.STOPPED, S.FAILED, S.DIVERGED, S.LOST, S.PREEMPTED})

# How a live attempt can end without a relaunch: a non-retryable error or a guard (FAILED), a
# stop with nothing left to wait for (STOPPED, DIVERGED, PREEMPTED), a trainer that cannot be
# verified after a supervisor restart (LOST).
_ENDS = frozenset({S.FAILED, S.STOPPED, S.DIVERGED, S.PREEMPTED, S.LOST})
# A trainer that is up: its phase events move it between these; it can finish, crash (BACKOFF:
# relaunch after a delay), or be asked to stop (STOPPING: its save runs, then it exits).
_UP = frozenset({S.LOADING, S.TRAINING, S.SAVING, S.COMPLETED, S.BACKOFF, S.STOPPING}) | _ENDS

EDGES: dict[RunState | None, frozenset[RunState]] = {
    None: frozenset({S.STARTING, S.FAILED, S.STOPPED}),  # first attempt; Slurm refused / a queued job cancelled
    S.STARTING: _UP,                                  # spawned; a foreign command may finish before a phase
    S.LOADING: _UP,                                   # phase loading_model / tokenising
    S.TRAINING: _UP,                                  # phase training, or the first step of a foreign command
    S.SAVING: _UP,                                    # phase saving (a checkpoint is being written)
    S.BACKOFF: frozenset({S.STARTING}) | _ENDS,       # the delay is over: relaunch; or stopped/failed meanwhile
    S.STOPPING: _ENDS,                                # the trainer exited: the stop's end state
    S.COMPLETED: frozenset({S.STARTING}),             # `qlora-watch resume --set train.max_steps=N`
    S.FAILED: frozenset({S.STARTING}),                # `qlora-watch resume`: a new attempt
    S.STOPPED: frozenset({S.STARTING}),
    S.DIVERGED: frozenset({S.STARTING}),
    S.LOST: frozenset({S.STARTING, S.STOPPED}),       # or its requeued Slurm job cancelled
    S.PREEMPTED: frozenset({S.STARTING, S.STOPPED}),
}

STRICT_ENV = "QLW_STRICT_STATE"  # "1": an illegal edge or an undeclared state field raises


class IllegalTransition(RuntimeError):
    """A change of state that EDGES does not allow (a bug in the core)."""


def strict() -> bool:
    return os.environ.get(STRICT_ENV, "") not in ("", "0")


def allowed(old: RunState | None, new: RunState) -> bool:
    """Whether `old -> new` is an edge (staying in a state is always allowed)."""
    return old == new or new in EDGES.get(old, frozenset())


def parse(value: object) -> RunState | None:
    """A state as read from JSON: None when absent; an unknown value reads as LOST (never trusted)."""
    if value is None or value == "":
        return None
    try:
        return RunState(value)
    except ValueError:
        return RunState.LOST

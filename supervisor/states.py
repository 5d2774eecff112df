"""Run states. No dependencies: the core, the store, the CLI and the TUI all read these.

Transitions (edges named in the core where they happen):

    STARTING -> LOADING -> TRAINING -> COMPLETED
    TRAINING -> BACKOFF -> STARTING          (crash or CUDA OOM: relaunch)
    any live -> STOPPING -> STOPPED          (user stop, or a guard's graceful stop)
    any live -> FAILED                       (crash loop, last rung OOM, non-retryable error)
    TRAINING -> DIVERGED                     (NaN / loss spike: never relaunched automatically)
    any live -> LOST                         (supervisor gone and the trainer cannot be verified)
    any live -> PREEMPTED                    (the machine was taken away: resumable, not failed)
    STOPPED/FAILED/DIVERGED/LOST/PREEMPTED -> STARTING   (`qlora-watch resume`: a new attempt)
"""

from __future__ import annotations

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


TERMINAL = frozenset({RunState.COMPLETED, RunState.FAILED, RunState.STOPPED, RunState.DIVERGED, RunState.LOST,
                      RunState.PREEMPTED})
# The same as plain strings, for code that reads state.json (the CLI, the dashboard, the benches).
TERMINAL_VALUES = frozenset(s.value for s in TERMINAL)
# Ended runs that `qlora-watch resume` continues from a checkpoint (COMPLETED only with more steps).
RESUMABLE = frozenset({RunState.STOPPED, RunState.FAILED, RunState.DIVERGED, RunState.LOST, RunState.PREEMPTED})

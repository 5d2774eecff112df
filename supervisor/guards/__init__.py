"""Guards: pure functions `check(window, cfg) -> list[Action]`; the core carries actions out.

`run_guards` runs every enabled guard for one tick. Exit handling is separate: the core
calls `classify_exit` then `decide_relaunch` when the trainer exits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from supervisor.guards import divergence, host_ram, retention, stall, thermal, utilisation
from supervisor.guards.base import (
    TERMINAL_ACTIONS,
    WATCHED_STATES,
    Action,
    CaptureStacks,
    Fail,
    PruneCheckpoints,
    Relaunch,
    StopRun,
    Warn,
    Window,
)
from supervisor.guards.classify import ExitClass, classify_exit
from supervisor.guards.host_ram import prelaunch_host_ram
from supervisor.guards.relaunch import (
    backoff_delay,
    decide_relaunch,
    restarts_after,
    resume_target,
)

if TYPE_CHECKING:  # config types only: guards import no pydantic
    from supervisor.recipe import Guards

__all__ = [
    "Action", "CaptureStacks", "ExitClass", "Fail", "PruneCheckpoints", "Relaunch", "StopRun",
    "Warn", "Window", "backoff_delay", "classify_exit", "decide_relaunch",
    "prelaunch_host_ram", "restarts_after", "resume_target", "run_guards",
]


def _severity(a: Action) -> int:
    """Fail beats a DIVERGED stop beats other stops beats a relaunch."""
    if isinstance(a, Fail):
        return 0
    if isinstance(a, StopRun):
        return 1 if a.state.value == "diverged" else 2
    return 3


def run_guards(window: Window, guards: Guards) -> list[Action]:
    """All enabled guards for one tick; at most one Fail/StopRun/Relaunch (the most severe).

    Monitoring guards only run while a trainer is live (STARTING..SAVING); retention also
    runs after the run ends (the final prune pass).
    """
    actions: list[Action] = []
    if guards.checkpoints.enabled:
        actions += retention.check(window, guards.checkpoints)
    if window.state in WATCHED_STATES:
        if guards.thermal.enabled:
            actions += thermal.check(window, guards.thermal)
        if guards.host_ram.enabled:
            actions += host_ram.check(window, guards.host_ram)
        if guards.utilisation.enabled:
            actions += utilisation.check(window, guards.utilisation)
        if guards.divergence.enabled:
            actions += divergence.check(window, guards.divergence)
        if guards.stall.enabled:
            actions += stall.check(window, guards.stall, guards.crash)
    decisive = [a for a in actions if isinstance(a, TERMINAL_ACTIONS)]
    if len(decisive) > 1:
        keep = min(decisive, key=_severity)
        actions = [a for a in actions if not isinstance(a, TERMINAL_ACTIONS) or a is keep]
    return actions

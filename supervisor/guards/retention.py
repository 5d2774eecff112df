"""Checkpoint guard: retention (prune beyond keep) and disk headroom for the next save.

Stops gracefully while there is still room for the final save, rather than letting the
trainer die with ENOSPC half-way through writing a checkpoint.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from supervisor.checkpoints.plan import newest_complete_of, prune_plan
from supervisor.guards.base import (
    GIB,
    WATCHED_STATES,
    Action,
    PruneCheckpoints,
    StopRun,
    Window,
    gib,
    warn,
)
from supervisor.states import RunState

if TYPE_CHECKING:  # config types only: guards import no pydantic
    from supervisor.recipe import CheckpointGuard

GUARD = "checkpoints"


def check(window: Window, cfg: CheckpointGuard) -> list[Action]:
    """PruneCheckpoints beyond keep; Warn on low disk; StopRun before the disk fills."""
    infos = window.infos()
    actions: list[Action] = []
    plan = prune_plan(infos, window.keep_checkpoints, window.protected_checkpoints,
                      keep_best=cfg.keep_best, run_id=window.run_id)
    if plan:
        n_complete = sum(1 for i in infos if i.complete and not i.quarantined)
        freed = sum(i.size_bytes for i in plan)
        actions.append(PruneCheckpoints(
            names=[i.name for i in plan], guard=GUARD,
            reason=f"retention: keep {window.keep_checkpoints} complete checkpoints",
            evidence={"keep": window.keep_checkpoints, "complete": n_complete,
                      "names": [i.name for i in plan], "frees_bytes": freed,
                      "incomplete": [i.name for i in plan if not i.complete]}))
    else:
        freed = 0

    newest = newest_complete_of(infos)
    if window.state not in WATCHED_STATES or window.disk_free_bytes is None or newest is None:
        return actions
    need = newest.size_bytes
    if need <= 0:
        return actions
    free = window.disk_free_bytes + freed  # what the prune above will give back
    ev = {"disk_free_bytes": window.disk_free_bytes, "after_prune_bytes": free,
          "last_checkpoint": newest.name, "last_checkpoint_bytes": need,
          "min_free_gib": cfg.min_free_gib, "disk_headroom_factor": cfg.disk_headroom_factor}
    if free < need + cfg.min_free_gib * GIB:
        msg = (f"stopping before the disk fills: {gib(free)} free, next checkpoint needs ~{gib(need)} "
               f"(plus {cfg.min_free_gib:g} GB margin); free space, then resume from {newest.name}"
               + (f" (`qlora-watch resume {window.run_id}`)" if window.run_id else ""))
        actions.append(StopRun(guard=GUARD, reason="disk_low", state=RunState.STOPPED, graceful=True,
                               message=msg, evidence=ev, resume_hint=newest.target))
    elif free < need * cfg.disk_headroom_factor:
        msg = (f"disk space low: {gib(free)} free, {cfg.disk_headroom_factor:g} x the last checkpoint "
               f"({gib(need)}) wanted; the run will stop itself before a save could fail")
        actions += warn(window, GUARD, "checkpoints:disk_low", msg, ev)
    return actions

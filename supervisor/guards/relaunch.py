"""What to do after the trainer exited: next OOM rung, back-off relaunch, or fail.

Rungs are numbered as supervisor/ladder.py says (rung None: the recipe as written; rung 1:
the first change). Relaunch.rung is always the absolute rung to launch at. A rung that
changes adapter shapes (rank, target modules) cannot resume from the old checkpoints, so
that attempt starts fresh in a new output folder and the old checkpoints are kept.

Restart budget (RELIABILITY_PLAN design 7), defined once in `restarts_after`: the state's
`restarts` counts relaunches since the last progress (a new complete checkpoint of the run).
A crash relaunch waits min(backoff_base_s * 2**restarts, backoff_max_s); once restarts
reaches max_restarts the run FAILS with the last stderr lines.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from supervisor import ladder
from supervisor.checkpoints.plan import CheckpointInfo, newest_complete_of
from supervisor.guards.base import Action, Fail, Relaunch, Window
from supervisor.guards.classify import (
    COMPLETED,
    CONFIG_ERROR,
    CRASH,
    CUDA_OOM,
    DISK_FULL,
    GPU_LOST,
    HOST_OOM_KILL,
    STOPPED,
    ExitClass,
)

if TYPE_CHECKING:  # config types only: guards import no pydantic
    from supervisor.recipe import CrashGuard, Guards, Recipe

GUARD = "relaunch"
FAIL_TAIL = 20  # stderr lines quoted in a FAILED message
AS_WRITTEN = "the recipe as written"  # rung None, inside a sentence


def backoff_delay(restarts_since_progress: int, cfg: CrashGuard) -> float:
    """min(base * 2**n, max): 10, 20, 40 ... seconds with the defaults."""
    n = max(0, min(restarts_since_progress, 62))  # 2**63 overflows nothing in Python, but stays sane
    return float(min(cfg.backoff_base_s * (2 ** n), cfg.backoff_max_s))


def restarts_after(restarts: int, event: Literal["progress", "relaunch", "resume"], *,
                   rung_before: int | None = None, rung_after: int | None = None) -> int:
    """The restart budget's one definition: relaunches since the last progress.

    - "progress" (a new complete checkpoint of this run): 0;
    - "resume" (a person asked for the next attempt, `qlora-watch resume`): 0;
    - "relaunch" at the same rung (a crash, a stall, an OOM relaunched unchanged): +1;
    - "relaunch" at another rung: unchanged (the ladder is bounded by its own length).
    """
    if event in ("progress", "resume"):
        return 0
    return restarts + (1 if rung_after == rung_before else 0)


def resume_target(window: Window) -> CheckpointInfo | None:
    """The newest complete checkpoint of this run in the current output folder."""
    return newest_complete_of(window.infos(), run_id=window.run_id)


def _tail(exit_class: ExitClass) -> str:
    lines = [x for x in exit_class.stderr_tail if x.strip()][-FAIL_TAIL:]
    return ("\nlast stderr lines:\n" + "\n".join(lines)) if lines else ""


def _ev(exit_class: ExitClass, window: Window, **more: Any) -> dict[str, Any]:
    return {"exit_kind": exit_class.kind, "summary": exit_class.summary,
            "returncode": exit_class.returncode, "signal": exit_class.signal,
            "exception": exit_class.exception, "detail": exit_class.detail,
            "attempt": window.attempt, "rung": window.rung,
            "restarts_since_progress": window.restarts_since_progress, **more}


def _oom(exit_class: ExitClass, window: Window, recipe: Recipe, cfg: Guards) -> list[Action]:
    ladder_ = recipe.oom_ladder
    current = window.rung
    if not cfg.oom.enabled:
        return [Fail(GUARD, f"CUDA OOM (OOM ladder disabled): {exit_class.detail or exit_class.summary}",
                     _ev(exit_class, window))]
    if window.ladder_reach is None and ladder_:
        if recipe.trainer.oom_relaunch_unchanged:  # the user allowed it: same settings, crash budget
            return _retry(exit_class, window, cfg.crash, note="relaunching unchanged (the command "
                          "reads no ladder setting; oom_relaunch_unchanged is set)")
        return [Fail(GUARD, (f"CUDA OOM: {exit_class.detail or exit_class.summary}. The OOM ladder cannot "
                             "help: this command reads none of the settings a rung changes (no "
                             "{max_seq_len}-style placeholder, no axolotl config, no QLW_* variable "
                             "or effective_settings() in its script), so a relaunch would OOM again. "
                             "Make it read one (docs/trainer-protocol.md), or allow relaunching it "
                             "unchanged with --oom-relaunch-unchanged"),
                     _ev(exit_class, window, ladder_reach=None))]
    nxt = ladder.next_rung(recipe, current)
    if nxt is None:
        return [Fail(GUARD, (f"CUDA OOM at minimum settings ({ladder.label(current, AS_WRITTEN)}): "
                             f"{exit_class.detail or exit_class.summary}. The recipe cannot fit this "
                             "GPU; see `qlora-watch preflight` for what would fit"),
                     _ev(exit_class, window, ladder_len=len(ladder_)))]
    change = ladder.describe(recipe, nxt)
    fresh = ladder.changes_adapter_shape(ladder.change(recipe, nxt))
    ckpt = None if fresh else resume_target(window)
    if fresh:
        where = "a fresh start in a new output folder (adapter shape changes; old checkpoints kept)"
    elif ckpt:
        where = f"resuming from {ckpt.name}"
    else:
        where = "from scratch (no complete checkpoint yet)"
    msg = f"CUDA OOM at {ladder.label(current, AS_WRITTEN)}; relaunching at {ladder.label(nxt)} ({change}), {where}"
    return [Relaunch(guard=GUARD, reason=CUDA_OOM, rung=nxt,
                     resume_from=ckpt.target if ckpt else None, delay_s=0.0, fresh_output=fresh,
                     message=msg, evidence=_ev(exit_class, window, next_rung=nxt, change=change,
                                               resume_from=ckpt.name if ckpt else None))]


def _retry(exit_class: ExitClass, window: Window, cfg: CrashGuard, note: str = "") -> list[Action]:
    n = window.restarts_since_progress
    if not cfg.enabled:
        return [Fail(GUARD, f"{exit_class.summary} (automatic relaunch disabled){_tail(exit_class)}",
                     _ev(exit_class, window))]
    if n >= cfg.max_restarts:
        return [Fail(GUARD, (f"crash loop: {exit_class.summary}; {n} restarts without a new checkpoint "
                             f"(limit {cfg.max_restarts}){_tail(exit_class)}"),
                     _ev(exit_class, window, max_restarts=cfg.max_restarts))]
    delay = backoff_delay(n, cfg)
    ckpt = resume_target(window)
    where = f"from {ckpt.name}" if ckpt else "from scratch (no complete checkpoint yet)"
    msg = f"{exit_class.summary}; relaunching {where} in {delay:g} s (restart {n + 1} of {cfg.max_restarts})"
    msg += f"; {note}" if note else ""
    return [Relaunch(guard=GUARD, reason=exit_class.kind, rung=window.rung,
                     resume_from=ckpt.target if ckpt else None, delay_s=delay, fresh_output=False,
                     message=msg, evidence=_ev(exit_class, window, delay_s=delay,
                                               resume_from=ckpt.name if ckpt else None,
                                               confirmed=exit_class.confirmed))]


def decide_relaunch(exit_class: ExitClass, window: Window, recipe: Recipe,
                    cfg: Guards | None = None) -> list[Action]:
    """The actions after an exit: [] (completed/stopped), [Relaunch] or [Fail]. cfg: recipe.guards."""
    cfg = cfg or recipe.guards
    kind = exit_class.kind
    if kind in (COMPLETED, STOPPED):
        return []
    if kind == CUDA_OOM:
        return _oom(exit_class, window, recipe, cfg)
    if kind in (CRASH, HOST_OOM_KILL):
        return _retry(exit_class, window, cfg.crash)
    resume = f"`qlora-watch resume {window.run_id}`" if window.run_id else "`qlora-watch resume`"
    why = {CONFIG_ERROR: f"not retryable: fix the recipe, data or model path, then {resume} "
                         "(with --set for a recipe key)",
           DISK_FULL: f"not retryable: free disk space, then {resume}",
           GPU_LOST: f"not retryable: the GPU fell off the bus; reboot, then {resume}"}.get(kind, "not retryable")
    ckpt = resume_target(window)
    keep = f"; checkpoints kept (newest complete: {ckpt.name})" if ckpt else "; checkpoints kept"
    return [Fail(GUARD, f"{kind}: {exit_class.summary} ({why}){keep}{_tail(exit_class)}",
                 _ev(exit_class, window, resume_from=ckpt.name if ckpt else None))]

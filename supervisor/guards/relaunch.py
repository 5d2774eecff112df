"""What to do after the trainer exited: next OOM rung, back-off relaunch, or fail.

Rungs (the core's convention): rung None is the recipe as written; rung k applies
oom_ladder[0..k] in order (cumulative: rung 1 of the default ladder is seq 768 *and* r 8).
Relaunch.rung_index is always the absolute rung to launch at. apply_rung keeps the
effective batch. A rung that changes adapter shapes (rank, target modules) cannot resume
from the old checkpoints, so that attempt starts fresh in a new output folder and the old
checkpoints are kept.

Restart budget (RELIABILITY_PLAN design 7): `restarts_since_progress` counts relaunches
since the last progress, where progress = a complete checkpoint newer than the one the
attempt started from. The core keeps it:
  - at each exit: `restarts = restarts_after_exit(restarts, step_at_launch, newest_step_now)`
    (resets to 0 after progress), then builds the Window and calls decide_relaunch;
  - when it carries out a Relaunch (crash, stall or OOM): restarts += 1.
A crash relaunch waits min(backoff_base_s * 2**restarts, backoff_max_s); once restarts
reaches max_restarts the run FAILS with the last stderr lines.
"""

from __future__ import annotations

from typing import Any

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
from supervisor.recipe import (
    CrashGuard,
    Guards,
    Recipe,
    apply_rung,
    describe_rung,
    rung_changes_adapter_shape,
)

GUARD = "relaunch"
FAIL_TAIL = 20  # stderr lines quoted in a FAILED message


def backoff_delay(restarts_since_progress: int, cfg: CrashGuard) -> float:
    """min(base * 2**n, max): 10, 20, 40 ... seconds with the defaults."""
    n = max(0, min(restarts_since_progress, 62))  # 2**63 overflows nothing in Python, but stays sane
    return float(min(cfg.backoff_base_s * (2 ** n), cfg.backoff_max_s))


def restarts_after_exit(restarts_since_progress: int, step_at_launch: int | None,
                        newest_complete_step: int | None) -> int:
    """0 when a complete checkpoint newer than the attempt's start exists, else unchanged."""
    if newest_complete_step is not None and (step_at_launch is None or newest_complete_step > step_at_launch):
        return 0
    return restarts_since_progress


def resume_target(window: Window) -> CheckpointInfo | None:
    """The newest complete checkpoint of this run in the current output folder."""
    return newest_complete_of(window.infos(), run_id=window.run_id)


def effective_recipe(recipe: Recipe, rung_index: int | None) -> Recipe:
    """The recipe with oom_ladder[0..rung_index] applied in order (None: as written)."""
    out = recipe
    if rung_index is None:
        return out
    for rung in recipe.oom_ladder[: rung_index + 1]:
        out = apply_rung(out, rung)
    return out


def rung_label(rung_index: int | None) -> str:
    # a user reads "rung 1" for the first ladder change (oom_ladder[0]), as preflight says it
    return "the recipe as written" if rung_index is None else f"rung {rung_index + 1}"


def _tail(exit_class: ExitClass) -> str:
    lines = [x for x in exit_class.stderr_tail if x.strip()][-FAIL_TAIL:]
    return ("\nlast stderr lines:\n" + "\n".join(lines)) if lines else ""


def _ev(exit_class: ExitClass, window: Window, **more: Any) -> dict[str, Any]:
    return {"exit_kind": exit_class.kind, "summary": exit_class.summary,
            "returncode": exit_class.returncode, "signal": exit_class.signal,
            "exception": exit_class.exception, "detail": exit_class.detail,
            "attempt": window.attempt, "rung_index": window.rung_index,
            "restarts_since_progress": window.restarts_since_progress, **more}


def _oom(exit_class: ExitClass, window: Window, recipe: Recipe, cfg: Guards) -> list[Action]:
    ladder = recipe.oom_ladder
    current = window.rung_index
    if not cfg.oom.enabled:
        return [Fail(GUARD, f"CUDA OOM (OOM ladder disabled): {exit_class.detail or exit_class.summary}",
                     _ev(exit_class, window))]
    if window.ladder_reach is None and ladder:
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
    nxt = 0 if current is None else current + 1
    if nxt >= len(ladder):
        return [Fail(GUARD, (f"CUDA OOM at minimum settings ({rung_label(current)}): "
                             f"{exit_class.detail or exit_class.summary}. The recipe cannot fit this "
                             "GPU; see `qlora-watch preflight` for what would fit"),
                     _ev(exit_class, window, ladder_len=len(ladder)))]
    rung = ladder[nxt]
    change = describe_rung(effective_recipe(recipe, current), rung)
    fresh = rung_changes_adapter_shape(rung)
    ckpt = None if fresh else resume_target(window)
    if fresh:
        where = "a fresh start in a new output folder (adapter shape changes; old checkpoints kept)"
    elif ckpt:
        where = f"resuming from {ckpt.name}"
    else:
        where = "from scratch (no complete checkpoint yet)"
    msg = f"CUDA OOM at {rung_label(current)}; relaunching at {rung_label(nxt)} ({change}), {where}"
    return [Relaunch(guard=GUARD, reason=CUDA_OOM, rung_index=nxt,
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
    return [Relaunch(guard=GUARD, reason=exit_class.kind, rung_index=window.rung_index,
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

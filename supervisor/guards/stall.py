"""Stall guard: no progress for too long in a phase -> capture stacks, relaunch from the newest checkpoint.

The limits scale with the run: in training, max(step_factor x median logged-step interval,
floor_s); loading (model load, tokenising) and saving have their own fixed limits. A stall
relaunch spends the same restart budget as a crash (see relaunch.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from supervisor.guards.base import (
    LOADING_PHASES,
    Action,
    CaptureStacks,
    Fail,
    Relaunch,
    Window,
    median,
)
from supervisor.guards.relaunch import backoff_delay, resume_target

if TYPE_CHECKING:  # config types only: guards import no pydantic
    from supervisor.recipe import CrashGuard, StallGuard

GUARD = "stall"


def _limit(window: Window, cfg: StallGuard) -> tuple[float, float, dict[str, float | None]] | None:
    """(since, limit_s, evidence) for the current phase, or None when nothing to watch."""
    phase = window.phase
    if phase == "training":
        times = sorted(s.t for s in window.attempt_steps())
        med = median(b - a for a, b in zip(times, times[1:], strict=False) if b > a)
        limit = max(cfg.step_factor * med, cfg.floor_s) if med else cfg.floor_s
        marks = [t for t in (times[-1] if times else None, window.phase_since) if t is not None]
        if not marks:
            return None
        return max(marks), limit, {"median_step_interval_s": med, "last_step_t": times[-1] if times else None}
    dl = window.download_progress_t  # bytes arriving in the HF cache: loading makes progress
    if phase in LOADING_PHASES:
        since = window.phase_since
        if since is None:
            return None
        return max(since, dl or since), cfg.loading_s, {"download_progress_t": dl}
    if phase == "saving":
        return (window.phase_since, cfg.saving_s, {}) if window.phase_since is not None else None
    if phase is None and window.attempt_started_t is not None:
        # Launched but no phase event yet: the trainer is importing / loading.
        return max(window.attempt_started_t, dl or 0.0), cfg.loading_s, {"download_progress_t": dl}
    return None


def check(window: Window, cfg: StallGuard, crash: CrashGuard | None = None) -> list[Action]:
    """[CaptureStacks, Relaunch(same rung, newest complete)] when the phase made no progress in time."""
    got = _limit(window, cfg)
    if got is None:
        return []
    since, limit, extra = got
    idle = window.now - since
    if idle <= limit:
        return []
    phase = window.phase or "starting"
    ev = {"phase": phase, "idle_s": round(idle, 1), "limit_s": round(limit, 1), **extra,
          "restarts_since_progress": window.restarts_since_progress}
    what = f"no progress in {phase} for {idle / 60:,.1f} min (limit {limit / 60:,.1f} min)"
    actions: list[Action] = [CaptureStacks(guard=GUARD, evidence=ev)]
    if crash is not None and window.restarts_since_progress >= crash.max_restarts:
        actions.append(Fail(guard=GUARD, evidence=ev, message=(
            f"stalled: {what}, after {window.restarts_since_progress} restarts without a new "
            "checkpoint; not relaunching (see the captured stacks in the log)")))
        return actions
    ckpt = resume_target(window)
    delay = backoff_delay(window.restarts_since_progress, crash) if crash else 0.0
    ev["resume_from"] = ckpt.name if ckpt else None
    where = f"from {ckpt.name}" if ckpt else "from scratch (no complete checkpoint)"
    actions.append(Relaunch(guard=GUARD, reason="stall", rung=window.rung,
                            resume_from=ckpt.target if ckpt else None, delay_s=delay,
                            fresh_output=False, evidence=ev,
                            message=f"stalled: {what}; relaunching {where}"))
    return actions

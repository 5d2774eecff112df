"""Divergence guard: NaN/inf losses or a loss spike stop the run as DIVERGED.

Never relaunches: resuming would diverge again. It names the last complete checkpoint
saved before the first bad step, for a human to resume from with a lower learning rate.
The trainer must log with `logging_nan_inf_filter=False` (FIELD_NOTES 2), and grad_norm is
watched too because a NaN step can log loss 0.0.
"""

from __future__ import annotations

import math
from collections import deque
from typing import TYPE_CHECKING, Any

from supervisor.checkpoints.plan import newest_complete_of
from supervisor.guards.base import Action, StopRun, Window, median
from supervisor.numbers import is_finite
from supervisor.records import Step
from supervisor.states import RunState

if TYPE_CHECKING:  # config types only: guards import no pydantic
    from supervisor.recipe import DivergenceGuard

GUARD = "divergence"


def _bad(s: Step) -> str | None:
    """'NaN loss' / 'inf grad_norm' / None."""
    for name in ("loss", "grad_norm"):
        v = getattr(s, name)
        if v is not None and isinstance(v, (int, float)) and not math.isfinite(v):
            return f"{'NaN' if math.isnan(v) else 'inf'} {name}"
    return None


def _ordered(window: Window) -> list[Step]:
    """The current attempt's steps by step number; a repeated step keeps its last record."""
    by_step: dict[int, Step] = {}
    for s in window.attempt_steps():
        by_step[s.step] = s
    return [by_step[k] for k in sorted(by_step)]


def _stop(window: Window, first_bad: int, what: str, detail: str, ev: dict[str, Any]) -> list[Action]:
    ckpt = newest_complete_of(window.infos(), run_id=window.run_id, before_step=first_bad)
    if ckpt is not None:
        lr = "train.learning_rate=..."
        cmd = f"qlora-watch resume {window.run_id} --from {ckpt.name} --set {lr}" if window.run_id else ""
        hint = (f"resume from {ckpt.name} (before the {what} at step {first_bad}) with a lower learning rate"
                + (f": `{cmd}`" if cmd else ""))
    else:
        hint = f"no complete checkpoint before step {first_bad}: restart from scratch with a lower learning rate"
    ev = {**ev, "first_bad_step": first_bad, "resume_checkpoint": ckpt.name if ckpt else None}
    return [StopRun(guard=GUARD, reason="diverged", state=RunState.DIVERGED, graceful=False,
                    message=f"{detail}: the run diverged; {hint}", evidence=ev,
                    resume_hint=ckpt.target if ckpt else None)]


def check(window: Window, cfg: DivergenceGuard) -> list[Action]:
    """StopRun(DIVERGED) on nan_consecutive bad steps in a row, or a loss spike."""
    steps = _ordered(window)
    run: list[Step] = []
    for s in steps:
        if _bad(s):
            run.append(s)
            if len(run) >= cfg.nan_consecutive:
                first = run[0]
                what = (_bad(first) or "NaN").split()[0]
                detail = (f"{_bad(first)} for {len(run)} logged steps in a row from step {first.step}")
                ev = {"bad_steps": [x.step for x in run], "losses": [x.loss for x in run],
                      "grad_norms": [x.grad_norm for x in run], "nan_consecutive": cfg.nan_consecutive}
                return _stop(window, first.step, what, detail, ev)
        else:
            run = []

    recent: deque[float] = deque(maxlen=cfg.spike_window)  # previous finite losses, newest last
    for s in steps:
        if not is_finite(s.loss):
            continue
        if len(recent) == cfg.spike_window:  # else not enough history to call anything a spike
            med = median(recent)
            if med is not None and med > 0 and s.loss > cfg.spike_factor * med:  # type: ignore[operator]
                detail = (f"loss spiked to {s.loss:.4g} at step {s.step} ({s.loss / med:.1f}x the median "  # type: ignore[operator]
                          f"{med:.4g} of the previous {len(recent)} logged steps)")
                ev = {"step": s.step, "loss": s.loss, "median": med, "factor": s.loss / med,  # type: ignore[operator]
                      "spike_factor": cfg.spike_factor, "spike_window": cfg.spike_window}
                return _stop(window, s.step, "spike", detail, ev)
        recent.append(s.loss)  # type: ignore[arg-type]
    return []

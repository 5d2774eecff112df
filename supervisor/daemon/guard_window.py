"""Window assembly for the core: the one module here that reads the clock and the disk.

Guards stay pure; this adapter turns the supervisor's live state into a `Window`. It only
duck-types the supervisor (never imports the core) so the import direction stays
core -> guards.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from supervisor.checkpoints import folders as checkpoints
from supervisor.guards.base import GIB, Window
from supervisor.states import RunState

MAX_STEPS = 1000  # divergence needs ~spike_window, stall a median: a few hundred is plenty


def _float(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _disk_free(samples: list[Any], output_dir: Path) -> int | None:
    for s in reversed(samples[-5:]):
        free = getattr(s.host, "disk_free_gib", None)
        if free is not None:
            return int(free * GIB)
    try:
        return shutil.disk_usage(output_dir).free
    except OSError:
        return None


def _trainer_env(sup: Any) -> dict[str, str]:
    """The allocator settings the trainer runs with (only PYTORCH_*: no secrets in evidence)."""
    env = {k: v for k, v in os.environ.items() if k.startswith("PYTORCH_")}
    env.update({k: v for k, v in (sup.recipe.env or {}).items() if k.startswith("PYTORCH_")})
    return env


def _now(sup: Any, seen: list[float]) -> float:
    """The guards' "now" in the wall-clock frame of the run's timestamps, advanced by the
    monotonic clock: `clock_anchor` is (a wall timestamp the core just saw, time.monotonic()
    then), so idle times are monotonic and a wall-clock step (NTP, a resumed VM) neither
    fires the stall guard nor hides a real stall (RELIABILITY_PLAN D5)."""
    anchor = getattr(sup, "clock_anchor", None)
    if anchor:
        wall, mono = anchor
        return float(wall) + max(0.0, time.monotonic() - float(mono))
    return max([time.time()] + seen)


def window_from_supervisor(sup: Any) -> Window:
    """A Window of the run as the core sees it now."""
    st: dict[str, Any] = sup.state
    samples = list(sup.recent_samples)
    steps = list(sup.recent_steps[-MAX_STEPS:])
    now = _now(sup, [s.t for s in samples[-1:]] + [s.t for s in steps[-1:]])
    horizon = max(600.0, 1.5 * sup.recipe.guards.utilisation.window_s)
    samples = [s for s in samples if s.t >= now - horizon]
    try:
        out = Path(sup.attempts.output_dir())
    except Exception:  # noqa: BLE001 - no output dir yet: nothing to scan
        out = None
    infos = checkpoints.scan(out, include_quarantined=True, cached=True) if out else []
    try:
        state = sup.run_state
    except Exception:  # noqa: BLE001
        state = RunState.LOST
    estimate = (getattr(sup, "run_info", None) or {}).get("estimate")
    return Window(
        now=now,
        state=state,
        phase=st.get("phase"),
        phase_since=_float(st.get("phase_since")),
        samples=samples,
        steps=steps,
        attempt=int(st.get("attempt") or 1),
        rung=st.get("rung"),
        restarts_since_progress=int(st.get("restarts_since_progress") or 0),
        last_checkpoint_step=st.get("last_checkpoint_step"),
        last_progress_t=_float(st.get("last_progress_t")),
        attempt_started_t=_float(st.get("launched_at")),
        download_progress_t=_float((st.get("download") or {}).get("progress_t")),
        checkpoints=infos,
        keep_checkpoints=sup.recipe.train.save_total_limit,
        run_id=getattr(sup.store, "run_id", None),
        disk_free_bytes=_disk_free(samples, out) if out else None,
        estimate=estimate if isinstance(estimate, dict) else None,
        env=_trainer_env(sup),
        already_fired=getattr(sup.attempts, "fired", set()),
        ladder_reach=sup.attempts.ladder_reach() if hasattr(sup.attempts, "ladder_reach") else "recipe",
    )

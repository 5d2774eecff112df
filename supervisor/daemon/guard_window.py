"""The window the guards read, built on the core's side: the one place here that reads the
clock and the disk for them.

Guards stay pure (`guards/` imports neither this module nor the core); `build_window` turns
the core's live pieces, passed in one by one, into a `guards.base.Window`.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from supervisor.checkpoints import folders as checkpoints
from supervisor.guards.base import GIB, Window
from supervisor.records import Sample, Step
from supervisor.status import RunStatus

MAX_STEPS = 1000  # divergence needs ~spike_window, stall a median: a few hundred is plenty


class GuardClock:
    """The guards' "now" in the wall-clock frame of the run's timestamps, advanced by the
    monotonic clock: `mark(wall)` records a wall timestamp the core just saw and
    time.monotonic() then, so idle times are monotonic and a wall-clock step (NTP, a resumed
    VM) neither fires the stall guard nor hides a real stall (RELIABILITY_PLAN D5)."""

    def __init__(self, anchor: tuple[float, float] | None = None) -> None:
        self.anchor = anchor  # (wall seen, monotonic then)

    def mark(self, wall: float) -> None:
        self.anchor = (wall, time.monotonic())

    def now(self, seen: Iterable[float] = ()) -> float:
        if self.anchor:
            wall, mono = self.anchor
            return float(wall) + max(0.0, time.monotonic() - float(mono))
        return max([time.time(), *seen])


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


def trainer_env(recipe_env: Mapping[str, str] | None) -> dict[str, str]:
    """The allocator settings the trainer runs with (only PYTORCH_*: no secrets in evidence)."""
    env = {k: v for k, v in os.environ.items() if k.startswith("PYTORCH_")}
    env.update({k: v for k, v in (recipe_env or {}).items() if k.startswith("PYTORCH_")})
    return env


def build_window(*, status: RunStatus, recipe: Any, samples: list[Sample], steps: list[Step],
                 output_dir: Path | None, clock: GuardClock, run_id: str | None,
                 estimate: Any = None, fired: set[str] | None = None,
                 ladder_reach: str | None = "recipe") -> Window:
    """A Window of the run as the core sees it now (scans the output folder's checkpoints)."""
    samples = list(samples)
    steps = list(steps[-MAX_STEPS:])
    now = clock.now([s.t for s in samples[-1:]] + [s.t for s in steps[-1:]])
    horizon = max(600.0, 1.5 * recipe.guards.utilisation.window_s)
    samples = [s for s in samples if s.t >= now - horizon]
    infos = checkpoints.scan(output_dir, include_quarantined=True, cached=True) if output_dir else []
    return Window(
        now=now,
        state=status.run_state,
        phase=status.phase,
        phase_since=_float(status.phase_since),
        samples=samples,
        steps=steps,
        attempt=int(status.attempt or 1),
        rung=status.rung,
        restarts_since_progress=int(status.restarts_since_progress or 0),
        last_checkpoint_step=status.last_checkpoint_step,
        last_progress_t=_float(status.last_progress_t),
        attempt_started_t=_float(status.launched_at),
        download_progress_t=_float((status.download or {}).get("progress_t")),
        checkpoints=infos,
        keep_checkpoints=recipe.train.save_total_limit,
        run_id=run_id,
        disk_free_bytes=_disk_free(samples, output_dir) if output_dir else None,
        estimate=estimate if isinstance(estimate, dict) else None,
        env=trainer_env(recipe.env),
        already_fired=fired if fired is not None else set(),
        ladder_reach=ladder_reach,
    )

"""Thermal guard: warn about heat and thermal throttling, with its cost in tokens/s.

Only ever warns: qlora-watch never touches clocks, power limits or fans.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from supervisor.guards.base import Action, Window, mean, num, warn
from supervisor.numbers import is_finite
from supervisor.records import GpuSample, Sample

if TYPE_CHECKING:  # config types only: guards import no pydantic
    from supervisor.recipe import ThermalGuard

GUARD = "thermal"
# nvmlClocksEventReason bits (FIELD_NOTES 5): SwThermalSlowdown, HwThermalSlowdown.
THERMAL_BITS = 0x20 | 0x40


def _thermal_active(g: GpuSample) -> bool:
    if g.throttle_mask is not None and g.throttle_mask & THERMAL_BITS:
        return True
    return any("thermal" in r.lower() for r in g.throttle_reasons)


def _thermal_ns(g: GpuSample) -> int | None:
    """Sum of the cumulative thermal throttle-time counters, None if none reported."""
    vals = [v for k, v in g.throttle_counters.items() if "thermal" in k.lower() and v is not None]
    return sum(vals) if vals else None


def _series(samples: list[Sample], index: int) -> list[tuple[float, GpuSample]]:
    out = []
    for s in samples:
        for g in s.gpus:
            if g.index == index and not g.lost and g.this_run:
                out.append((s.t, g))
    return out


def _throttle_start(series: list[tuple[float, GpuSample]]) -> tuple[float | None, int]:
    """(when thermal throttling was first seen in the window, thermal ns accumulated over it)."""
    start: float | None = None
    prev_ns: int | None = None
    first_ns: int | None = None
    last_ns: int | None = None
    for t, g in series:
        ns = _thermal_ns(g)
        rose = ns is not None and prev_ns is not None and ns > prev_ns
        if start is None and (_thermal_active(g) or rose):
            start = t
        if ns is not None:
            first_ns = ns if first_ns is None else first_ns
            last_ns = ns
            prev_ns = ns
    return start, (last_ns - first_ns) if first_ns is not None and last_ns is not None else 0


def _speed_evidence(window: Window, start: float) -> tuple[str, dict[str, Any]]:
    """'; tokens/s fell 18 % (5,900 -> 4,840) while throttled' from the window's steps."""
    steps = window.attempt_steps()
    before = mean(s.tokens_per_s for s in steps if s.t < start)
    during = mean(s.tokens_per_s for s in steps if s.t >= start)
    if not (is_finite(before) and is_finite(during)) or not before:
        return "", {}
    drop = 100.0 * (before - during) / before
    ev = {"tokens_per_s_before": round(before, 1), "tokens_per_s_throttled": round(during, 1),
          "tokens_per_s_drop_pct": round(drop, 1)}
    verb = "fell" if drop >= 0 else "rose"
    return f"; tokens/s {verb} {abs(drop):.0f} % ({num(before)} -> {num(during)}) while throttled", ev


def check(window: Window, cfg: ThermalGuard) -> list[Action]:
    """Warn on low thermal margin, thermal clock-event reasons, or a hot hotspot."""
    latest = next((s for s in reversed(window.samples) if s.gpus), None)
    if latest is None:
        return []
    actions: list[Action] = []
    for g in latest.gpus:
        if g.lost or not g.this_run:  # another job's GPU is not this run's to warn about
            continue
        name = f"GPU {g.index}"
        base_ev: dict[str, Any] = {"gpu": g.index, "temp_c": g.temp_c, "margin_c": g.margin_c,
                                   "hotspot_c": g.hotspot_c, "sm_clock_mhz": g.sm_clock_mhz,
                                   "sm_clock_max_mhz": g.sm_clock_max_mhz}
        series = _series(window.samples, g.index)
        start, ns = _throttle_start(series)
        speed_msg, speed_ev = _speed_evidence(window, start) if start is not None else ("", {})

        if is_finite(g.margin_c) and g.margin_c < cfg.margin_c:  # type: ignore[operator]
            msg = (f"{name} is {g.margin_c:.0f} C from its slowdown temperature "
                   f"(warn under {cfg.margin_c:.0f} C; now {g.temp_c if g.temp_c is not None else 'n/a'} C)")
            actions += warn(window, GUARD, f"thermal:margin:{g.index}", msg + speed_msg,
                            {**base_ev, "threshold_margin_c": cfg.margin_c, **speed_ev})

        if start is not None:
            reasons = [r for r in g.throttle_reasons if "thermal" in r.lower()]
            clocks = ""
            if is_finite(g.sm_clock_mhz) and is_finite(g.sm_clock_max_mhz):
                clocks = f", SM clock {g.sm_clock_mhz:.0f}/{g.sm_clock_max_mhz:.0f} MHz"
            msg = f"{name} is thermally throttled ({', '.join(reasons) or 'thermal slowdown'}{clocks})"
            ev = {**base_ev, "throttle_mask": g.throttle_mask, "throttle_reasons": reasons,
                  "throttled_since": start, "thermal_throttle_s_in_window": round(ns / 1e9, 3), **speed_ev}
            actions += warn(window, GUARD, f"thermal:throttle:{g.index}", msg + speed_msg, ev)

        if is_finite(g.hotspot_c) and g.hotspot_c > cfg.hotspot_c:  # type: ignore[operator]
            msg = f"{name} hotspot at {g.hotspot_c:.0f} C (warn above {cfg.hotspot_c:.0f} C)"
            actions += warn(window, GUARD, f"thermal:hotspot:{g.index}", msg + speed_msg,
                            {**base_ev, "threshold_hotspot_c": cfg.hotspot_c, **speed_ev})
    return actions

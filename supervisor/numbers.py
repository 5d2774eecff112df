"""Numbers as they arrive and as a person reads them: one `num`, one `finite`, one wire form
for NaN and infinities, one `fmt_duration`, and the loss EMAs. Stdlib only: the core, the
store, the protocol, the report and the dashboard all use these.
"""

from __future__ import annotations

import math
from typing import Any

NA = "n/a"


def num(value: Any) -> float | None:
    """A float from a wire value: numbers, "NaN"/"Infinity" strings; None for None, bools and
    anything that is not a number."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, float):
        return value
    try:
        return float(value)  # ints, numeric strings (incl. "NaN", "Infinity"), numpy scalars
    except (TypeError, ValueError, OverflowError):
        return None


def finite(value: Any) -> float | None:
    """Like num() but None for NaN and infinities too."""
    x = num(value)
    return x if x is not None and math.isfinite(x) else None


def is_finite(x: Any) -> bool:
    """x is a real, finite number already (an int or float, not a string): the guards' test
    before comparing a reading."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def wire(value: float) -> float | str:
    """A float for JSON or SQLite, which have no NaN/inf (SQLite stores NaN as NULL): the
    non-finite ones as the strings "NaN", "Infinity", "-Infinity" (num() reads them back)."""
    if math.isfinite(value):
        return value
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


# ------------------------------------------------------------------------------ durations


def fmt_duration(seconds: Any, na: str = NA) -> str:
    """A compact duration for a terminal (dashboard, `status`, `ls`): 45s, 12m05s, 3h12m,
    2d04h; `na` when missing, not finite or negative (a clock that stepped back)."""
    x = finite(seconds)
    if x is None or x < 0:
        return na
    s = int(x)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def fmt_duration_words(seconds: Any, na: str = "-") -> str:
    """A duration in a sentence of the report, rounded to the minute: 42 s, 12 min, 1 h 02 min."""
    x = finite(seconds)
    if x is None:
        return na
    s = max(0.0, x)
    if s < 60:
        return f"{s:.0f} s"
    m = int(round(s / 60))
    if m < 60:
        return f"{m} min"
    return f"{m // 60} h {m % 60:02d} min"


# ------------------------------------------------------------------------------ loss EMAs
# Two, named for what they are: the dashboard's running one and TensorBoard's debiased one.


def ema_running(prev: float, value: Any, alpha: float) -> float:
    """One step of the dashboard's running EMA (prev NaN: nothing seen yet): the first finite
    value starts it; a non-finite value leaves it as it was."""
    x = finite(value)
    if x is None:
        return prev
    return x if math.isnan(prev) else prev + alpha * (x - prev)


def ema_debiased(values: list[Any], beta: float = 0.9) -> list[float | None]:
    """TensorBoard's smoothing (the report's "EMA 0.9"): debiased, so the first points are not
    pulled towards 0; non-finite values are skipped (None until the first finite one)."""
    out: list[float | None] = []
    acc, weight = 0.0, 0.0
    for v in values:
        f = finite(v)
        if f is not None:
            acc = beta * acc + (1 - beta) * f
            weight = beta * weight + (1 - beta)
        out.append(acc / weight if weight else None)
    return out

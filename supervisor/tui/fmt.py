"""Formatting for the dashboard: numbers, sizes, durations, bars, throttle reasons, colours."""

from __future__ import annotations

import math
from datetime import datetime, tzinfo
from typing import Any

from rich.text import Text

from supervisor.numbers import NA, finite, fmt_duration, num

__all__ = ["NA", "finite", "fmt_duration", "num"]  # the one definition each (supervisor/numbers.py)


def fmt_num(value: Any, digits: int = 0, unit: str = "") -> str:
    """A number with thousands separators, "n/a" when missing, "NaN"/"inf" when not finite."""
    x = num(value)
    if x is None:
        return NA
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:,.{digits}f}{unit}"


def fmt_sci(value: Any) -> str:
    """A small number such as a learning rate: 2.0e-04."""
    x = num(value)
    if x is None:
        return NA
    if not math.isfinite(x):
        return fmt_num(x)
    return f"{x:.1e}"


def fmt_loss(value: Any) -> str:
    """A loss value to four significant places."""
    x = num(value)
    if x is None or not math.isfinite(x):
        return fmt_num(x)
    return f"{x:.4g}" if abs(x) < 1000 else f"{x:,.0f}"


def fmt_gib(mib: Any, digits: int = 1) -> str:
    """MiB in, GiB (or TiB past 1024 GiB) out."""
    x = finite(mib)
    if x is None:
        return NA
    gib = x / 1024
    if abs(gib) >= 1024:
        return f"{gib / 1024:.{digits}f} TiB"
    return f"{gib:.{digits}f} GiB"


def fmt_clock(t: Any, tz: tzinfo | None) -> str:
    """Wall time of day (HH:MM:SS) in `tz` (None: the local zone)."""
    x = finite(t)
    if x is None:
        return "--:--:--"
    return datetime.fromtimestamp(x, tz).strftime("%H:%M:%S")


def bar(fraction: float | None, width: int, style: str = "green", empty: str = "grey30") -> Text:
    """A horizontal bar `width` cells wide, filled to `fraction` (half cells with ╸)."""
    width = max(0, width)
    text = Text()
    if fraction is None or not math.isfinite(fraction):
        return text.append("╌" * width, empty)
    halves = round(max(0.0, min(1.0, fraction)) * width * 2)
    full, half = divmod(halves, 2)
    text.append("━" * full, style)
    if half:
        text.append("╸", style)
    text.append("━" * (width - full - half), empty)
    return text


def level_style(fraction: float | None, warn: float = 0.85, bad: float = 0.95) -> str:
    """Green / yellow / red for a fill level."""
    if fraction is None:
        return "grey50"
    return "red" if fraction >= bad else "yellow" if fraction >= warn else "green"


STATE_STYLES = {
    "starting": "bold black on yellow",
    "loading": "bold black on yellow",
    "training": "bold black on green",
    "saving": "bold black on cyan",
    "backoff": "bold black on dark_orange",
    "stopping": "bold black on yellow",
    "completed": "bold white on blue",
    "stopped": "bold white on grey37",
    "failed": "bold white on red",
    "diverged": "bold white on red",
    "lost": "bold white on magenta",
}

LEVEL_STYLES = {"info": "cyan", "warning": "yellow", "error": "bold red"}
UNSEEN_STYLES = {"warning": "bold black on yellow", "error": "bold white on red"}

# NVML clock event reasons (FIELD_NOTES section 5), by bit and by name, in words.
_THROTTLE_BITS = [
    (0x1, "GpuIdle"),
    (0x2, "ApplicationsClocksSetting"),
    (0x4, "SwPowerCap"),
    (0x8, "HwSlowdown"),
    (0x10, "SyncBoost"),
    (0x20, "SwThermalSlowdown"),
    (0x40, "HwThermalSlowdown"),
    (0x80, "HwPowerBrakeSlowdown"),
    (0x100, "DisplayClockSetting"),
    (0x200, "BoardLimit"),
    (0x400, "Reliability"),
]
_THROTTLE_WORDS = {
    "gpuidle": "idle",
    "applicationsclockssetting": "application clocks",
    "swpowercap": "power cap",
    "hwslowdown": "HW slowdown",
    "syncboost": "sync boost",
    "swthermalslowdown": "thermal (driver)",
    "hwthermalslowdown": "thermal (HW)",
    "hwpowerbrakeslowdown": "power brake",
    "displayclocksetting": "display clock",
    "boardlimit": "board limit",
    "reliability": "reliability limit",
}
# Reasons that cost throughput; idle and clock settings are not a problem worth colouring.
_SERIOUS = {"hwslowdown", "swthermalslowdown", "hwthermalslowdown", "hwpowerbrakeslowdown"}


def _key(name: str) -> str:
    return "".join(c for c in name.lower() if c.isalnum()).removeprefix("clockseventreason")


def throttle_words(reasons: list[str] | None, mask: Any = None) -> list[tuple[str, bool]]:
    """Active throttle reasons as (words, serious) from the names, or the bitmask if no names."""
    names = list(reasons or [])
    m = num(mask)
    if not names and m is not None:
        names = [name for bit, name in _THROTTLE_BITS if int(m) & bit]
    out = []
    for name in names:
        key = _key(str(name))
        out.append((_THROTTLE_WORDS.get(key, str(name)), key in _SERIOUS))
    return out

"""Sizes in a unit that fits: `0.4 MB`, `12.3 GB`, `1.2 TB`, never `0.00 GB`.

Binary multiples (1 KB = 1024 bytes), as the rest of qlora-watch's GB figures are; one
decimal, or none for bytes.
"""

from __future__ import annotations

_UNITS = ("KB", "MB", "GB", "TB", "PB")


def size(n: float | None, na: str = "n/a") -> str:
    """Bytes in, a short size out; negative sizes keep their sign."""
    if n is None or n != n:
        return na
    sign = "-" if n < 0 else ""
    x = abs(float(n))
    if x < 1024:
        return f"{sign}{x:.0f} B"
    for unit in _UNITS:
        x /= 1024
        if x < 1024 or unit == _UNITS[-1]:
            if round(x, 1) >= 1024 and unit != _UNITS[-1]:  # 1023.97 MB reads 1.0 GB
                continue
            return f"{sign}{x:,.1f} {unit}"
    return f"{sign}{x:,.1f} {_UNITS[-1]}"  # not reached

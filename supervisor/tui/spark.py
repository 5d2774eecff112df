"""A Sparkline whose vertical scale can be pinned (0-100 % for util) and whose buckets keep
the minimum, the maximum or the mean: dips in utilisation matter, peaks in memory do."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from rich.color import Color as RichColor
from rich.style import Style
from rich.text import Text
from textual.app import RenderResult
from textual.widgets import Sparkline

from .downsample import bucket_max, bucket_mean, bucket_min

BUCKETS: dict[str, Callable[[Sequence[float], int], list[float]]] = {
    "max": bucket_max,
    "min": bucket_min,
    "mean": bucket_mean,
}

BARS = "▁▂▃▄▅▆▇█"


class PinnedSparkline(Sparkline):
    """One line of bars; `lo`/`hi` fix the scale (None: the data's own min/max)."""

    def __init__(
        self, lo: float | None = None, hi: float | None = None, keep: str = "max", **kw: object
    ) -> None:
        super().__init__([], **kw)  # type: ignore[arg-type]
        self.lo = lo
        self.hi = hi
        self.bucket = BUCKETS[keep]
        self.values: list[float] = []

    def set_history(self, values: list[float]) -> None:
        """Show `values` (newest last); bucketed by max to the width when drawn, if shown."""
        self.values = values
        self.refresh()

    def render(self) -> RenderResult:
        width = self.size.width
        data = self.bucket(self.values, width)
        if not data or not width:
            return Text("")
        lo = min(data) if self.lo is None else self.lo
        hi = max(data) if self.hi is None else self.hi
        extent = (hi - lo) or 1.0
        _, base = self.background_colors
        c_min = (base + self.get_component_styles("sparkline--min-color").color).rich_color
        c_max = (base + self.get_component_styles("sparkline--max-color").color).rich_color
        text = Text(" " * max(0, width - len(data)))
        for v in data[-width:]:
            r = min(1.0, max(0.0, (v - lo) / extent))
            text.append(BARS[min(7, int(r * 8))], Style(color=_blend(c_min, c_max, r)))
        return text


def _blend(a: RichColor, b: RichColor, r: float) -> RichColor:
    ta, tb = a.get_truecolor(), b.get_truecolor()
    return RichColor.from_rgb(*(ca + (cb - ca) * r for ca, cb in zip(ta, tb, strict=False)))

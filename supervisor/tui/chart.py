"""A line chart drawn with Textual itself: braille dots (2 x 4 per cell), y labels, x labels.

Replaces textual-plotext (unmaintained, pins plotext<6 and imports its private modules). It draws
what it is given: callers downsample first (downsample.minmax keeps each bucket's min and max).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from rich.style import Style
from rich.text import Text

BRAILLE_BASE = 0x2800
# Dot bits by (x within the cell 0-1, y within the cell 0-3, top first): the Unicode braille layout.
DOT_BITS = ((0x01, 0x02, 0x04, 0x40), (0x08, 0x10, 0x20, 0x80))
AXIS_STYLE = Style(color="grey50")


@dataclass
class Series:
    """One line: points in data coordinates and its colour (a later series wins a shared cell)."""

    xs: Sequence[float]
    ys: Sequence[float]
    color: str


def nice_ticks(lo: float, hi: float, n: int = 3) -> list[float]:
    """At least n round values inside [lo, hi] (1, 2 or 5 times a power of ten apart)."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or n < 2:
        return []
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / (n - 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = max(m * mag for m in (1, 2, 5) if m * mag <= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks, v = [], first
    while v <= hi + step * 1e-9:
        ticks.append(0.0 if abs(v) < step * 1e-9 else v)
        v += step
    return ticks


def tick_label(v: float, step: float, thousands: bool = False) -> str:
    """A tick's text with as many decimals as its step needs; with `thousands`, 12k."""
    if thousands and step >= 1000:
        return f"{v / 1000:g}k"
    decimals = max(0, -math.floor(math.log10(step))) if step > 0 else 2
    return f"{v:.{min(decimals, 4)}f}"


class BrailleCanvas:
    """A width x height grid of cells, each a 2 x 4 braille dot matrix with one colour."""

    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self.bits = [[0] * width for _ in range(height)]
        self.colors: list[list[str | None]] = [[None] * width for _ in range(height)]

    def dot(self, px: int, py: int, color: str) -> None:
        """Set the dot at pixel (px, py), py = 0 at the top."""
        cx, cy = px // 2, py // 4
        if 0 <= cx < self.width and 0 <= cy < self.height:
            self.bits[cy][cx] |= DOT_BITS[px % 2][py % 4]
            self.colors[cy][cx] = color

    def line(self, x0: int, y0: int, x1: int, y1: int, color: str) -> None:
        """Bresenham between two pixels, so a fall between samples reads as a line, not a gap."""
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err = dx + dy
        while True:
            self.dot(x0, y0, color)
            if x0 == x1 and y0 == y1:
                return
            e2 = 2 * err
            if e2 >= dy:
                err += dy
                x0 += sx
            if e2 <= dx:
                err += dx
                y0 += sy

    def row(self, cy: int) -> Text:
        """One row of cells as styled text (blank cells as spaces)."""
        t = Text(no_wrap=True)
        for cx in range(self.width):
            b = self.bits[cy][cx]
            t.append(chr(BRAILLE_BASE + b) if b else " ", self.colors[cy][cx] or "")
        return t


def render_chart(series: Sequence[Series], width: int, height: int) -> Text:
    """The chart as `height` lines of `width` cells: y labels left, x labels under the plot."""
    xs = [x for s in series for x, y in zip(s.xs, s.ys, strict=False) if math.isfinite(y)]
    ys = [y for s in series for y in s.ys if math.isfinite(y)]
    if not xs or width < 12 or height < 3:
        return Text("")
    x_lo, x_hi = min(xs), max(xs)
    y_lo, y_hi = min(ys), max(ys)
    if y_hi == y_lo:  # a flat line sits in the middle, not on the floor
        pad = abs(y_lo) * 0.05 or 1.0
        y_lo, y_hi = y_lo - pad, y_hi + pad
    yt = nice_ticks(y_lo, y_hi, 3)
    y_step = yt[1] - yt[0] if len(yt) > 1 else (y_hi - y_lo)
    labels = [tick_label(v, y_step) for v in yt]
    gutter = max(len(s) for s in labels) + 1
    plot_w, plot_h = width - gutter - 1, height - 1
    canvas = BrailleCanvas(plot_w, plot_h)
    pw, ph = plot_w * 2 - 1, plot_h * 4 - 1
    x_span = (x_hi - x_lo) or 1.0

    def px(x: float) -> int:
        return round((x - x_lo) / x_span * pw)

    def py(y: float) -> int:
        return round((y_hi - y) / (y_hi - y_lo) * ph)

    for s in series:
        prev: tuple[int, int] | None = None
        for x, y in zip(s.xs, s.ys, strict=False):
            if not math.isfinite(y):
                prev = None  # NaN: a gap
                continue
            p = (px(x), py(y))
            if prev is None:
                canvas.dot(*p, s.color)
            else:
                canvas.line(*prev, *p, s.color)
            prev = p
    # Each y tick's label goes on the row its value falls in.
    label_rows = {min(plot_h - 1, max(0, py(v) // 4)): lab for v, lab in zip(yt, labels, strict=False)}
    out = Text(no_wrap=True)
    for cy in range(plot_h):
        out.append(label_rows.get(cy, "").rjust(gutter - 1) + " ┤" if cy in label_rows else " " * gutter + "│",
                   AXIS_STYLE)
        out.append_text(canvas.row(cy))
        out.append("\n")
    out.append_text(x_axis(x_lo, x_hi, gutter, plot_w))
    return out


def x_axis(x_lo: float, x_hi: float, gutter: int, plot_w: int) -> Text:
    """The bottom line: a corner, then round step numbers at their columns."""
    line = [" "] * (gutter + 1 + plot_w)
    line[gutter] = "└"
    ticks = nice_ticks(x_lo, x_hi, max(3, min(6, plot_w // 10)))  # overlapping labels are skipped
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
    span = (x_hi - x_lo) or 1.0
    taken = gutter  # labels never overlap: each starts after the previous one ends
    thousands = max(abs(x_lo), abs(x_hi)) >= 10_000  # one style along the axis: 5k 10k 15k
    for v in ticks:
        lab = tick_label(v, max(step, 1.0), thousands)
        col = gutter + 1 + round((v - x_lo) / span * (plot_w - 1))
        start = min(col - len(lab) // 2, len(line) - len(lab))
        if start <= taken:
            continue
        line[start:start + len(lab)] = lab
        taken = start + len(lab)
    return Text("".join(line), AXIS_STYLE, no_wrap=True)

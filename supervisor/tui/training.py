"""Training panel: the loss over the whole run (raw and EMA), lr, grad norm, tokens/s."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult, RenderResult
from textual.containers import Horizontal, Vertical
from textual.widget import Widget
from textual.widgets import Static

from .chart import Series, render_chart
from .downsample import minmax, stride
from .fmt import fmt_loss, fmt_num, fmt_sci
from .model import RunModel
from .panel import STEPS, Panel
from .spark import PinnedSparkline

RAW_COLOR = "#5a6e8c"
EMA_COLOR = "#ffaa00"


class LossChart(Widget):
    """Raw loss as a min/max envelope and its EMA, downsampled to the width at render time."""

    def __init__(self, model: RunModel, **kw: Any) -> None:
        super().__init__(**kw)
        self.model = model
        self.points_drawn = 0  # points drawn last render, for tests and the bench
        self._cache: tuple[tuple[Any, ...], RenderResult] | None = None

    def render(self) -> RenderResult:
        if not self.model.step_x:
            return Text("no steps yet", "grey50")
        # Layout passes re-render every widget: draw again only when the steps or the size changed.
        key = (self.model.steps_version, self.size)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        result = self._draw()
        self._cache = (key, result)
        return result

    def _draw(self) -> RenderResult:
        m = self.model
        # Braille gives two dots per cell; a bucket keeps its min and max, so 20,000 steps
        # become about 2 x width points and a loss spike still shows.
        cells = max(8, self.size.width - 8)
        rx, ry = minmax(m.step_x, m.loss, cells)
        ex, ey = stride(m.step_x, m.ema, cells * 2)
        self.points_drawn = len(rx) + len(ex)
        return render_chart([Series(rx, ry, RAW_COLOR), Series(ex, ey, EMA_COLOR)],
                            self.size.width, self.size.height)


def stats_line(m: RunModel, width: int) -> Text:
    """The latest step's numbers (on two lines when narrow)."""
    st = m.last_step or {}
    t = Text("loss ")
    t.append(fmt_loss(st.get("loss")), "bold")
    t.append(" ema ")
    t.append(fmt_loss(m.ema[-1] if m.ema else None), "bold dark_orange")
    t.append("\nlr " if width < 56 else "  lr ")
    t.append(fmt_sci(st.get("lr")), "bold")
    t.append("  grad ")
    t.append(fmt_num(st.get("grad_norm"), 3), "bold")
    if width >= 56:  # narrow: the header already shows tokens/s
        t.append("  tok/s ")
        t.append(fmt_num(st.get("tokens_per_s")), "bold")
    return t


class TrainingPanel(Vertical, Panel):
    """Chart on top, the latest numbers, then history sparklines (hidden when short)."""

    WATCHES = frozenset({STEPS})

    def __init__(self, model: RunModel, **kw: Any) -> None:
        super().__init__(**kw)
        self.model = model

    def compose(self) -> ComposeResult:
        yield LossChart(self.model, id="loss-chart")
        yield Static(id="train-stats")
        # Grad-norm spikes and throughput dips are what to look for in a whole-run history.
        for name, lo, keep in (("lr", 0.0, "mean"), ("grad", None, "max"), ("tok/s", 0.0, "min")):
            with Horizontal(classes="train-spark-row"):
                yield Static(f"{name:<6}", classes="spark-label")
                yield PinnedSparkline(
                    lo, keep=keep, classes=f"spark train-spark spark-{name.replace('/', '')}"
                )

    def update_from(self) -> None:
        """Redraw chart, numbers and sparklines from the model."""
        m = self.model
        # The trainer logs every logging_steps steps: count steps, not logged points.
        self.border_title = f"Training · {int(m.step_x[-1]):,} steps" if m.step_x else "Training"
        self.border_subtitle = f"loss [{RAW_COLOR}]━[/] raw  [{EMA_COLOR}]━[/] EMA"
        self.query_one(LossChart).refresh()
        self.query_one("#train-stats", Static).update(stats_line(m, self.size.width))
        for cls, series in (
            (".spark-lr", m.lr),
            (".spark-grad", m.grad_norm),
            (".spark-toks", m.tokens_per_s),
        ):
            self.query_one(cls, PinnedSparkline).set_history(series)

"""GPU panel: one card per GPU with util and VRAM bars, history sparklines, thermals, clocks."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, VerticalScroll
from textual.widget import Widget
from textual.widgets import Static

from supervisor.sanitize import sanitize

from .fmt import NA, bar, finite, fmt_gib, fmt_num, level_style, throttle_words
from .model import RunModel
from .panel import SAMPLES, Panel
from .spark import PinnedSparkline

SPARK_WINDOW = 600  # samples of history behind each sparkline: 10 minutes at 1 Hz
BAR_CELLS = 12
COMPACT_BELOW = 50  # content width under which lines use short labels


def _temp(value: Any, warn: float, bad: float) -> Text:
    x = finite(value)
    if x is None:
        return Text(NA, "grey50")
    return Text(f"{x:.0f}°C", "red" if x >= bad else "yellow" if x >= warn else "")


def meter(label: str, frac: float | None, value: str, cells: int = BAR_CELLS) -> Text:
    """A meter row such as `util ━━━━━━━━━━╸━ 96%`: label, bar (coloured by level), value."""
    t = Text(f"{label:<5}", no_wrap=True, overflow="ellipsis")
    t.append_text(bar(frac, cells, level_style(frac, 0.9, 0.97) if label == "vram" else "green"))
    t.append(f" {value}")
    return t


def thermals(g: dict[str, Any], compact: bool) -> Text:
    """Core, hotspot, margin to slowdown, memory temperature."""
    t = Text("core ")
    t.append_text(_temp(g.get("temp_c"), 80, 87))
    t.append(" hot " if compact else "  hotspot ")
    t.append_text(_temp(g.get("hotspot_c"), 90, 97))
    margin = finite(g.get("margin_c"))
    t.append(" margin " if compact else "  margin ")
    t.append(
        NA if margin is None else f"{margin:.0f}°C",
        "grey50" if margin is None else "red" if margin <= 3 else "yellow" if margin <= 8 else "",
    )
    t.append(" mem " if compact else "  mem ")
    t.append_text(_temp(g.get("mem_temp_c"), 85, 92))
    return t


def hotspot_why(g: dict[str, Any]) -> Text:
    """Why the hotspot reads n/a (the driver's NVML does not report it), when it does."""
    if finite(g.get("hotspot_c")) is not None or not g.get("hotspot_reason"):
        return Text("")
    return Text(f"hotspot n/a: {sanitize(str(g['hotspot_reason']))}", "grey50")


def power_clocks(g: dict[str, Any]) -> Text:
    """Power against its limit, SM clock against its max."""
    t = Text("power ")
    t.append(f"{fmt_num(g.get('power_w'))}/{fmt_num(g.get('power_limit_w'))} W")
    clock, cmax = finite(g.get("sm_clock_mhz")), finite(g.get("sm_clock_max_mhz"))
    t.append("  SM ")
    slow = clock is not None and cmax and clock < 0.9 * cmax
    t.append(f"{fmt_num(clock)}/{fmt_num(cmax)} MHz", "yellow" if slow else "")
    return t


def throttle(g: dict[str, Any]) -> Text:
    """Active throttle reasons in words; serious ones (thermal, HW slowdown) in red."""
    words = throttle_words(g.get("throttle_reasons"), g.get("throttle_mask"))
    t = Text("throttle ")
    if not words:
        return t.append(
            "none" if g.get("throttle_mask") is not None or "throttle_reasons" in g else NA,
            "grey50",
        )
    for i, (w, serious) in enumerate(words):
        if i:
            t.append(", ")
        t.append(w, "bold red" if serious else "grey70")
    return t



def vram_value(used: float | None, total: float | None) -> str:
    """'14.2/24.0 GiB' on a card under 100 GiB (a rehearsed 24 GB one too), '97/140 GiB' above."""
    dg = 1 if total and total < 100 * 1024 else 0
    return f"{fmt_gib(used, dg).split()[0]}/{fmt_gib(total, dg)}"

class GpuCard(Widget):
    """One GPU: two meter rows with sparklines, then thermals, power and clocks, throttling."""

    def __init__(self, index: int, **kw: Any) -> None:
        super().__init__(id=f"gpu-{index}", classes="gpu-card panel", **kw)
        self.index = index
        self._last: tuple[dict[str, Any], list[float], list[float]] | None = None
        self._ready = False

    def compose(self) -> ComposeResult:
        with Horizontal(classes="meter-row"):
            yield Static(classes="meter util")
            yield PinnedSparkline(0, 100, keep="min", classes="spark util-spark")  # stalls show
        with Horizontal(classes="meter-row"):
            yield Static(classes="meter vram")
            yield PinnedSparkline(0, 100, classes="spark vram-spark")
        yield Static(classes="thermals")
        yield Static(classes="hotspot-why")
        yield Static(classes="power")
        yield Static(classes="throttle")

    def on_mount(self) -> None:
        self._ready = True
        if self._last is not None:
            self.show(*self._last)  # data that came while the card was being mounted

    def on_resize(self) -> None:
        if self._last is not None:
            self.show(*self._last)  # bars and labels depend on the width

    def show(self, g: dict[str, Any], util_hist: list[float], mem_hist: list[float]) -> None:
        """Update from the latest reading and the history."""
        self._last = (g, util_hist, mem_hist)
        if not self._ready:
            return
        name = sanitize(str(g.get("name") or "GPU"))
        title = f"GPU {self.index} · {name}" + ("  LOST" if g.get("lost") else "")
        if g.get("this_run") is False:  # outside CUDA_VISIBLE_DEVICES: shown, never guarded
            title += "  · not this run's"
        elif (finite(g.get("others_mem_mib")) or 0) >= 1:  # another job on the run's card
            title += f"  · others hold {fmt_gib(g.get('others_mem_mib'))}"
        self.border_title = title
        util = finite(g.get("util_pct"))
        used, total = finite(g.get("mem_used_mib")), finite(g.get("mem_total_mib"))
        vfrac = used / total if used is not None and total else None
        for cls, label, frac, value in (
            (".util", "util", None if util is None else util / 100, fmt_num(util, 0, "%")),
            (".vram", "vram", vfrac, vram_value(used, total)),
        ):
            widget = self.query_one(cls, Static)
            # The bar takes what the label and the value leave of the row.
            cells = widget.size.width - 6 - len(value) if widget.size.width else BAR_CELLS
            widget.update(meter(label, frac, value, max(6, min(cells, 40))))
        self.query_one(".util-spark", PinnedSparkline).set_history(util_hist[-SPARK_WINDOW:])
        self.query_one(".vram-spark", PinnedSparkline).set_history(mem_hist[-SPARK_WINDOW:])
        compact = self.size.width < COMPACT_BELOW
        self.query_one(".thermals", Static).update(thermals(g, compact))
        why, why_text = self.query_one(".hotspot-why", Static), hotspot_why(g)
        why.display = not compact and bool(why_text)
        why.update(why_text)
        self.query_one(".power", Static).update(power_clocks(g))
        self.query_one(".throttle", Static).update(throttle(g))


class GpuPanel(VerticalScroll, Panel):
    """All GPUs of the latest sample, or why there are none."""

    WATCHES = frozenset({SAMPLES})

    def __init__(self, model: RunModel, **kw: Any) -> None:
        super().__init__(**kw)
        self.model = model

    def compose(self) -> ComposeResult:
        yield Static("waiting for the first sample…", id="gpu-none")

    async def sync_cards(self) -> None:
        """Mount cards for the GPUs of the latest sample, awaited: the first frame is whole."""
        have = {c.index for c in self.query(GpuCard)}
        new = [
            GpuCard(int(g.get("index", 0)))
            for g in self.model.gpus
            if int(g.get("index", 0)) not in have
        ]
        if new:
            await self.mount_all(new)

    def update_from(self) -> None:
        """Add, update or remove cards to match the latest sample."""
        m = self.model
        gpus = m.gpus
        none = self.query_one("#gpu-none", Static)
        none.display = not gpus
        none.border_title = "GPU"
        if not gpus:
            nvml = m.nvml
            if nvml.startswith("unavailable"):
                none.update(Text(f"No GPU (NVML {sanitize(nvml)})", "yellow"))
            elif nvml == "lost":
                none.update(Text("No GPU readings: NVML lost the device", "red"))
            elif m.last_sample is not None:
                none.update(Text("No GPU in the latest sample", "yellow"))
        have = {c.index: c for c in self.query(GpuCard)}
        want = {int(g.get("index", 0)): g for g in gpus}
        for i, card in have.items():
            if i not in want:
                card.remove()
        for i in sorted(want):
            if i not in have:
                have[i] = GpuCard(i)
                self.mount(have[i])  # it shows the data below once mounted
        for i, g in want.items():
            have[i].show(g, m.gpu_util.get(i, []), m.gpu_mem.get(i, []))

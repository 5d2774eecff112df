"""Host panel: RAM against what the paged optimiser needs, swap, trainer RSS, disk."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Static

from .fmt import NA, finite, fmt_gib, fmt_num
from .model import RunModel
from .panel import SAMPLES, STATE, Panel
from .spark import PinnedSparkline

SPARK_WINDOW = 3600  # an hour of 1 Hz samples: slow leaks show, the last spike too

MIB = 1024 * 1024
COMPACT_BELOW = 60  # content width under which the lines use short labels


def _verdict(room: float | None, need: float, tight: float = 1.5) -> Text:
    """ok / tight / SHORT for `room` against `need` (same unit)."""
    if room is None:
        return Text("")
    if room < need:
        return Text(" SHORT", "bold red")
    # Under 1.5x the need, the next page-out or save may not fit: say so before it fails.
    return Text(" tight", "yellow") if room < tight * need else Text(" ok", "green")


def ram_line(h: dict[str, Any], need_mib: float | None, compact: bool) -> Text:
    """Available RAM (capped by the cgroup's room) against what the paged optimiser needs."""
    avail, total = finite(h.get("mem_available_mib")), finite(h.get("mem_total_mib"))
    limit, used = finite(h.get("cgroup_limit_mib")), finite(h.get("cgroup_used_mib"))
    room = avail
    if limit is not None and used is not None:
        room = limit - used if room is None else min(room, limit - used)
    t = Text("RAM  " if compact else "RAM   ")
    if compact:
        t.append(f"{fmt_gib(avail).split()[0]}/{fmt_gib(total)} free", "bold")
    else:
        t.append(fmt_gib(avail), "bold")
        t.append(f" free of {fmt_gib(total)}")
    if need_mib is not None:
        t.append(
            f"  need {fmt_gib(need_mib).split()[0]}"
            if compact
            else f"   paged optimiser needs {fmt_gib(need_mib)}"
        )
        t.append_text(_verdict(room, need_mib))
    if limit is not None:
        t.append(
            f"\ncgroup {fmt_gib(used)}/{fmt_gib(limit)}"
            if compact
            else f"   cgroup {fmt_gib(used)} of {fmt_gib(limit)}"
        )
    return t


def swap_rss_line(h: dict[str, Any], compact: bool) -> Text:
    """Swap in use (any at all slows a training box) and the trainer tree's RSS (+ managed memory)."""
    swap = finite(h.get("swap_used_mib"))
    t = Text("swap " if compact else "swap  ")
    t.append(fmt_gib(swap), "yellow" if swap and swap > 1024 else "")
    t.append("  RSS " if compact else "    trainer RSS ")
    t.append(fmt_gib(h.get("trainer_rss_mib")), "bold")
    if finite(h.get("trainer_uvm_mib")) is not None:
        uvm = fmt_gib(h.get("trainer_uvm_mib"))
        t.append(f" +uvm {uvm.split()[0]}" if compact else f" (+uvm {uvm})")
    if h.get("trainer_partial"):
        t.append(" partial", "yellow")
    return t


def disk_line(h: dict[str, Any], next_ckpt_bytes: float | None, compact: bool,
              cache_bytes: float | None = None) -> Text:
    """Free disk against the next checkpoint's size (twice it: the old one goes after the new)."""
    free = finite(h.get("disk_free_gib"))
    t = Text("disk " if compact else "disk  ")
    t.append(fmt_gib(None if free is None else free * 1024), "bold")
    t.append(" free")
    if next_ckpt_bytes is not None:
        need_gib = next_ckpt_bytes / MIB / 1024
        t.append("  ckpt " if compact else "    next checkpoint ")
        t.append(fmt_gib(next_ckpt_bytes / MIB))
        t.append_text(_verdict(free, need_gib, tight=2.0))
    if cache_bytes:
        t.append("  wcache " if compact else "    weight cache ")
        t.append(fmt_gib(cache_bytes / MIB))
    return t


def cpu_line(h: dict[str, Any], compact: bool) -> Text:
    """CPU use and the kernel's OOM-kill count."""
    t = Text(f"{'cpu  ' if compact else 'cpu   '}{fmt_num(h.get('cpu_pct'), 0, '%')}")
    kills = finite(h.get("oom_kill_count"))
    t.append("  oom kills " if compact else "    kernel OOM kills ")
    t.append(NA if kills is None else str(int(kills)), "bold red" if kills else "")
    return t


class HostPanel(Vertical, Panel):
    """The host's headroom for this run, with RAM and RSS history when there is room."""

    WATCHES = frozenset({SAMPLES, STATE})  # the state holds what the run needs (RAM, next checkpoint)

    def __init__(self, model: RunModel, **kw: Any) -> None:
        super().__init__(**kw)
        self.model = model

    def compose(self) -> ComposeResult:
        yield Static("waiting for the first sample…", id="host-lines")
        # Lowest free RAM and highest RSS per cell: the moments that could end the run.
        for label, cls, keep in (("free", "spark-avail", "min"), ("RSS", "spark-rss", "max")):
            with Horizontal(classes="host-spark-row"):
                yield Static(f"{label:<6}", classes="spark-label")
                yield PinnedSparkline(0, keep=keep, classes=f"spark host-spark {cls}")

    def update_from(self) -> None:
        """Redraw from the latest sample and state."""
        m = self.model
        if m.last_sample is None:
            return
        h, compact = m.host, self.size.width < COMPACT_BELOW + 4
        lines = [
            ram_line(h, m.host_ram_needed_mib, compact),
            swap_rss_line(h, compact),
            disk_line(h, m.next_checkpoint_bytes, compact,
                      finite((m.state.get("weight_cache") or {}).get("bytes"))),
            cpu_line(h, compact),
        ]
        self.query_one("#host-lines", Static).update(Text("\n").join(lines))
        avail = self.query_one(".spark-avail", PinnedSparkline)
        avail.hi = finite(h.get("mem_total_mib"))
        avail.set_history(m.host_avail[-SPARK_WINDOW:])
        self.query_one(".spark-rss", PinnedSparkline).set_history(m.host_rss[-SPARK_WINDOW:])

    def on_resize(self) -> None:
        self.update_from()

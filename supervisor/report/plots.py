"""The report's plots: matplotlib (Agg backend), one PNG per figure, timelines aligned.

Timeline plots share one x range (time since the run started) and carry the same numbered
event lines as the events table; throttle periods are shaded (red thermal, amber power).
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Callable

from supervisor.numbers import ema_debiased, finite
from supervisor.records import EventKind
from supervisor.report.data import RunData, marked_events, throttle_periods

MAX_POINTS = 3000  # longer series are averaged in buckets: a day at 1 Hz is 86,400 samples
EVENT_COLOURS = {EventKind.GUARD_FIRED: "#d97706", EventKind.RELAUNCH_SCHEDULED: "#dc2626",
                 EventKind.LAUNCHED: "#16a34a", EventKind.TRAINING_FINISHED: "#2563eb"}
THROTTLE_COLOURS = {"thermal": "#ef4444", "power": "#f59e0b"}


# ------------------------------------------------------------------------------ plotting


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display, ever (the report runs over ssh)
    import matplotlib.pyplot as plt

    return plt


def _thin(xs: list[float], ys: list[float | None]) -> tuple[Any, Any]:
    """Bucket means when longer than MAX_POINTS; None becomes NaN (a gap in the line)."""
    import numpy as np

    x = np.asarray(xs, dtype=float)
    y = np.asarray([np.nan if v is None else v for v in ys], dtype=float)
    if len(x) <= MAX_POINTS:
        return x, y
    k = math.ceil(len(x) / MAX_POINTS)
    n = len(x) // k * k
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN buckets stay NaN
            return x[:n].reshape(-1, k).mean(axis=1), np.nanmean(y[:n].reshape(-1, k), axis=1)


class Timeline:
    """Wall time -> x in minutes or hours since the run started."""

    def __init__(self, run: RunData):
        self.t0 = run.t0
        span = max(run.t_end - run.t0, 1.0)
        self.scale, self.label = (60.0, "minutes since start") if span < 3 * 3600 else (3600.0, "hours since start")

    def x(self, t: float) -> float:
        return (t - self.t0) / self.scale


def _mark_events(ax: Any, run: RunData, tl: Timeline, numbers: dict[int, int], label: bool = True) -> None:
    """Vertical lines for marked events; labels are their numbers in the events table, and
    events too close to tell apart share one label ('2-4')."""
    import matplotlib.transforms as mtrans

    trans = mtrans.blended_transform_factory(ax.transData, ax.transAxes)
    near = (tl.x(run.t_end) - tl.x(run.t0)) * 0.012
    groups: list[list[tuple[float, int, str]]] = []
    for e in marked_events(run.events):
        colour = EVENT_COLOURS.get(e.kind, "#6b7280" if e.level == "info" else "#dc2626")
        x = tl.x(e.t)
        ax.axvline(x, color=colour, lw=0.9, ls="--", alpha=0.8)
        if groups and x - groups[-1][0][0] <= near:
            groups[-1].append((x, numbers.get(id(e), 0), colour))
        else:
            groups.append([(x, numbers.get(id(e), 0), colour)])
    if not label:
        return
    for g in groups:
        text = str(g[0][1]) if len(g) == 1 else f"{g[0][1]}-{g[-1][1]}"
        colour = next((c for _x, _n, c in g if c == EVENT_COLOURS["relaunch"]), g[0][2])
        ax.text(g[0][0], 1.01, text, transform=trans, color=colour, fontsize=7, ha="center", va="bottom",
                clip_on=False)


def _shade_throttle(ax: Any, periods: list[tuple[float, float, str]], tl: Timeline) -> None:
    for start, end, kind in periods:
        ax.axvspan(tl.x(start), tl.x(end), color=THROTTLE_COLOURS[kind], alpha=0.15, lw=0)


def _save(fig: Any, path: Path) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    _plt().close(fig)
    data = buf.getvalue()
    path.write_bytes(data)
    return data


def _series(run: RunData, tl: Timeline, get: Callable[[dict[str, Any]], Any]) -> tuple[Any, Any]:
    """(x, y) of one sample field on the timeline, thinned."""
    return _thin([tl.x(s["t"]) for s in run.samples], [finite(get(s)) for s in run.samples])


def _gpu_indices(run: RunData) -> list[int]:
    return sorted({g.get("index", 0) for s in run.samples for g in s.get("gpus") or []})


def _gpu_get(i: int, key: str, scale: float = 1.0) -> Callable[[dict[str, Any]], Any]:
    def get(s: dict[str, Any]) -> Any:
        for g in s.get("gpus") or []:
            if g.get("index", 0) == i and not g.get("lost"):
                v = finite(g.get(key))
                return None if v is None else v * scale
        return None
    return get


def plot_loss(run: RunData, ax: Any, label_prefix: str = "") -> int:
    """Raw (faint) and EMA loss per lineage over steps; NaN losses as red x; returns NaN count."""
    nans = 0
    for lineage in sorted({s["lineage"] for s in run.steps}):
        rows = [s for s in run.steps if s["lineage"] == lineage]
        xs = [s["step"] for s in rows]
        ys = [finite(s["loss"]) for s in rows]
        name = f"{label_prefix}lineage {lineage}" if len({s['lineage'] for s in run.steps}) > 1 else label_prefix.strip(" :")
        style = {"marker": "o", "ms": 4} if len(xs) <= 3 else {}
        line = ax.plot(xs, ys, alpha=0.3, lw=0.8, **style)[0]
        ax.plot(xs, ema_debiased(ys), color=line.get_color(), lw=1.6, label=f"{name} EMA 0.9".strip(), **style)
        bad = [x for x, s in zip(xs, rows, strict=False) if s["loss"] is not None and finite(s["loss"]) is None]
        if bad:
            nans += len(bad)
            ax.plot(bad, [0.02] * len(bad), "x", color="#dc2626", transform=ax.get_xaxis_transform(),
                    label=f"{label_prefix}NaN/inf loss ({len(bad)})")
    return nans


def make_plots(run: RunData, out: Path) -> list[tuple[str, str, bytes | None, str]]:
    """(file name, title, PNG bytes or None, note) for each plot; None + note when no data."""
    plt = _plt()
    tl = Timeline(run)
    numbers = {id(e): i for i, e in enumerate(marked_events(run.events), start=1)}
    periods = throttle_periods(run.samples)
    plots: list[tuple[str, str, bytes | None, str]] = []

    def fig(rows: int = 1, cols: int = 1) -> tuple[Any, Any]:
        return plt.subplots(rows, cols, figsize=(11, 3.3 * rows), squeeze=False, layout="constrained")

    # Loss over steps, attempt starts marked.
    if run.steps:
        f, ax = fig()
        a = ax[0][0]
        plot_loss(run, a)
        for att in run.attempts[1:]:
            if att.steps:
                a.axvline(att.steps[0][1], color="#16a34a", ls=":", lw=1)
                a.text(att.steps[0][1], 1.01, f"attempt {att.n}", transform=a.get_xaxis_transform(),
                       fontsize=7, color="#16a34a", ha="center", va="bottom")
        a.set(xlabel="step", ylabel="loss")
        a.legend(loc="upper right", fontsize=8)
        plots.append(("loss.png", "Loss (raw and EMA-smoothed)", _save(f, out / "loss.png"), ""))
        f, ax = fig(1, 2)
        for a, key, name in ((ax[0][0], "lr", "learning rate"), (ax[0][1], "grad_norm", "grad norm")):
            xs = [s["step"] for s in run.steps]
            a.plot(xs, [finite(s[key]) for s in run.steps], lw=1.2, marker="o" if len(xs) <= 3 else None)
            a.set(xlabel="step", ylabel=name)
        plots.append(("optim.png", "Learning rate and grad norm", _save(f, out / "optim.png"), ""))
        f, ax = fig()
        a = ax[0][0]
        _shade_throttle(a, periods, tl)
        for att in run.attempts:  # one line per attempt: no line across a relaunch gap
            rows = att.rows or []
            x, y = _thin([tl.x(r["t"]) for r in rows], [finite(r.get("tokens_per_s")) for r in rows])
            a.plot(x, y, lw=1.2, color="#2563eb", marker="o" if len(x) <= 3 else None)
        _mark_events(a, run, tl, numbers)
        a.set(xlabel=tl.label, ylabel="tokens/s", ylim=(0, None))
        _retime(run, tl, (a,))
        plots.append(("throughput.png", "Tokens per second (throttling shaded)", _save(f, out / "throughput.png"), ""))
    else:
        plots.append(("loss.png", "Loss", None, "no training steps recorded"))

    gpus = _gpu_indices(run)
    if not gpus:
        why = next((s.get("nvml") for s in run.samples if s.get("nvml") not in (None, "ok")), None)
        note = "no GPU telemetry" + (f" ({why})" if why else "")
        plots.append(("gpu.png", "GPU", None, note))
    else:
        f, ax = fig()
        a = ax[0][0]
        b = a.twinx()
        for i in gpus:
            a.plot(*_series(run, tl, _gpu_get(i, "util_pct")), lw=1, label=f"GPU {i} utilisation")
            b.plot(*_series(run, tl, _gpu_get(i, "sm_clock_mhz")), lw=0.8, ls=":", color="#7c3aed",
                   label=f"GPU {i} SM clock")
        _shade_throttle(a, periods, tl)
        _mark_events(a, run, tl, numbers)
        a.set(xlabel=tl.label, ylabel="utilisation %", ylim=(0, 105))
        b.set(ylabel="SM clock MHz", ylim=(0, None))
        a.legend(handles=a.lines[:len(gpus)] + b.lines[:len(gpus)], loc="lower right", fontsize=8)
        _retime(run, tl, (a,))
        plots.append(("gpu_util.png", "GPU utilisation and SM clock", _save(f, out / "gpu_util.png"), ""))
        f, ax = fig()
        a = ax[0][0]
        _shade_throttle(a, periods, tl)
        for i in gpus:
            for key, name, ls in (("temp_c", "core", "-"), ("hotspot_c", "hotspot", "--"), ("mem_temp_c", "memory", ":")):
                x, y = _series(run, tl, _gpu_get(i, key))
                if not all(math.isnan(v) for v in y):
                    a.plot(x, y, lw=1, ls=ls, label=f"GPU {i} {name}")
        slow = next((finite(g.get("slowdown_c")) for s in run.samples for g in s.get("gpus") or []
                     if finite(g.get("slowdown_c")) is not None), None)
        if slow is not None:
            a.axhline(slow, color="#dc2626", lw=0.8, alpha=0.6, label=f"slowdown {slow:.0f} °C")
        _mark_events(a, run, tl, numbers)
        a.set(xlabel=tl.label, ylabel="°C")
        _retime(run, tl, (a,))
        a.legend(loc="lower right", fontsize=8, ncol=2)
        plots.append(("temps.png", "Temperatures (red: thermal throttling, amber: power throttling)",
                      _save(f, out / "temps.png"), ""))

    if run.samples:
        rows = 2 if gpus else 1
        f, ax = fig(rows, 1)
        if gpus:
            a = ax[0][0]
            for i in gpus:
                a.plot(*_series(run, tl, _gpu_get(i, "mem_used_mib", 1 / 1024)), lw=1, label=f"GPU {i} used")
                total = next((finite(g.get("mem_total_mib")) for s in run.samples for g in s.get("gpus") or []
                              if g.get("index", 0) == i and finite(g.get("mem_total_mib"))), None)
                if total:
                    a.axhline(total / 1024, ls="--", lw=0.8, color="#6b7280", label=f"GPU {i} total")
            _mark_events(a, run, tl, numbers)
            a.set(ylabel="VRAM GiB", ylim=(0, None))
            a.legend(loc="lower right", fontsize=8)
        a = ax[rows - 1][0]
        for key, name in (("mem_available_mib", "host available"), ("trainer_rss_mib", "trainer RSS"),
                          ("swap_used_mib", "swap used")):
            x, y = _series(run, tl, lambda s, k=key: (s.get("host") or {}).get(k))
            if not all(math.isnan(v) for v in y):
                a.plot(x, y / 1024, lw=1, label=name)
        _mark_events(a, run, tl, numbers, label=not gpus)
        a.set(xlabel=tl.label, ylabel="host RAM GiB", ylim=(0, None))
        a.legend(loc="lower right", fontsize=8)
        _retime(run, tl, [r[0] for r in ax])
        plots.append(("memory.png", "VRAM and host RAM", _save(f, out / "memory.png"), ""))
    else:
        plots.append(("memory.png", "Memory", None, "no telemetry samples recorded"))
    order = ("loss.png", "throughput.png", "temps.png", "gpu.png", "gpu_util.png", "memory.png", "optim.png")
    return sorted(plots, key=lambda p: order.index(p[0]))


def _retime(run: RunData, tl: Timeline, axes: Any) -> None:
    """Same x range on every timeline plot, so events line up across figures."""
    for a in axes:
        a.set_xlim(tl.x(run.t0), max(tl.x(run.t_end), tl.x(run.t0) + 1e-3))


def plot_compare(run: RunData, other: RunData, out: Path) -> bytes:
    """Loss over steps and tokens/s over time since start, both runs overlaid."""
    plt = _plt()
    f, ax = plt.subplots(1, 2, figsize=(11, 3.6), layout="constrained")
    plot_loss(run, ax[0], f"{run.run_id}: ")
    plot_loss(other, ax[0], f"{other.run_id}: ")
    ax[0].set(xlabel="step", ylabel="loss")
    ax[0].legend(fontsize=8)
    for r in (run, other):
        tl = Timeline(run)  # one scale for both runs
        colour = None
        for att in r.attempts:  # one line per attempt, one colour per run
            x, y = _thin([(s["t"] - r.t0) / tl.scale for s in att.rows],
                         [finite(s.get("tokens_per_s")) for s in att.rows])
            line = ax[1].plot(x, y, lw=1.1, color=colour, label=None if colour else r.run_id)[0]
            colour = line.get_color()
    ax[1].set(xlabel=Timeline(run).label, ylabel="tokens/s", ylim=(0, None))
    ax[1].legend(fontsize=8)
    return _save(f, out / "compare.png")

"""The report page: one self-contained HTML file, plots embedded as base64 PNG data URIs.

The PNGs are also written beside it. No script, no stylesheet link, no external URL: the
page opens offline and can be mailed as one file. Every run-supplied string is escaped.
"""

from __future__ import annotations

import base64
import json
import time
from datetime import datetime
from html import escape
from pathlib import Path
from typing import Any

from supervisor.numbers import fmt_duration_words
from supervisor.report.data import (
    ReportError,
    RunData,
    load_run,
    marked_events,
    recipe_diffs,
    recipe_table,
    summarize,
)
from supervisor.report.plots import make_plots, plot_compare
from supervisor.states import TERMINAL_VALUES

MAX_EVENT_ROWS = 2000
PLOT_FILES = ("loss.png", "optim.png", "throughput.png", "gpu_util.png", "temps.png", "memory.png", "compare.png")

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1140px;
color:#111827;padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #e5e7eb;
padding-bottom:4px}.sub{color:#6b7280;margin:0 0 16px}
table{border-collapse:collapse;margin:6px 0}td,th{border:1px solid #e5e7eb;padding:3px 8px;text-align:left;
vertical-align:top}th{background:#f9fafb;font-weight:600}td.num{text-align:right;font-variant-numeric:tabular-nums}
td.changed{background:#fef3c7;font-weight:600}.state{display:inline-block;padding:1px 8px;border-radius:9px;
color:#fff;font-weight:600}.completed{background:#16a34a}.failed,.diverged,.lost{background:#dc2626}
.stopped{background:#6b7280}.live{background:#2563eb}figure{margin:10px 0 18px}figcaption{color:#374151;
font-weight:600;margin-bottom:4px}img{max-width:100%;border:1px solid #e5e7eb}.note{color:#6b7280;
font-style:italic;padding:10px;border:1px dashed #d1d5db}.error{color:#b91c1c}.warning{color:#b45309}
code{font-size:12px}details summary{cursor:pointer;color:#2563eb}
"""


def fmt_num(v: Any, digits: int = 0, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and v != v:
        return "NaN"
    return f"{v:,.{digits}f}{unit}"


def fmt_time(t: float | None) -> str:
    return datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") if t else "-"


def _img(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _table(head: list[str], rows: list[list[str]], raw: bool = False) -> str:
    """A table; cells are escaped unless raw (then the caller escaped them)."""
    out = ["<table><tr>" + "".join(f"<th>{escape(h)}</th>" for h in head) + "</tr>"]
    for r in rows:
        cells = []
        for c in r:
            cls = ""
            if isinstance(c, tuple):  # (text, css class)
                c, cls = c
            cells.append(f"<td{f' class={chr(34)}{cls}{chr(34)}' if cls else ''}>{c if raw else escape(str(c))}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "".join(out) + "</table>"


def summary_rows(s: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value text) rows of the summary table."""
    wall = s["wall_s"]
    pct = f" ({100 * s['throttle_s'] / wall:.1f} % of wall time)" if wall and s["throttle_s"] else ""
    redone = (f" + {fmt_duration_words(s['relaunch_redone_s'])} of work redone from the last checkpoint"
              if s["relaunch_redone_s"] else "")
    steps = f"{s['step']}" + (f" / {s['max_steps']}" if s.get("max_steps") else "") if s["step"] is not None else "-"
    return [
        ("Outcome", f"{s['state']}" + (f": {s['message']}" if s["message"] else "")),
        ("Steps", steps),
        ("Wall time", fmt_duration_words(wall)),
        ("Attempts", str(s["attempts"])),
        ("Time lost to relaunches", f"{fmt_duration_words(s['relaunch_gap_s'])} between exit and the next first step{redone}"
         if s["relaunches"] else "none (no relaunch)"),
        ("Time throttled", f"{fmt_duration_words(s['throttle_s'])}{pct}: thermal {fmt_duration_words(s['throttle_thermal_s'])}, "
         f"power {fmt_duration_words(s['throttle_power_s'])}" if s["throttle_s"] else "none seen"),
        ("Tokens trained (final adapter)", fmt_num(s["tokens"])),
        ("Final loss", f"{fmt_num(s['final_loss'], 4)} (EMA {fmt_num(s['final_loss_ema'], 4)})"),
        ("NaN/inf losses", str(s["nan_losses"])),
        ("Median tokens/s", fmt_num(s["median_tokens_per_s"])),
        ("Peak VRAM", fmt_num(s["peak_vram_gib"], 1, " GiB")),
        ("Hottest GPU", f"core {fmt_num(s['max_temp_c'], 0, ' °C')}, hotspot {fmt_num(s['max_hotspot_c'], 0, ' °C')}"),
        ("Lowest host RAM available", fmt_num(s["min_host_available_gib"], 1, " GiB")),
        ("Adapter", s["adapter_path"] or "-"),
        ("Output folder", s["output_dir"] or "-"),
    ]


def _state_badge(state: str) -> str:
    cls = state if state in TERMINAL_VALUES else "live"
    return f'<span class="state {cls}">{escape(state)}</span>'


def attempts_section(run: RunData) -> str:
    """Exit table, recipe key values per attempt (changed cells highlighted) and the diffs."""
    if not run.attempts:
        return '<p class="note">no attempt records</p>'
    rows = []
    for a in run.attempts:
        span = f"{a.steps[0][1]}-{a.steps[-1][1]}" if a.steps else "-"
        how = a.exit_class or ("-" if a.returncode is None else f"exit {a.returncode}")
        rows.append([str(a.n), fmt_time(a.launched_t), fmt_time(a.exited_t), how, span,
                     f"checkpoint-{a.resume_step}" if a.resume_step else "fresh start", a.rung])
    out = [_table(["attempt", "launched", "exited", "exit", "steps", "started from", "ladder"], rows)]
    keys, recipes = recipe_table(run.attempts)
    if keys:
        body = []
        for k in keys:
            vals = [json.dumps(r.get(k), default=str) if isinstance(r.get(k), list) else str(r.get(k, "-"))
                    for r in recipes]
            changed = len(set(vals)) > 1
            body.append([k] + [(v, "changed") if changed and i and v != vals[i - 1] else v for i, v in enumerate(vals)])
        out.append("<p>Effective recipe of each attempt (what the trainer ran, from attempts/N/recipe.json):</p>")
        out.append(_table(["key"] + [f"attempt {a.n}" for a in run.attempts], body))
    diffs = recipe_diffs(run.attempts)
    if diffs:
        out.append("<p>Changes between attempts:</p><ul>" + "".join(f"<li><code>{escape(d)}</code></li>"
                                                                    for d in diffs) + "</ul>")
    return "".join(out)


def events_table(run: RunData, only_marked: bool) -> str:
    evs = marked_events(run.events) if only_marked else run.events[-MAX_EVENT_ROWS:]
    if not evs:
        return '<p class="note">no events</p>'
    numbers = {id(e): i for i, e in enumerate(marked_events(run.events), start=1)}
    rows = []
    for e in evs:
        level = f'<span class="{escape(e.level)}">{escape(e.level)}</span>'
        kind = escape(e.kind + (f" ({e.guard})" if e.guard and e.guard != e.kind else ""))
        rows.append([str(numbers.get(id(e), "")), escape(fmt_time(e.t)), escape(fmt_duration_words(e.t - run.t0)),
                     escape(str(e.attempt or "-")), level, kind, escape(e.message)])
    note = "" if only_marked or len(run.events) <= MAX_EVENT_ROWS else \
        f"<p class='note'>the last {MAX_EVENT_ROWS} of {len(run.events)} events</p>"
    return note + _table(["#", "time", "since start", "attempt", "level", "kind", "message"], rows, raw=True)


def write_report(run: RunData, out: Path, other: RunData | None = None, generated_at: float = 0.0) -> Path:
    """Plots + report.html in `out`; returns the HTML path."""
    for stale in PLOT_FILES:  # a reused folder must not list an old run's plots
        (out / stale).unlink(missing_ok=True)
    s = summarize(run)
    title = f"qlora-watch report: {run.run_id}"
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{escape(title)}</title>"
             f"<meta name='viewport' content='width=device-width'><style>{CSS}</style></head><body>",
             f"<h1>{escape(title)} {_state_badge(s['state'])}</h1>",
             f"<p class='sub'>recipe {escape(str(run.info.recipe or '-'))} · model "
             f"{escape(str(run.info.model or '-'))} · started {escape(fmt_time(run.t0))} · "
             f"report generated {escape(fmt_time(generated_at))}</p>", "<h2>Summary</h2>"]
    if other is None:
        parts.append(_table(["", run.run_id], [[k, v] for k, v in summary_rows(s)]))
    else:
        o = dict(summary_rows(summarize(other)))
        parts.append(_table(["", run.run_id, other.run_id], [[k, v, o.get(k, "-")] for k, v in summary_rows(s)]))
    if s["relaunches"]:
        rows = [[str(r["attempt"]), fmt_duration_words(r["gap_s"]),
                 "-" if r["redone_steps"] is None else f"{r['redone_steps']} steps, {fmt_duration_words(r['redone_s'])}"]
                for r in s["relaunches"]]
        parts.append(_table(["relaunch to attempt", "exit -> first step", "work redone (since its checkpoint)"], rows))
    if other is not None:
        parts.append(f"<h2>Compared with {escape(other.run_id)}</h2>")
        parts.append(f"<figure><img alt='comparison' src='{_img(plot_compare(run, other, out))}'></figure>")
    parts.append("<h2>Timeline</h2><p class='sub'>Dashed lines are the numbered events below; shading is "
                 "GPU throttling (red thermal, amber power).</p>")
    for _name, caption, data, note in make_plots(run, out):
        body = f"<img alt='{escape(caption)}' src='{_img(data)}'>" if data else f"<div class='note'>{escape(note)}</div>"
        parts.append(f"<figure><figcaption>{escape(caption)}</figcaption>{body}</figure>")
    parts.append("<h2>Marked events</h2>" + events_table(run, only_marked=True))
    parts.append("<h2>Attempts and recipes</h2>" + attempts_section(run))
    parts.append(f"<h2>All events</h2><details><summary>{len(run.events)} events</summary>"
                 f"{events_table(run, only_marked=False)}</details>")
    pngs = sorted(p.name for p in out.glob("*.png"))
    parts.append(f"<p class='sub'>Plots also saved beside this page: {escape(', '.join(pngs))}. "
                 f"Run folder: <code>{escape(str(run.path))}</code></p></body></html>")
    path = out / "report.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------ entry points


def generate_report(run_dir: Path, out_dir: Path, compare_run_dir: Path | None = None) -> Path:
    """Write report.html and its PNG plots into out_dir; returns the HTML path."""
    run = load_run(Path(run_dir))
    other = load_run(Path(compare_run_dir)) if compare_run_dir is not None else None
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        return write_report(run, out_dir, other, generated_at=time.time())
    except OSError as e:
        raise ReportError(f"cannot write the report into {out_dir}: {e.strerror or e}") from None

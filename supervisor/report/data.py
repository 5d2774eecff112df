"""After the run: the numbers behind `qlora-watch report` (plots and HTML in report_html.py).

Reads a run folder through RunStore (every attempt's step rows, events, samples) and the
per-attempt files (recipe.json, exit.json) into a `RunData`, and sums up what the run cost: wall time, time lost to
relaunches (the gap from an attempt's exit to the next attempt's first step, plus the work
redone after resuming from an older checkpoint) and to throttling.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from supervisor import ladder
from supervisor.numbers import ema_debiased, finite
from supervisor.records import Event, EventKind
from supervisor.sinks.tbwriter import throttle_reasons
from supervisor.status import RunInfo, RunStatus
from supervisor.store import RunStore, continuous, read_json

# Recipe keys shown for every attempt (all keys that differ between attempts are shown too).
KEY_FIELDS = (
    "model.name", "model.attn_implementation", "quant.load_in_4bit", "quant.quant_type",
    "quant.double_quant", "lora.r", "lora.alpha", "lora.dropout", "lora.target_modules",
    "train.max_seq_len", "train.per_device_batch", "train.grad_accum", "train.learning_rate",
    "train.lr_scheduler", "train.optim", "train.num_epochs", "train.max_steps", "train.save_steps",
    "train.gradient_checkpointing", "train.packing", "hardware.emulate_vram_gib",
)
MARKED_KINDS = {EventKind.GUARD_FIRED, EventKind.RELAUNCH_SCHEDULED, EventKind.LAUNCHED, EventKind.RUN_FAILED,
                EventKind.CONFIG_REJECTED, EventKind.TRAINER_LOST, EventKind.STOP_SENT,
                EventKind.TRAINING_FINISHED}
CKPT_RE = re.compile(r"checkpoint-(\d+)")


class ReportError(Exception):
    """The folder is not a run, or the report cannot be written. Shown as is."""


@dataclass
class Attempt:
    """One launch of the trainer, from attempts/N/ and the run's events."""

    n: int
    recipe: dict[str, Any] = field(default_factory=dict)  # flattened key -> value
    launched_t: float | None = None
    exited_t: float | None = None
    returncode: int | None = None
    exit_class: str | None = None
    resume_step: int | None = None  # the checkpoint it resumed from (None: fresh start)
    rung: str = "base"  # its OOM-ladder rung, as ladder.label says it
    steps: list[tuple[float, int]] = field(default_factory=list)  # (t, step) of its rows
    rows: list[dict[str, Any]] = field(default_factory=list)  # its step records, none overwritten

    @property
    def first_step_t(self) -> float | None:
        """When its first step ended; steps before the first logged one are backed out at its pace."""
        if not self.rows:
            return self.steps[0][0] if self.steps else None
        r = self.rows[0]
        dt = finite(r.get("step_time_s"))
        unlogged = r["step"] - (self.resume_step or 0) - 1
        return r["t"] - (unlogged * dt if dt and dt > 0 and 0 < unlogged < 1000 else 0.0)


@dataclass
class RunData:
    """Everything the report shows about one run."""

    path: Path
    info: RunInfo  # run.json
    state: RunStatus  # state.json
    samples: list[dict[str, Any]]
    steps: list[dict[str, Any]]
    events: list[Event]
    attempts: list[Attempt]

    @property
    def run_id(self) -> str:
        return str(self.info.run_id or self.path.name)

    @property
    def t0(self) -> float:
        """Run start: creation time, else the earliest record."""
        ts = [t for t in (self.info.created_at,) if isinstance(t, (int, float))]
        ts += [x for x in (_first_t(self.samples), _first_t(self.steps)) if x is not None]
        ts += [e.t for e in self.events[:1]]
        return min(ts) if ts else 0.0

    @property
    def t_end(self) -> float:
        """The last record (sample, step, event or exit) of the run."""
        ts = [self.samples[-1]["t"]] if self.samples else []
        ts += [max(s["t"] for s in self.steps)] if self.steps else []
        ts += [max(e.t for e in self.events)] if self.events else []
        ts += [a.exited_t for a in self.attempts if a.exited_t]
        return max(ts) if ts else self.t0


def _first_t(rows: list[dict[str, Any]]) -> float | None:
    return min(r["t"] for r in rows) if rows else None


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"max_seq_len": 768}} -> {"train.max_seq_len": 768}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def load_attempts(store: RunStore, events: list[Event], steps: list[dict[str, Any]]) -> list[Attempt]:
    """Attempts from attempts/N/ (recipe, exit file), the run's events and its step rows."""
    root = store.path / "attempts"
    # an attempt is a folder the core launched into (it writes the attempt's recipe.json first); a
    # warm standby prepared for an attempt that never came leaves only its wrapper's files
    nums = sorted(int(p.name) for p in root.iterdir()
                  if p.name.isdigit() and (p / "recipe.json").is_file()) if root.is_dir() else []
    out = []
    for n in nums:
        d = store.attempt_dir(n)
        # its step rows from the store, which keeps every attempt's (written by Step.from_trainer)
        a = Attempt(n=n, recipe=flatten(read_json(d / "recipe.json") or {}),
                    rows=[s for s in steps if s.get("attempt") == n])
        ex = read_json(d / "exit.json") or {}
        a.launched_t, a.exited_t, a.returncode = ex.get("started_at"), ex.get("ended_at"), ex.get("returncode")
        for e in events:
            if e.attempt != n:  # the core records each event with the attempt current then
                continue
            if e.kind == EventKind.LAUNCHED:
                a.launched_t = a.launched_t or e.t
                m = CKPT_RE.search(str((e.evidence or {}).get("resume") or ""))
                a.resume_step = int(m.group(1)) if m else None
                a.rung = _launch_rung(e.evidence or {})
            elif e.kind == EventKind.TRAINER_EXITED:
                a.exited_t = a.exited_t or e.t
                a.exit_class = (e.evidence or {}).get("class")
        a.rows.sort(key=lambda r: r["t"])
        a.steps = [(r["t"], r["step"]) for r in a.rows]
        out.append(a)
    if not out and (store.path / "recipe.json").is_file():
        rows = sorted(steps, key=lambda r: r["t"])
        out.append(Attempt(n=1, recipe=flatten(read_json(store.path / "recipe.json") or {}), rows=rows,
                           steps=[(r["t"], r["step"]) for r in rows]))
    return out


def _launch_rung(evidence: dict[str, Any]) -> str:
    """The rung label of a launch event; events stored before one numbering have only the
    0-based index of oom_ladder under "rung"."""
    if isinstance(evidence.get("rung_label"), str):
        return evidence["rung_label"]
    rung = evidence.get("rung")
    return ladder.label(rung + 1 if isinstance(rung, int) and not isinstance(rung, bool) else None)


def load_run(run_dir: Path) -> RunData:
    """Read a run folder; raises ReportError when it is not one."""
    run_dir = Path(run_dir)
    if not (run_dir / "run.json").is_file() or not (run_dir / "db.sqlite").is_file():
        raise ReportError(f"{run_dir}: not a qlora-watch run folder (no run.json / db.sqlite)")
    store = RunStore(run_dir)
    try:
        events = store.events()
        steps = store.steps()  # every attempt's rows; the charts take one continuous line
        data = RunData(path=run_dir, info=store.run_info(), state=store.read_status(),
                       samples=sorted(store.samples(), key=lambda s: s["t"]), steps=continuous(steps),
                       events=events, attempts=load_attempts(store, events, steps))
    finally:
        store.close()
    return data


# ------------------------------------------------------------------------------ numbers


def throttle_kind(gpu: dict[str, Any]) -> str | None:
    """'thermal', 'power' or None for one GPU reading."""
    reasons = throttle_reasons(gpu)
    if not reasons:
        return None
    joined = " ".join(reasons).lower().replace(" ", "")
    mask = gpu.get("throttle_mask") or 0
    return "thermal" if "thermal" in joined or "hwslowdown" in joined or mask & 0x68 else "power"


def sample_intervals(samples: list[dict[str, Any]]) -> list[float]:
    """Seconds each sample stands for (to the next one), capped so a gap in sampling counts little."""
    ts = [s["t"] for s in samples]
    gaps = [b - a for a, b in zip(ts, ts[1:], strict=False) if b > a]
    if not gaps:
        return [0.0] * len(samples)
    cap = 3 * sorted(gaps)[len(gaps) // 2]
    return [min(max(b - a, 0.0), cap) for a, b in zip(ts, ts[1:], strict=False)] + [0.0]


def sample_throttle_kind(sample: dict[str, Any]) -> str | None:
    """'thermal', 'power' or None for one sample: thermal when any GPU (not lost) is thermal."""
    kinds = {throttle_kind(g) for g in sample.get("gpus") or [] if not g.get("lost")} - {None}
    return "thermal" if "thermal" in kinds else ("power" if kinds else None)


def throttle_periods(samples: list[dict[str, Any]]) -> list[tuple[float, float, str]]:
    """(start, end, kind) of runs of samples where some GPU was throttled; thermal wins over power."""
    periods: list[tuple[float, float, str]] = []
    dts = sample_intervals(samples)
    for s, dt in zip(samples, dts, strict=False):
        kind = sample_throttle_kind(s)
        if kind is None:
            continue
        end = s["t"] + max(dt, 1e-3)
        if periods and periods[-1][2] == kind and s["t"] - periods[-1][1] <= 1e-6:
            periods[-1] = (periods[-1][0], end, kind)
        else:
            periods.append((s["t"], end, kind))
    return periods


def relaunch_losses(attempts: list[Attempt]) -> list[dict[str, Any]]:
    """Per relaunch: the idle gap (exit -> next first step) and the work redone after resuming."""
    out = []
    for prev, cur in zip(attempts, attempts[1:], strict=False):
        row: dict[str, Any] = {"attempt": cur.n, "gap_s": None, "redone_s": None, "redone_steps": None}
        if prev.exited_t is not None and cur.first_step_t is not None:
            row["gap_s"] = max(0.0, cur.first_step_t - prev.exited_t)
        if prev.steps and prev.exited_t is not None:
            k = cur.resume_step or 0
            before = [t for t, s in prev.steps if s <= k]
            since = before[-1] if before else prev.steps[0][0]
            row["redone_s"] = max(0.0, prev.exited_t - since)
            row["redone_steps"] = max(0, prev.steps[-1][1] - max(k, prev.steps[0][1] - 1))
        out.append(row)
    return out


def _last_lineage(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if not steps:
        return []
    last = max(s["lineage"] for s in steps)
    return [s for s in steps if s["lineage"] == last]


def summarize(run: RunData) -> dict[str, Any]:
    """The summary table's values (None where unknown)."""
    lineage = _last_lineage(run.steps)
    losses = [s["loss"] for s in lineage]
    final = next((f for f in (finite(x) for x in reversed(losses)) if f is not None), None)
    smooth = [x for x in ema_debiased(losses) if x is not None]
    tokens = [s["tokens"] for s in lineage if isinstance(s.get("tokens"), (int, float))]
    tps = sorted(f for f in (finite(s.get("tokens_per_s")) for s in run.steps) if f is not None)
    dts = sample_intervals(run.samples)
    throttled = {"thermal": 0.0, "power": 0.0}
    for s, dt in zip(run.samples, dts, strict=False):
        kind = sample_throttle_kind(s)
        if kind is not None:
            throttled[kind] += dt
    losses_r = relaunch_losses(run.attempts)
    vram = [finite(g.get("mem_used_mib")) for s in run.samples for g in s.get("gpus") or []]
    temps = [finite(g.get("temp_c")) for s in run.samples for g in s.get("gpus") or []]
    hot = [finite(g.get("hotspot_c")) for s in run.samples for g in s.get("gpus") or []]
    avail = [finite((s.get("host") or {}).get("mem_available_mib")) for s in run.samples]
    last = lineage[-1] if lineage else {}
    return {
        "state": run.state.state.value if run.state.state else "unknown",
        "message": run.state.message or "",
        "wall_s": run.t_end - run.t0 if (run.samples or run.steps or run.events) else None,
        "attempts": len(run.attempts),
        "relaunches": losses_r,
        "relaunch_gap_s": sum(r["gap_s"] or 0.0 for r in losses_r),
        "relaunch_redone_s": sum(r["redone_s"] or 0.0 for r in losses_r),
        "throttle_s": throttled["thermal"] + throttled["power"],
        "throttle_thermal_s": throttled["thermal"],
        "throttle_power_s": throttled["power"],
        "tokens": max(tokens) if tokens else None,
        "step": last.get("step"),
        "max_steps": last.get("max_steps"),
        "final_loss": final,
        "final_loss_ema": smooth[-1] if smooth else None,
        "nan_losses": sum(1 for s in run.steps if s["loss"] is not None and finite(s["loss"]) is None),
        "median_tokens_per_s": tps[len(tps) // 2] if tps else None,
        "peak_vram_gib": _scaled(_extreme(vram, max), 1 / 1024),
        "max_temp_c": _extreme(temps, max),
        "max_hotspot_c": _extreme(hot, max),
        "min_host_available_gib": _scaled(_extreme(avail, min), 1 / 1024),
        "adapter_path": run.state.adapter_path,
        "output_dir": run.info.output_dir,
    }


def _extreme(values: list[float | None], fn: Any) -> float | None:
    vals = [v for v in values if v is not None]
    return fn(vals) if vals else None


def _scaled(v: float | None, k: float) -> float | None:
    return None if v is None else v * k


def recipe_table(attempts: list[Attempt]) -> tuple[list[str], list[dict[str, Any]]]:
    """(keys, one flat recipe per attempt): the key fields, then every other key that changed."""
    recipes = [a.recipe for a in attempts]
    changed = sorted({k for r in recipes for k in r if len({json.dumps(x.get(k), sort_keys=True, default=str)
                                                             for x in recipes}) > 1} - {"oom_ladder"})
    keys = [k for k in KEY_FIELDS if any(k in r for r in recipes)]
    keys += [k for k in changed if k not in keys]
    for r in recipes:
        if "train.per_device_batch" in r and "train.grad_accum" in r:
            r.setdefault("train.effective_batch", r["train.per_device_batch"] * r["train.grad_accum"])
    if any("train.effective_batch" in r for r in recipes):
        keys.insert(keys.index("train.grad_accum") + 1 if "train.grad_accum" in keys else len(keys),
                    "train.effective_batch")
    return keys, recipes


def recipe_diffs(attempts: list[Attempt]) -> list[str]:
    """'attempt 2: train.max_seq_len 4096 -> 768' for each key that changed between attempts."""
    out = []
    for prev, cur in zip(attempts, attempts[1:], strict=False):
        for k in sorted(set(prev.recipe) | set(cur.recipe)):
            a, b = prev.recipe.get(k), cur.recipe.get(k)
            if k != "oom_ladder" and json.dumps(a, default=str) != json.dumps(b, default=str):
                out.append(f"attempt {cur.n}: {k} {_short(a)} -> {_short(b)}")
    return out


def _short(v: Any) -> str:
    return ",".join(map(str, v)) if isinstance(v, list) else str(v)


def marked_events(events: list[Event]) -> list[Event]:
    """Events drawn as vertical lines: guards, launches, relaunches, failures, stops."""
    out = []
    for e in events:
        if e.kind in MARKED_KINDS or (e.kind == EventKind.TRAINER_EXITED and e.level != "info"):
            out.append(e)
    return out

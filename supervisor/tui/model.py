"""The dashboard's model: plain Python lists fed by the snapshot and live messages.

Widgets read it on a timer; nothing here touches Textual, so appending is cheap at any rate.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from typing import Any

from supervisor.numbers import ema_running
from supervisor.sanitize import sanitize
from supervisor.status import RunInfo

from .fmt import finite, num
from .panel import ENDED, EVENTS, LOG, SAMPLES, STATE, STEPS, TOPICS

EMA_ALPHA = 0.05  # smoothing for the loss curve: about a 20-step window
SAMPLE_KEEP = 3600  # telemetry kept for the sparklines: an hour at 1 Hz (steps are all kept)
LOG_KEEP = 5000  # log lines kept for the full log view
WARN_LEVELS = ("warning", "error")


def _f0(x: Any) -> float:
    """A finite float or 0.0; the fast path is a plain float (most of 100,000s of readings)."""
    if x.__class__ is float and -math.inf < x < math.inf:
        return x  # type: ignore[no-any-return]
    return finite(x) or 0.0


def _pct(used: Any, total: Any) -> float:
    u, t = finite(used), finite(total)
    return 100.0 * u / t if u is not None and t else 0.0


def _ema_next(prev: float, loss: float) -> float:
    """The loss EMA after `loss` (numbers.ema_running: the dashboard's, not the report's debiased one)."""
    return ema_running(prev, loss, EMA_ALPHA)


def is_unseen(ev: dict[str, Any]) -> bool:
    """A warning or error nobody acknowledged."""
    return ev.get("level") in WARN_LEVELS and not ev.get("acked")


def _trim(series: list[float]) -> None:
    # Amortised: cut back to SAMPLE_KEEP only once the list has doubled.
    if len(series) > 2 * SAMPLE_KEEP:
        del series[:-SAMPLE_KEEP]


class RunModel:
    """Everything the dashboard shows, as series and latest values."""

    def __init__(self) -> None:
        self.run: dict[str, Any] = {}
        self.state: dict[str, Any] = {}
        self.last_sample: dict[str, Any] | None = None
        self.sample_t: list[float] = []
        self.gpu_util: dict[int, list[float]] = {}  # per GPU index, percent
        self.gpu_mem: dict[int, list[float]] = {}  # per GPU index, percent of total
        self.host_avail: list[float] = []  # MiB available (MemAvailable)
        self.host_rss: list[float] = []  # MiB, trainer tree RSS: a creeping line is a leak
        self.last_step: dict[str, Any] | None = None
        self.steps_version = 0  # bumped whenever the step series change: the chart caches on it
        self.step_x: list[float] = []
        self.loss: list[float] = []  # NaN where missing or not finite
        self.ema: list[float] = []
        self.lr: list[float] = []
        self.grad_norm: list[float] = []
        self.tokens_per_s: list[float] = []
        self.events: list[dict[str, Any]] = []
        self.log: deque[str] = deque(maxlen=LOG_KEEP)
        self.log_total = 0  # lines ever appended: the log panel writes only what is new
        self.ended: str | None = None  # the server said bye (reason), or the stream broke
        self.reconnecting: str | None = None  # the link dropped; why, while reconnecting
        self.applied = 0  # live messages applied, for the responsiveness bench
        self.changed: set[str] = set(TOPICS)  # what changed since take_changed() (panel.py topics)

    # ------------------------------------------------------------------ feeding

    def load_snapshot(self, snap: dict[str, Any]) -> None:
        """Take the attach snapshot: run, state and the history so far."""
        self.run = dict(snap.get("run") or {})
        self.state = dict(snap.get("state") or {})
        # Only the last SAMPLE_KEEP samples can show; a day of history is 86,400 of them.
        for sample in (snap.get("samples") or [])[-SAMPLE_KEEP:]:
            self._add_sample(sample)
        self._load_steps(snap.get("steps") or [])
        for event in snap.get("events") or []:
            self._add_event(event)
        self._add_log(snap.get("log") or [])
        self.changed |= TOPICS

    def apply(self, msg: dict[str, Any]) -> None:
        """Apply one live message from the supervisor."""
        kind = msg.get("type")
        if kind == "sample" and isinstance(msg.get("sample"), dict):
            self._add_sample(msg["sample"])
            self.changed.add(SAMPLES)
        elif kind == "step" and isinstance(msg.get("step"), dict):
            self._add_step(msg["step"], update_state=True)
            self.changed.add(STEPS)
        elif kind == "event" and isinstance(msg.get("event"), dict):
            self._add_event(msg["event"])
            self.changed.add(EVENTS)
        elif kind == "log":
            self._add_log(msg.get("lines") or [])
            self.changed.add(LOG)
        elif kind == "state" and isinstance(msg.get("state"), dict):
            self.state = dict(msg["state"])
            self.changed.add(STATE)
        elif kind == "acked":
            # Someone acknowledged (this client or another): clear the highlight everywhere.
            ids = msg.get("event_ids")
            self.mark_acked(list(ids) if isinstance(ids, list) else None)
        elif kind == "bye":
            self.ended = str(msg.get("reason") or "bye")
            self.changed.add(ENDED)
        self.applied += 1

    def take_changed(self) -> set[str]:
        """The topics (panel.py) that changed since the last call."""
        changed, self.changed = self.changed, set()
        return changed

    def _add_sample(self, s: dict[str, Any]) -> None:
        self.last_sample = s
        self.sample_t.append(num(s.get("t")) or 0.0)
        host = s.get("host") or {}
        self.host_avail.append(_f0(host.get("mem_available_mib")))
        self.host_rss.append(_f0(host.get("trainer_rss_mib")))
        _trim(self.sample_t), _trim(self.host_avail), _trim(self.host_rss)
        for g in s.get("gpus") or []:
            i = int(g.get("index", 0))
            util, mem = self.gpu_util.setdefault(i, []), self.gpu_mem.setdefault(i, [])
            util.append(_f0(g.get("util_pct")))
            mem.append(_pct(g.get("mem_used_mib"), g.get("mem_total_mib")))
            _trim(util), _trim(mem)

    def _load_steps(self, steps: list[dict[str, Any]]) -> None:
        """The snapshot's steps: in bulk when they only go up (the usual case), else one by one."""
        xs = [num(st.get("step")) for st in steps]
        if (
            not steps
            or None in xs
            or any(b <= a for a, b in zip(xs, xs[1:], strict=False))
            or (self.step_x and xs[0] <= self.step_x[-1])
        ):  # type: ignore[operator]
            for st in steps:
                self._add_step(st, update_state=False)
            return
        loss = [num(st.get("loss")) for st in steps]
        loss = [math.nan if x is None else x for x in loss]
        ema, prev = [], self.ema[-1] if self.ema else math.nan
        for x in loss:
            prev = _ema_next(prev, x)
            ema.append(prev)
        self.step_x += xs  # type: ignore[arg-type]
        self.loss += loss
        self.ema += ema
        self.lr += [_f0(st.get("lr")) for st in steps]
        self.grad_norm += [_f0(st.get("grad_norm")) for st in steps]
        self.tokens_per_s += [_f0(st.get("tokens_per_s")) for st in steps]
        self.last_step = steps[-1]
        self.steps_version += 1

    def _add_step(self, st: dict[str, Any], update_state: bool) -> None:
        x = num(st.get("step"))
        if x is None:
            return
        if self.step_x and x <= self.step_x[-1]:
            # A relaunch resumed from an earlier checkpoint: its steps replace the lost ones.
            cut = bisect.bisect_left(self.step_x, x)
            for series in (
                self.step_x,
                self.loss,
                self.ema,
                self.lr,
                self.grad_norm,
                self.tokens_per_s,
            ):
                del series[cut:]
        loss = num(st.get("loss"))
        loss = math.nan if loss is None else loss
        self.step_x.append(x)
        self.loss.append(loss)
        self.ema.append(_ema_next(self.ema[-1] if self.ema else math.nan, loss))
        self.lr.append(_f0(st.get("lr")))
        self.grad_norm.append(_f0(st.get("grad_norm")))
        self.tokens_per_s.append(_f0(st.get("tokens_per_s")))
        self.last_step = st
        self.steps_version += 1
        if update_state:
            # A step is newer than the last state message: the header follows it.
            self.state["step"] = st.get("step")
            self.state["last_loss"] = st.get("loss")
            if st.get("tokens_per_s") is not None:
                self.state["tokens_per_s"] = st["tokens_per_s"]
            if st.get("max_steps"):
                self.state["max_steps"] = st["max_steps"]

    def _add_event(self, ev: dict[str, Any]) -> None:
        eid = ev.get("id")
        if eid is not None:
            for i, old in enumerate(self.events):
                if old.get("id") == eid:
                    self.events[i] = ev  # an update of a known event (acked elsewhere)
                    return
        self.events.append(ev)

    def _add_log(self, lines: list[Any]) -> None:
        for line in lines:
            self.log.append(sanitize(str(line)))
        self.log_total += len(lines)

    # ------------------------------------------------------------------ reading

    def unseen(self) -> list[dict[str, Any]]:
        """Warnings and errors nobody has acknowledged yet."""
        return [e for e in self.events if is_unseen(e)]

    def mark_acked(self, ids: list[int] | None) -> None:
        """Mark events acknowledged locally (all unseen when `ids` is None)."""
        for e in self.events:
            if ids is None or e.get("id") in ids:
                e["acked"] = True
        self.changed.add(EVENTS)

    @property
    def gpus(self) -> list[dict[str, Any]]:
        """The latest sample's GPUs."""
        return list((self.last_sample or {}).get("gpus") or [])

    @property
    def host(self) -> dict[str, Any]:
        """The latest sample's host readings."""
        return dict((self.last_sample or {}).get("host") or {})

    @property
    def nvml(self) -> str:
        """The latest sample's NVML status: "ok", "unavailable: ...", "lost" ("" before any)."""
        return str((self.last_sample or {}).get("nvml") or "") if self.last_sample else ""

    @property
    def run_id(self) -> str:
        """The run id from the run or the state."""
        return str(self.run.get("run_id") or self.run.get("id") or self.state.get("run_id") or "?")

    @property
    def recipe(self) -> str:
        """The recipe's name (RunInfo reads early recordings' "recipe_name" too)."""
        return str(RunInfo.from_json(self.run).recipe or "")

    @property
    def host_ram_needed_mib(self) -> float | None:
        """What the trainer needs of host RAM: preflight's estimate in run.json (the state of a
        recorded run may carry it as host_ram_needed_mib)."""
        if self.state.get("host_ram_needed_mib") is not None:
            return finite(self.state.get("host_ram_needed_mib"))
        need = finite((RunInfo.from_json(self.run).estimate or {}).get("host_ram_needed_bytes"))
        return None if need is None else need / 2**20

    @property
    def next_checkpoint_bytes(self) -> float | None:
        """What the next save writes: the last complete checkpoint's size (recorded runs may
        carry next_checkpoint_bytes)."""
        return finite(self.state.get("next_checkpoint_bytes", self.state.get("last_checkpoint_bytes")))

"""Experiment trackers: where a run's steps and the supervisor's telemetry go (`train.report_to`).

TensorBoard: the trainer logs its steps (transformers' callback) and tbwriter.py adds the
supervisor's telemetry beside them. W&B and MLflow: the supervisor is the one writer of the
run. It already reads every attempt's steps, so an OOM relaunch or a resume continues ONE
tracker run (W&B run id = the run id, resume="allow"; MLflow: one run id kept in trackers.json),
and telemetry lands in the same run. wandb and mlflow are imported only when configured, and
in a worker thread: a slow tracker never stalls supervision, and a broken one turns itself off.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from supervisor.extras import installed
from supervisor.numbers import finite
from supervisor.records import Event, EventKind, Sample, Step
from supervisor.redact import redact, redact_argv
from supervisor.sinks.bgqueue import close_worker
from supervisor.sinks.tbwriter import TelemetryTB, sample_scalars, system_logdir
from supervisor.store import atomic_write, read_json

log = logging.getLogger("qlora-watch.trackers")

IDS_FILE = "trackers.json"  # in the run folder: {"mlflow_run_id": ...}, written once
OPEN_TIMEOUT_S = 60.0  # how long the first launch waits for the trackers to open
QUEUE_MAX = 10_000  # metric batches waiting; beyond that telemetry is dropped, never steps blocked
STEP_METRIC = "train/global_step"
# The names transformers' callbacks use, so a run looks the same as one logged by the Trainer.
STEP_KEYS = {"loss": "train/loss", "grad_norm": "train/grad_norm", "lr": "train/learning_rate",
             "epoch": "train/epoch", "tokens_per_s": "train/tokens_per_s",
             "step_time_s": "train/step_time_s", "tokens": "train/num_input_tokens_seen"}


def trainer_env(report_to: list[str], run_id: str, run_dir: Path) -> dict[str, str]:
    """Environment for every attempt: the ids under which a script's own tracker calls continue
    the same run. The built-in trainer leaves W&B and MLflow to the supervisor."""
    env: dict[str, str] = {}
    if "wandb" in report_to:
        env.update(WANDB_RUN_ID=run_id, WANDB_RESUME="allow")
    known = (read_json(run_dir / IDS_FILE) or {}).get("mlflow_run_id")
    if "mlflow" in report_to and known:
        env["MLFLOW_RUN_ID"] = str(known)
    return env


def tracker_config(recipe: Any) -> dict[str, Any]:
    """The recipe as the tracker's run config, secrets out: apprise URLs carry tokens (only
    their number is logged) and a trainer command's arguments are redacted."""
    cfg = recipe.model_dump(mode="json")
    cfg["notify"]["urls"] = len(cfg["notify"]["urls"])
    if cfg["trainer"].get("command"):
        cfg["trainer"]["command"] = redact_argv(cfg["trainer"]["command"])
    cfg["env"] = {k: redact(v) for k, v in cfg["env"].items()}
    return cfg


def step_metrics(st: Step) -> dict[str, float]:
    out = {STEP_METRIC: float(st.step), "qlw/attempt": float(st.attempt)}
    for field, key in STEP_KEYS.items():
        v = finite(getattr(st, field))
        if v is not None:
            out[key] = v
    return out


class Backend:
    """One tracker's client calls, all made on the worker thread."""

    def open(self) -> None: ...

    def log(self, metrics: dict[str, float], step: int, t: float) -> None: ...

    def text(self, line: str, step: int, t: float) -> None: ...

    def close(self) -> None: ...


class WandbBackend(Backend):
    def __init__(self, run_id: str, out_dir: Path, config: dict[str, Any]) -> None:
        self.run_id, self.out_dir, self.config = run_id, out_dir, config
        self.run: Any = None

    def open(self) -> None:
        import wandb

        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            id=self.run_id, resume="allow", name=self.run_id, dir=str(self.out_dir),
            project=os.environ.get("WANDB_PROJECT") or "qlora-watch", config=self.config,
            settings=wandb.Settings(console="off", x_disable_stats=True),  # our telemetry instead
        )
        self.run.define_metric(STEP_METRIC)
        self.run.define_metric("*", step_metric=STEP_METRIC)

    def log(self, metrics: dict[str, float], step: int, t: float) -> None:
        self.run.log({STEP_METRIC: float(step), **metrics})

    def text(self, line: str, step: int, t: float) -> None:
        self.run.summary["events/last"] = line

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()


class MlflowBackend(Backend):
    def __init__(self, run_id: str, out_dir: Path, config: dict[str, Any], ids_path: Path) -> None:
        self.qlw_run, self.out_dir, self.config = run_id, out_dir, config
        self.ids_path = ids_path
        self.client: Any = None
        self.mlflow_run: str | None = None

    def open(self) -> None:
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # a local file store beside the checkpoints (MLflow 3 wants it said out loud)
            uri = (self.out_dir / "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        known = (read_json(self.ids_path) or {}).get("mlflow_run_id")
        if known:
            self.mlflow_run = known  # a restarted supervisor continues its run
            return
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "qlora-watch"
        exp = self.client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(name)
        run = self.client.create_run(exp_id, run_name=self.qlw_run, tags={"qlora-watch.run_id": self.qlw_run})
        self.mlflow_run = run.info.run_id
        atomic_write(self.ids_path, json.dumps({"mlflow_run_id": self.mlflow_run}))
        flat = {k: str(v)[:250] for k, v in _flatten(self.config).items()}
        from mlflow.entities import Param

        params = [Param(k, v) for k, v in flat.items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params a call
            self.client.log_batch(self.mlflow_run, params=params[i:i + 100])

    def log(self, metrics: dict[str, float], step: int, t: float) -> None:
        from mlflow.entities import Metric

        ms = int(t * 1000)
        batch = [Metric(k, v, ms, step) for k, v in metrics.items()]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.mlflow_run, metrics=batch[i:i + 1000])

    def text(self, line: str, step: int, t: float) -> None:
        self.client.set_tag(self.mlflow_run, "qlora-watch.last_event", line[:5000])

    def close(self) -> None:
        if self.client is not None and self.mlflow_run is not None:
            self.client.set_terminated(self.mlflow_run)


def _descendants() -> set[int]:
    try:
        return {p.pid for p in psutil.Process().children(recursive=True)}
    except psutil.Error:
        return set()


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class TrackerSink:
    """A Backend behind a bounded queue and one thread; the first error turns it off."""

    def __init__(self, name: str, backend: Backend) -> None:
        self.name, self.backend = name, backend
        self.q: queue.Queue[tuple[str, Any, int, float] | None] = queue.Queue(QUEUE_MAX)
        self.error: str | None = None
        self.dropped = 0
        self.last_step = 0
        self.opened = threading.Event()  # open() returned (or failed)
        self._thread = threading.Thread(target=self._worker, name=f"tracker-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _put(self, item: tuple[str, Any, int, float]) -> None:
        if self.error is not None:
            return
        try:
            self.q.put_nowait(item)
        except queue.Full:
            self.dropped += 1

    def add_steps(self, steps: list[Step]) -> None:
        for st in steps:
            self.last_step = max(self.last_step, st.step)
            self._put(("log", step_metrics(st), st.step, st.t))

    def add_sample(self, sample: Sample, step: int | None) -> None:
        scalars = sample_scalars(sample)
        if scalars:
            self._put(("log", scalars, int(step) if step is not None else self.last_step, sample.t))

    def add_event(self, event: Event) -> None:
        """The event as text, and relaunches and guard actions as a 1 (as tbwriter does)."""
        att = f" attempt {event.attempt}" if event.attempt is not None else ""
        line = redact(f"[{event.level}] {event.kind}{att}: {event.message}")  # messages quote the trainer
        self._put(("text", line, self.last_step, event.t))
        marks = {}
        if event.kind == EventKind.RELAUNCH_SCHEDULED:
            marks["events/relaunch"] = 1.0
        if event.kind == EventKind.GUARD_FIRED and event.guard:
            marks[f"events/guard/{event.guard}"] = 1.0
        if marks:
            self._put(("log", marks, self.last_step, event.t))

    def close(self, timeout: float = 30.0) -> None:
        """Flush what is queued and close the tracker run (bounded: a dead server cannot hang us)."""
        close_worker(self.q, self._thread, timeout)

    def _worker(self) -> None:
        try:
            self.backend.open()
        except Exception as e:  # noqa: BLE001 - a tracker must never stop supervision
            self._fail(e)
            return
        finally:
            self.opened.set()
        while True:
            item = self.q.get()
            if item is None:
                break
            kind, payload, step, t = item
            try:
                if kind == "log":
                    self.backend.log(payload, step, t)
                else:
                    self.backend.text(payload, step, t)
            except Exception as e:  # noqa: BLE001
                self._fail(e)
                return
        try:
            self.backend.close()
        except Exception as e:  # noqa: BLE001
            self._fail(e)

    def _fail(self, e: BaseException) -> None:
        self.error = f"{type(e).__name__}: {e}"
        log.warning("%s tracker disabled: %s", self.name, self.error)


class Trackers:
    """Fans the supervisor's telemetry, events and steps out to every configured tracker."""

    def __init__(self, sinks: list[Any]) -> None:
        self.sinks = sinks
        self.helpers: set[int] = set()

    def start(self, timeout: float = OPEN_TIMEOUT_S) -> None:
        """Open every tracker before the first launch, and note the processes their libraries
        start (wandb's service): the trainer's leftovers are killed after each attempt, these
        must not be. Blocking (call it off the event loop); a tracker still opening after
        `timeout` goes on in the background."""
        workers = [s for s in self.sinks if isinstance(s, TrackerSink)]
        if not workers:
            return
        before = _descendants()
        for s in workers:
            s.start()
        deadline = time.monotonic() + timeout
        for s in workers:
            s.opened.wait(max(0.0, deadline - time.monotonic()))
        self.helpers = _descendants() - before

    def helper_pids(self) -> set[int]:
        """The trackers' processes and their children now."""
        out: set[int] = set()
        for pid in self.helpers:
            try:
                out |= {pid} | {c.pid for c in psutil.Process(pid).children(recursive=True)}
            except psutil.Error:
                continue
        return out

    def add_steps(self, steps: list[Step]) -> None:
        for s in self.sinks:
            if hasattr(s, "add_steps"):
                s.add_steps(steps)

    def add_sample(self, sample: Sample, step: int | None) -> None:
        for s in self.sinks:
            s.add_sample(sample, step)

    def add_event(self, event: Event) -> None:
        for s in self.sinks:
            s.add_event(event)

    def close(self) -> None:
        for s in self.sinks:
            s.close()


def from_recipe(recipe: Any, run_id: str, output_dir: str, run_dir: Path) -> Trackers:
    """The trackers `recipe.train.report_to` asks for (their ids kept in run_dir/trackers.json,
    so that a restarted supervisor continues the same tracker run)."""
    report_to = list(recipe.train.report_to)
    out = Path(output_dir)
    config = tracker_config(recipe)
    sinks: list[Any] = []
    if "tensorboard" in report_to and installed("tensorboard"):  # a light install may lack it
        sinks.append(TelemetryTB(system_logdir(out)))
    if "wandb" in report_to:
        sinks.append(TrackerSink("wandb", WandbBackend(run_id, out, config)))
    if "mlflow" in report_to:
        sinks.append(TrackerSink("mlflow", MlflowBackend(run_id, out, config, run_dir / IDS_FILE)))
    return Trackers(sinks)

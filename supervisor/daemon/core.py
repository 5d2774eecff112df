"""The supervisor: one asyncio loop that owns a run.

Each tick (5 per second) it reaps children, follows the trainer's events and log, samples
telemetry at the recipe's interval, runs the guards and carries out their actions. Every
fact goes to the run store first, then to the attached clients. Nothing here imports torch
or textual.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

from supervisor import logrotate, procgroup
from supervisor import protocol as proto
from supervisor.daemon.attempts import AttemptRunner
from supervisor.daemon.followers import JsonlFollower, LogFollower
from supervisor.daemon.logprogress import LogProgress
from supervisor.daemon.preempt import Preemption, sigterm_preempts
from supervisor.download import DownloadTracker
from supervisor.preflight.emulation import card_total_mib
from supervisor.recipe import Recipe, recipe_from_json
from supervisor.records import Event, EventKind, Sample, Step, to_dict
from supervisor.sinks import notify
from supervisor.sinks.trackers import from_recipe as trackers_for
from supervisor.states import RunState
from supervisor.store import RunStore, read_json

log = logging.getLogger("qlora-watch.supervisor")

TICK_S = 0.2
# What a newly attached client gets: the whole run, thinned so that the first frame of a
# 24-hour run arrives in well under a second (charts are at most a few hundred cells wide).
HISTORY_SAMPLES = 3_000
HISTORY_STEPS = 2_500
LOG_RING = 500
STEP_SOURCES = ("events", "log", "history")
DISCOVER_EVERY_S = 2.0  # scans of a foreign trainer's output folder for new checkpoints
REBIND_EVERY_S = 1.0  # how soon a removed socket (or its folder) is bound again


class AlreadySupervised(Exception):
    pass


def acquire_lock(store: RunStore) -> int:
    """flock the run's lock file; a SIGKILLed holder's lock is released by the kernel."""
    fd = os.open(store.path / "supervisor.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        raise AlreadySupervised(f"run {store.run_id} is already supervised (pid {other or '?'})") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


class Supervisor:
    """Owns one run until it reaches a terminal state."""

    def __init__(self, store: RunStore, *, sampler: Any = None, socket_path: Path | None = None):
        self.store = store
        self.run_info = store.info()
        self.recipe: Recipe = recipe_from_json((store.path / "recipe.json").read_text())
        self.sampler = sampler
        if self.recipe.hardware.emulate_vram_gib is not None and hasattr(sampler, "emulate"):
            sampler.emulate(card_total_mib(self.recipe.hardware.emulate_vram_gib))
        if hasattr(sampler, "set_visible"):  # only the run's GPUs drive its guards
            from supervisor.runenv import for_run

            env = {**for_run(store.path), **self.recipe.env}  # what the trainer gets
            sampler.set_visible(env.get("CUDA_VISIBLE_DEVICES"))
        self.socket_path = socket_path
        self.state: dict[str, Any] = store.read_state() or {}
        self.server: Any = None
        self.log_ring: list[str] = store.log_tail(LOG_RING)
        self.recent_samples: list[Sample] = []
        self.recent_steps: list[Step] = []
        # train.report_to: TensorBoard (telemetry beside the trainer's logs), W&B, MLflow
        self.tb = trackers_for(self.recipe, store.run_id, self.run_info["output_dir"], store.path)
        self.attempts = AttemptRunner(self)
        self.preemption = Preemption(self)
        self.download = DownloadTracker(self)  # a slow model download is progress (download.py)
        self.notifier = notify.from_recipe(self.recipe, store.run_id)
        self._stop_event = asyncio.Event()
        self._last_sample_mono = 0.0
        self._sampling = False
        self._signals = 0
        self.clock_anchor: tuple[float, float] | None = None  # (wall seen, monotonic then): guards' clock
        self.events_follower: JsonlFollower | None = None
        # Where this attempt's steps come from, best first: "events" (our callback), "log" (HF
        # log lines), "history" (a checkpoint's log_history); a better source replaces a worse.
        self.step_source: str | None = None
        self.log_progress = LogProgress()
        self._last_discover_mono = 0.0
        self._last_bind_check = 0.0
        self._last_out_check = 0.0
        self.log_follower = LogFollower(store.log_path)
        self.log_follower.offset = _size(store.log_path)
        self.log_follower.ino = _ino(store.log_path)

    # -- state ------------------------------------------------------------------------
    def set_state(self, new: RunState | None = None, **fields: Any) -> None:
        if new is not None:
            if new.terminal and self.state.get("state") != new.value:
                msg = fields.get("message") or self.state.get("message") or ""
                self.notifier.maybe_send(Event(t=time.time(), kind=EventKind.STATE_CHANGED, message=f"run {new.value}: {msg}"),
                                         state_after=new.value)
            fields["state"] = new.value
        self.state.update(fields)
        self.state.setdefault("run_id", self.store.run_id)
        self.state.pop("state_error", None)  # set again below if this write fails too
        if not self.store.write_state(self.state):
            self.state["state_error"] = self.store.state_error
        self.broadcast(proto.state(self.state))

    @property
    def run_state(self) -> RunState:
        try:
            return RunState(self.state.get("state", "starting"))
        except ValueError:
            return RunState.LOST

    def record(self, kind: str, message: str, level: str = "info", **kw: Any) -> Event:
        ev = Event(t=time.time(), kind=kind, level=level, message=message,
                   attempt=self.state.get("attempt"), **kw)
        try:
            self.store.add_event(ev)
        except Exception as e:  # noqa: BLE001 - a full disk must not stop supervision
            log.warning("event not stored: %s", e)
        self.tb.add_event(ev)
        log.info("%s: %s", kind, message)
        self.broadcast(proto.event(to_dict(ev)))
        self.notifier.maybe_send(ev)
        return ev

    def broadcast(self, msg: dict[str, Any]) -> None:
        if self.server is not None:
            self.server.broadcast(msg)

    # -- socket handler ---------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        return {
            "run": self.run_info,
            "state": self.state,
            "samples": self.store.samples(limit=HISTORY_SAMPLES),
            "steps": self.store.steps(limit=HISTORY_STEPS),
            "events": [to_dict(e) for e in self.store.events()],
            "log": list(self.log_ring),
        }

    async def handle_command(self, cmd: str, args: dict[str, Any], peer: Any = None) -> dict[str, Any]:
        if cmd == "status":
            return {"state": self.state}
        if cmd in ("stop", "stop_now"):
            await self.attempts.request_stop(now=(cmd == "stop_now"), reason="stopped by user")
            return {"state": self.state.get("state")}
        if cmd == "ack":
            ids = args.get("event_ids")
            n = self.store.ack_events(list(ids) if ids is not None else None)
            self.broadcast(proto.acked(ids))
            return {"acked": n}
        raise ValueError(f"unknown command {cmd!r}")

    # -- the loop ---------------------------------------------------------------------
    async def run(self) -> int:
        lock_fd = acquire_lock(self.store)
        procgroup.become_subreaper()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, lambda: None)  # a closed terminal is not a stop
        from supervisor.runenv import for_run

        preempt_on_term = sigterm_preempts({**for_run(self.store.path), **os.environ})
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig.name, sig == signal.SIGTERM and preempt_on_term)
        self.preemption.install(loop)  # SIGUSR1: Slurm's warning ahead of the end
        await self._start_server()
        await asyncio.to_thread(self.tb.start)  # trackers open before the first launch
        try:
            await self.attempts.begin()
            while not self._stop_event.is_set():
                await self.tick()
                if self.run_state.terminal and not self.attempts.trainer_alive():
                    break
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop_event.wait(), TICK_S)
            await self.tick()  # last events and log lines
        finally:
            self.preemption.settle(loop, preempt_on_term)  # a late SIGTERM must not make exit 0 a -15
            with contextlib.suppress(Exception):  # the idle warm standby dies with us
                await asyncio.to_thread(self.attempts.standby.discard)
            self.broadcast(proto.bye(f"run {self.state.get('state')}"))
            await asyncio.sleep(0.05)
            if self.server is not None:
                with contextlib.suppress(Exception):
                    await self.server.close()
            self.store.close()
            self.tb.close()
            await asyncio.to_thread(self.notifier.close)
            os.close(lock_fd)
        return 0

    def _on_signal(self, name: str = "SIGTERM", preempt: bool = False) -> None:
        """SIGTERM/SIGINT: save state and leave; the trainer goes on (re-adopted later). Under
        Slurm or as a container's pid 1, SIGTERM is a preemption instead (preempt.py)."""
        if preempt or self.preemption.active:
            self.preemption.on_signal(name)
            return
        self._signals += 1
        if self._signals > 1:
            os._exit(0)  # fast path on the second signal
        self.set_state(message="supervisor exited; the trainer keeps running")
        self._stop_event.set()

    async def _start_server(self) -> None:
        if self.socket_path is None:
            return
        from supervisor.daemon.server import ControlServer

        self.server = ControlServer(self.socket_path, self)
        await self.server.start()

    async def tick(self) -> None:
        await self.attempts.poll()
        self._follow_events()
        self._follow_log()
        await self._maybe_sample()
        await self.download.tick()
        if time.monotonic() - self._last_discover_mono >= DISCOVER_EVERY_S:
            self._last_discover_mono = time.monotonic()
            self.attempts.discover_checkpoints()
        if time.monotonic() - self._last_out_check >= logrotate.CHECK_EVERY_S:
            self._last_out_check = time.monotonic()
            cfg = self.recipe.supervisor
            try:  # our own stdout/stderr file: copy and truncate, we cannot reopen it
                logrotate.copy_truncate(self.store.path / "supervisor.out", cfg.log_max_bytes, cfg.log_backups)
            except OSError as e:
                log.warning("supervisor.out not rotated: %s", e)
        if self.server is not None and time.monotonic() - self._last_bind_check >= REBIND_EVERY_S:
            self._last_bind_check = time.monotonic()
            await self.server.ensure_bound()  # removed at logout: bound again (issue #14)
        self.attempts.run_guards()

    def _follow_events(self) -> None:
        f = self.events_follower
        if f is None:
            return
        steps: list[dict[str, Any]] = []
        for obj in f.read():
            if obj.get("event") != "settings":
                self.state["speaks_events"] = True  # kept in state.json: a re-adopting supervisor knows
            if obj.get("event") == "step":
                steps.append(obj)
            else:
                self.attempts.on_trainer_event(obj)
        self.take_steps(steps, source="events")

    def new_attempt(self) -> None:
        """A launch: step sources start over."""
        self.step_source = None
        self.state["speaks_events"] = False
        self.log_progress = LogProgress()

    def take_steps(self, objs: list[dict[str, Any]], source: str) -> None:
        """Store and broadcast step records from one source, unless a better one speaks."""
        if not objs or STEP_SOURCES.index(source) > STEP_SOURCES.index(self.step_source or "history"):
            return
        self.step_source = source
        attempt = self.state.get("attempt") or 1
        new_steps = [s for s in (Step.from_trainer(o, attempt) for o in objs) if s is not None]
        if new_steps:
            try:
                self.store.add_steps(new_steps, lineage=self.state.get("lineage") or 1)
            except Exception as e:  # noqa: BLE001
                log.warning("steps not stored: %s", e)
            self.tb.add_steps(new_steps)  # W&B/MLflow: every attempt's steps in one tracker run
            for st in new_steps:
                self.recent_steps.append(st)
                self.broadcast(proto.step({**to_dict(st), "lineage": self.state.get("lineage") or 1}))
            del self.recent_steps[:-2000]
            self.attempts.on_steps(new_steps)

    def _follow_log(self) -> None:
        lines = self.log_follower.read()
        if self.recipe.trainer.command and self.step_source in (None, "log", "history"):
            self.take_steps(self.log_progress.feed(lines), source="log")
            bar = self.log_progress.bar
            if bar is not None and self.step_source != "events" and bar[0] != self.state.get("step"):
                # between logged steps the bar still moves: status shows it
                self.attempts.on_bar(*bar)
        if lines:
            self.log_ring.extend(lines)
            del self.log_ring[:-LOG_RING]
            self.broadcast(proto.log(lines[-LOG_RING:]))

    async def _maybe_sample(self) -> None:
        if self.sampler is None or self._sampling:
            return
        now = time.monotonic()
        if now - self._last_sample_mono < self.recipe.supervisor.sample_interval_s:
            return
        self._last_sample_mono = now
        self._sampling = True
        try:
            sample = await asyncio.to_thread(
                self.sampler.sample, self.attempts.wrapper_pid(), str(self.attempts.output_dir())
            )
        except Exception as e:  # noqa: BLE001 - telemetry never stops supervision
            log.warning("sample failed: %s", e)
            return
        finally:
            self._sampling = False
        self.recent_samples.append(sample)
        del self.recent_samples[:-3600]
        try:
            self.store.add_samples([sample])
        except Exception as e:  # noqa: BLE001
            log.warning("sample not stored: %s", e)
        self.tb.add_sample(sample, self.state.get("step"))
        self.broadcast(proto.sample(to_dict(sample)))


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except OSError:
        return 0


def _ino(p: Path) -> int | None:
    try:
        return p.stat().st_ino
    except OSError:
        return None


def run_supervisor(run_dir: Path, *, socket_path: Path | None, with_telemetry: bool = True) -> int:
    """Entry point of the detached supervisor process (`qlora-watch _supervise`)."""
    os.umask(0o077)
    store = RunStore(run_dir)
    from supervisor import logrotate

    try:
        cfg = recipe_from_json((run_dir / "recipe.json").read_text()).supervisor
        max_bytes, backups = cfg.log_max_bytes, cfg.log_backups
    except (OSError, ValueError):
        max_bytes, backups = 50 * 1024 * 1024, 3
    # rotated like the trainer log (they grew without bound)
    logging.basicConfig(level=logging.INFO,
                        handlers=[logrotate.log_handler(run_dir / "supervisor.log", max_bytes, backups)])
    sampler = None
    if with_telemetry:
        try:
            from supervisor.telemetry.sampler import make_sampler

            sampler = make_sampler()
        except Exception as e:  # noqa: BLE001
            log.warning("telemetry unavailable: %s", e)
    sup = Supervisor(store, sampler=sampler, socket_path=socket_path)
    try:
        return asyncio.run(sup.run())
    except AlreadySupervised as e:
        log.error("%s", e)
        print(str(e), flush=True)
        return 3


__all__ = ["Supervisor", "run_supervisor", "AlreadySupervised", "read_json"]

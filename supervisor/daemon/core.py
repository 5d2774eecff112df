"""The supervisor: one asyncio loop that owns a run.

Each tick (5 per second) it polls the attempt, follows the trainer's events and log, samples
telemetry at the recipe's interval, runs the guards and carries out their actions. Every
fact goes to the run store first, then to the attached clients. Nothing here imports torch
or textual.

The core is three parts wired here, each given only what it uses (`RunIO`: the store, the
status, set_state, record, broadcast):

    trainer_events.TrainerEvents   events.jsonl and trainer.log -> state changes and steps
    attempts.Attempts              begin / adopt / launch / poll / exit / stop / relaunch
    actions.Actions                the executor: guard actions, one `match` over the union

and `set_state` is the one writer of the run's status, checking each change of state against
states.EDGES.
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

from supervisor import guards as guardlib
from supervisor import logrotate, procgroup
from supervisor import protocol as proto
from supervisor.daemon.actions import Actions
from supervisor.daemon.attempts import Attempts
from supervisor.daemon.guard_window import GuardClock, build_window
from supervisor.daemon.preempt import Preemption, sigterm_preempts
from supervisor.daemon.runio import RunIO
from supervisor.daemon.trainer_events import LOG_RING, TrainerEvents
from supervisor.download import DownloadTracker
from supervisor.guards.base import Action, Window
from supervisor.preflight.emulation import card_total_mib
from supervisor.recipe import Recipe, recipe_from_json
from supervisor.records import Event, EventKind, Sample, to_dict
from supervisor.sinks import notify
from supervisor.sinks.trackers import from_recipe as trackers_for
from supervisor.states import RunState
from supervisor.status import RunInfo, RunStatus
from supervisor.store import RunStore, read_json

log = logging.getLogger("qlora-watch.supervisor")

TICK_S = 0.2
# What a newly attached client gets: the whole run, thinned so that the first frame of a
# 24-hour run arrives in well under a second (charts are at most a few hundred cells wide).
HISTORY_SAMPLES = 3_000
HISTORY_STEPS = 2_500
GUARD_EVERY_S = 1.0
REBIND_EVERY_S = 1.0  # how soon a removed socket (or its folder) is bound again
DISCOVER_EVERY_S = 2.0  # scans of a foreign trainer's output folder for new checkpoints


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
        self.run_info: RunInfo = store.run_info()
        self.recipe: Recipe = recipe_from_json((store.path / "recipe.json").read_text())
        self.sampler = sampler
        if self.recipe.hardware.emulate_vram_gib is not None and hasattr(sampler, "emulate"):
            sampler.emulate(card_total_mib(self.recipe.hardware.emulate_vram_gib))
        if hasattr(sampler, "set_visible"):  # only the run's GPUs drive its guards
            from supervisor.runenv import for_run

            env = {**for_run(store.path), **self.recipe.env}  # what the trainer gets
            sampler.set_visible(env.get("CUDA_VISIBLE_DEVICES"))
        self.socket_path = socket_path
        self.status: RunStatus = store.read_status()
        self.server: Any = None
        self.recent_samples: list[Sample] = []
        # train.report_to: TensorBoard (telemetry beside the trainer's logs), W&B, MLflow
        self.tb = trackers_for(self.recipe, store.run_id, self.run_info.output_dir, store.path)
        self.notifier = notify.from_recipe(self.recipe, store.run_id)
        self.clock = GuardClock()  # the guards' clock, anchored at what the core last saw
        self.io = RunIO(store=store, status=self.status, set_state=self.set_state, record=self.record,
                        broadcast=self.broadcast)
        self.download = DownloadTracker(self.io)  # a slow model download is progress (download.py)
        self.events = TrainerEvents(self.io, recipe=self.recipe, tb=self.tb, mark_time=self.clock.mark,
                                    output_dir=lambda: self.attempts.output_dir(),
                                    on_phase=lambda phase: self.attempts.on_phase(phase))
        self.attempts = Attempts(
            self.io, recipe=self.recipe, run_info=self.run_info, events=self.events,
            execute=lambda actions: self.actions.execute(actions), window=self.window,
            mark_time=self.clock.mark, sampler=sampler, helper_pids=self.tb.helper_pids,
            gpu_lost=lambda: any(g.lost for s in self.recent_samples[-3:] for g in s.gpus),
            download=self.download)
        self.actions = Actions(self.io, self.attempts)
        self.preemption = Preemption(self.io, self.attempts)
        self._stop_event = asyncio.Event()
        self._last_sample_mono = 0.0
        self._sampling = False
        self._signals = 0
        self._last_discover_mono = 0.0
        self._last_guard_mono = 0.0
        self._last_bind_check = 0.0
        self._last_out_check = 0.0
        self._acting = False  # a guard's decisive action (stop, relaunch) is being carried out

    # -- state ------------------------------------------------------------------------
    def set_state(self, new: RunState | None = None, *, why: str | None = None, persist: bool = True,
                  **fields: Any) -> None:
        """The one writer of the run's status. `new`: an edge of states.EDGES, taken for `why`
        (one line, logged); fields: RunStatus fields. persist=False: memory only."""
        st = self.status
        if new is not None and new.terminal and st.state != new:
            msg = fields.get("message") or st.message or ""
            self.notifier.maybe_send(Event(t=time.time(), kind=EventKind.STATE_CHANGED, message=f"run {new.value}: {msg}"),
                                     state_after=new.value)
        st.change(new, why, **fields)
        if not persist:
            return
        if st.run_id is None:
            st.run_id = self.store.run_id
        st.state_error = None  # set again below if this write fails too
        if not self.store.write_status(st):
            st.state_error = self.store.state_error
        self.broadcast(proto.state(st.to_json()))

    @property
    def run_state(self) -> RunState:
        return self.status.run_state

    def record(self, kind: str, message: str, level: str = "info", **kw: Any) -> Event:
        ev = Event(t=time.time(), kind=kind, level=level, message=message,
                   attempt=self.status.attempt, **kw)
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
            "run": self.run_info.to_json(),
            "state": self.status.to_json(),
            "samples": self.store.samples(limit=HISTORY_SAMPLES),
            "steps": self.store.steps(limit=HISTORY_STEPS),
            "events": [to_dict(e) for e in self.store.events()],
            "log": list(self.events.log_ring),
        }

    async def handle_command(self, cmd: str, args: dict[str, Any], peer: Any = None) -> dict[str, Any]:
        if cmd == "status":
            return {"state": self.status.to_json()}
        if cmd in ("stop", "stop_now"):
            await self.attempts.request_stop(now=(cmd == "stop_now"), reason="stopped by user")
            return {"state": self.run_state.value}
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
            self.broadcast(proto.bye(f"run {self.run_state.value if self.status.state else None}"))
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
        self.events.read()
        await self._maybe_sample()
        await self.download.tick()
        if time.monotonic() - self._last_discover_mono >= DISCOVER_EVERY_S:
            self._last_discover_mono = time.monotonic()
            self.events.discover_checkpoints()
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
        self.run_guards()

    # -- guards -----------------------------------------------------------------------
    def window(self) -> Window:
        """What the guards see now (guard_window.build_window)."""
        try:
            out: Path | None = self.attempts.output_dir()
        except Exception:  # noqa: BLE001 - no output dir yet: nothing to scan
            out = None
        return build_window(status=self.status, recipe=self.recipe, samples=self.recent_samples,
                            steps=self.events.recent_steps, output_dir=out, clock=self.clock,
                            run_id=self.store.run_id, estimate=self.run_info.estimate,
                            fired=self.actions.fired, ladder_reach=self.attempts.ladder_reach())

    def run_guards(self) -> None:
        """Once a second, while no decisive action is being carried out."""
        now = time.monotonic()
        if self._acting or self.run_state.terminal or now - self._last_guard_mono < GUARD_EVERY_S:
            return
        self._last_guard_mono = now
        try:
            actions = guardlib.run_guards(self.window(), self.recipe.guards)
        except Exception as e:  # noqa: BLE001 - a guard bug must not take the run down
            log.exception("guards failed: %s", e)
            return
        if actions:
            self._acting = True
            asyncio.get_running_loop().create_task(self._act(actions))

    async def _act(self, actions: list[Action]) -> None:
        try:
            await self.actions.execute(actions)
        finally:
            self._acting = False

    # -- telemetry --------------------------------------------------------------------
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
        self.tb.add_sample(sample, self.status.step)
        self.broadcast(proto.sample(to_dict(sample)))


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


__all__ = ["LOG_RING", "Supervisor", "run_supervisor", "AlreadySupervised", "read_json"]

"""The attempt lifecycle: begin (a new run, a resume, or adopting a live trainer), launch,
poll, exit, stop, relaunch after a back-off.

An attempt is one launch of the trainer. A *lineage* is a chain of attempts that resume
from each other's checkpoints in one output folder; an OOM-ladder rung that changes the
adapter's shape (rank, targets) starts a new lineage in a folder of its own, and the
earlier lineage's checkpoints are kept.

`Attempts` receives what it uses (`RunIO`: the store, the status, set_state, record; the
trainer events it follows; `execute` for the actions an exit decides), never the core.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import psutil

from supervisor import guards as guardlib
from supervisor import ladder, procgroup, runenv
from supervisor.checkpoints import folders as checkpoints
from supervisor.checkpoints.plan import newest_complete_of, prune_plan
from supervisor.daemon import handoff, leftovers
from supervisor.daemon.runio import RunIO
from supervisor.daemon.standby import StandbyManager
from supervisor.daemon.trainer_events import TrainerEvents
from supervisor.guards.base import Action, PruneCheckpoints, Relaunch
from supervisor.guards.relaunch import restarts_after
from supervisor.recipe import Recipe, recipe_to_json
from supervisor.records import EventKind
from supervisor.redact import redact_argv
from supervisor.sinks import trackers
from supervisor.states import RunState
from supervisor.status import RunInfo, RunStatus
from supervisor.store import RunStore, read_json
from supervisor.telemetry.host import oom_kills
from supervisor.wrapper import TAIL_LINES

log = logging.getLogger("qlora-watch.attempts")


def weight_cache_dir(recipe: Recipe, run_path: Path) -> Path | None:
    """Where the trainer keeps its quantised-weight cache (runner/qcache.py): the run's own
    folder (removed with the run), the shared one, or None (off, or not our trainer)."""
    if recipe.model is None or recipe.trainer.command and not _runs_builtin(recipe.trainer.command):
        return None
    mode = recipe.model.weight_cache
    if mode == "off":
        return None
    if mode == "shared":
        from supervisor.runner.qcache import shared_root

        return shared_root()
    return run_path / "qcache"


def dataset_cache_dir(recipe: Recipe, run_path: Path) -> Path | None:
    """Where the built-in trainer keeps the tokenised records (runner/dcache.py): the run's own
    dcache/ (removed with the run), or None (data.cache = false, or not our trainer)."""
    if recipe.data is None or not recipe.data.cache:
        return None
    if recipe.trainer.command and not _runs_builtin(recipe.trainer.command):
        return None
    return run_path / "dcache"


def _runs_builtin(command: list[str]) -> bool:
    return "supervisor.runner.train" in command


class Attempts:
    """One run's attempts, one at a time."""

    def __init__(self, io: RunIO, *, recipe: Recipe, run_info: RunInfo, events: TrainerEvents,
                 execute: Callable[[list[Action]], Awaitable[None]], window: Callable[[], Any],
                 mark_time: Callable[[float], None], sampler: Any = None,
                 gpu_lost: Callable[[], bool] = lambda: False, download: Any = None,
                 helper_pids: Callable[[], set[int]] = set) -> None:
        self.io = io
        self.recipe = recipe
        self.run_info = run_info
        self.events = events
        self.execute = execute  # the executor (actions.py)
        self.window = window  # the guards' Window now (guard_window.build_window)
        self.mark_time = mark_time
        self.sampler = sampler  # tree_pids (the GPU release check), nvml
        self.gpu_lost = gpu_lost  # a recent sample saw a GPU fall off the bus
        self.download = download  # download.DownloadTracker: a new attempt's cache baseline
        self.helper_pids = helper_pids  # the trackers' own processes: not orphans to kill
        self.proc: Any = None  # Popen of the wrapper when it is our child
        self.child_rc: int | None = None
        self.stop_deadline: float | None = None  # monotonic
        self.stop_reason: str | None = None
        self.stop_killed = False
        self.stop_now = False
        self.next_launch_mono: float | None = None
        self.pending: Relaunch | None = None  # the Relaunch waiting for its back-off
        self.tree_pids: set[int] = set()  # the trainer's processes, for the GPU release check
        self._reach: tuple[str | None] | None = None  # ladder_reach(), read once
        self.standby = StandbyManager(io.record)  # the warm interpreter for the next attempt
        self.last_launch: dict[str, Any] | None = None  # env/cwd/argv of the latest launch

    # -- helpers ------------------------------------------------------------------------
    @property
    def st(self) -> RunStatus:
        return self.io.status

    @property
    def store(self) -> RunStore:
        return self.io.store

    def wrapper_pid(self) -> int | None:
        w = self.st.wrapper or {}
        return w.get("pid") if self.trainer_alive() else None

    def output_dir(self) -> Path:
        return Path(self.st.output_dir or self.run_info.output_dir)

    def attempt_dir(self) -> Path:
        """The current attempt's folder in the run store."""
        return self.store.attempt_dir(self.st.attempt or 1)

    def trainer_alive(self) -> bool:
        w = self.st.wrapper
        if not w or self.st.exited:
            return False
        return procgroup.group_alive(w["pid"])

    def ladder_reach(self) -> str | None:
        """How the ladder's settings reach this trainer; None when they cannot (handoff.py)."""
        if self.st.settings_read:
            return "settings"
        if self._reach is None:
            cwd = Path(self.run_info.cwd or os.getcwd())
            self._reach = (handoff.ladder_reaches(self.recipe, cwd),)
        return self._reach[0]

    def effective_recipe(self, rung: int | None) -> Recipe:
        """The base recipe at `rung` (ladder.effective), then the --set of every
        `qlora-watch resume` (resume.effective)."""
        from supervisor.control.resume import effective

        return effective(self.recipe, rung, list(self.st.overrides or []))

    # -- start ------------------------------------------------------------------------
    async def begin(self) -> None:
        self.mark_time(time.time())
        st, io = self.st, self.io
        if st.state is None:
            io.set_state(RunState.STARTING, why="a new run", attempt=0, lineage=1, rung=None,
                         restarts=0, restarts_since_progress=0, started_at=time.time(),
                         output_dir=self.run_info.output_dir)
            leftovers.finish_pending_deletes(self.io, self.output_dir())
            await self.execute(self._prelaunch_checks())  # warnings only
            await self.launch(resume=None, rung=self.run_info.start_rung)  # --auto-fit
            return
        if st.run_state.terminal:
            return  # serve history only
        request = st.resume_request
        if request is not None:  # `qlora-watch resume` (resume.py): a new attempt in this run
            # The last attempt's wrapper is history now: any process of it still alive (a LOST
            # run's trainer) is a stray, and two trainers must not share the output folder.
            io.set_state(resume_request=None, wrapper=None)
            leftovers.finish_pending_deletes(self.io, self.output_dir())
            await leftovers.stop_strays(self.io, self.output_dir())
            await self.launch(resume=request.get("from"), rung=st.rung, fresh=bool(request.get("fresh")))
            return
        leftovers.finish_pending_deletes(self.io, self.output_dir())  # a supervisor killed mid-delete left .deleting-<ts>
        await leftovers.stop_strays(self.io, self.output_dir())  # a supervisor killed between spawn and record left one
        wrapper = st.wrapper
        attempt = st.attempt or 1
        exit_file = self.attempt_dir() / "exit.json"
        self.events.follow_attempt(attempt, offset=st.events_offset or 0)
        if st.run_state == RunState.STOPPING and st.message:
            self.stop_reason = st.message  # the stop an earlier supervisor began ends as asked
        if wrapper and procgroup.verify(wrapper):
            io.record(EventKind.ADOPTED, f"adopted trainer group {wrapper['pid']} (attempt {attempt}); "
                      "pid, start time, boot id and command line verified")
            return
        if exit_file.exists():
            io.record(EventKind.ADOPTED, f"attempt {attempt} ended while no supervisor was running")
            await self.handle_exit(read_json(exit_file) or {})
            return
        if not wrapper:
            # Supervisor died before recording a launch: launch now, from what exists.
            newest = checkpoints.newest_complete(self.output_dir(), run_id=self.store.run_id)
            await self.launch(resume=newest.target if newest else None,
                              rung=self.run_info.start_rung)
            return
        newest = checkpoints.newest_complete(self.output_dir(), run_id=self.store.run_id)
        hint = (f"; continue from {newest.path.name} with `qlora-watch resume {self.store.run_id}`"
                if newest else "")
        io.record(EventKind.TRAINER_LOST, f"trainer pid {wrapper.get('pid')} cannot be verified (gone or "
                  f"reused); it was not signalled{hint}", level="error")
        io.set_state(RunState.LOST, why="adopting: the recorded trainer cannot be verified",
                     message=f"trainer lost{hint}", exited=True)

    def _prelaunch_checks(self) -> list[Action]:
        """Host RAM against what the run needs (model loading + paged optimiser state)."""
        need = (self.run_info.estimate or {}).get("host_ram_needed_bytes")
        return guardlib.prelaunch_host_ram(psutil.virtual_memory().available, need,
                                           self.recipe.guards.host_ram)

    async def launch(self, resume: str | None, rung: int | None = None, fresh: bool = False) -> None:
        st, io = self.st, self.io
        attempt = (st.attempt or 0) + 1
        lineage = (st.lineage or 1) + (1 if fresh else 0)
        base_out = Path(self.run_info.output_dir)
        out = base_out if lineage == 1 else base_out / f"attempt-{attempt}"
        recipe = self.effective_recipe(rung)
        adir = self.store.attempt_dir(attempt)
        adir.mkdir(parents=True, exist_ok=True, mode=0o700)
        (adir / "recipe.json").write_text(recipe_to_json(recipe))
        events = adir / "events.jsonl"
        try:
            out.mkdir(parents=True, exist_ok=True)
            checkpoints.claim_output_dir(out, self.store.run_id)
            out_st = os.stat(out)
        except Exception as e:  # noqa: BLE001 - a bad output folder is a config error
            self.fail(f"output folder {out}: {e}", kind=EventKind.CONFIG_REJECTED)
            return
        env = runenv.for_run(self.store.path)  # captured at start, not this supervisor's own
        env.update(recipe.env)
        env.update({
            "QLW_RECIPE": str(adir / "recipe.json"), "QLW_EVENTS": str(events),
            "QLW_OUTPUT_DIR": str(out), "QLW_ATTEMPT": str(attempt), "QLW_EXTERNAL_PRUNE": "1",
            "QLW_RUN_ID": self.store.run_id, "PYTHONUNBUFFERED": "1",
        })
        env.update(trackers.trainer_env(recipe.train.report_to, self.store.run_id, self.store.path))
        env.pop("QLW_RESUME", None)
        if resume:
            env["QLW_RESUME"] = resume
        cache_dir = weight_cache_dir(recipe, self.store.path)
        env.pop("QLW_QCACHE_DIR", None)
        if cache_dir is not None:
            env["QLW_QCACHE_DIR"] = str(cache_dir)
        env.pop("QLW_DCACHE_DIR", None)
        if (data_cache := dataset_cache_dir(recipe, self.store.path)) is not None:
            env["QLW_DCACHE_DIR"] = str(data_cache)
        cwd = Path(self.run_info.cwd or os.getcwd())
        try:  # the ladder's settings, three ways: QLW_* env, {placeholders}, an axolotl copy
            ho = handoff.prepare(recipe, procgroup.trainer_argv(recipe),
                                 rungs=ladder.changes(self.recipe, rung),
                                 resume=resume, attempt=attempt, rung=rung, output_dir=out,
                                 cwd=cwd, attempt_dir=adir)
        except (handoff.HandoffError, OSError) as e:
            self.fail(f"cannot launch the command: {e}", kind=EventKind.CONFIG_REJECTED)
            return
        argv = ho.argv
        env.update(ho.env)
        for copy in ho.rewritten:
            io.record(EventKind.CONFIG_REWRITTEN, f"attempt {attempt} runs with {copy} (the ladder's "
                      "settings, resume_from_checkpoint and output_dir written in)")
        self.events.follow_attempt(attempt)
        self.events.new_attempt()
        self.child_rc = None
        oom_kills_before = oom_kills()  # the kernel's count: a SIGKILL exit is checked against it
        warm = await self.standby.take(attempt=attempt, env=env, cwd=cwd, argv=argv, recipe=recipe)
        self.last_launch = {"env": env, "cwd": cwd, "argv": argv, "recipe": recipe, "attempt": attempt,
                            "warm": warm is not None}
        try:
            self.proc = warm or procgroup.spawn(
                argv, env=env, cwd=cwd,
                exit_file=adir / "exit.json", log_path=self.store.log_path,
                log_max_bytes=recipe.supervisor.log_max_bytes,
                log_backups=recipe.supervisor.log_backups,
            )
        except OSError as e:
            self.fail(f"cannot start the trainer wrapper: {e}", kind=EventKind.CONFIG_REJECTED)
            return
        if self.download is not None:
            self.download.on_launch(env, recipe.model.name if recipe.model else None)
        ident = await asyncio.to_thread(procgroup.identity_after_exec, self.proc.pid, list(self.proc.args))
        launched = time.time()
        self.mark_time(launched)
        what = f" from {Path(resume).name}" if resume else ""
        io.set_state(
            RunState.STARTING, why=f"attempt {attempt} spawned{what}",
            attempt=attempt, lineage=lineage, rung=rung, output_dir=str(out),
            output_dir_id=[out_st.st_dev, out_st.st_ino],  # deletion refuses a swapped folder
            wrapper=ident.to_dict() if ident else {"pid": self.proc.pid}, exited=False,
            resume_from=resume, events_offset=0, phase=None, phase_since=launched,
            launched_at=launched, max_steps=None, oom_kills_at_launch=oom_kills_before,
            effective={"max_seq_len": recipe.train.max_seq_len, "r": recipe.lora.r,
                       "alpha": recipe.lora.alpha,
                       "target_modules": recipe.lora.target_modules,
                       "per_device_batch": recipe.train.per_device_batch,
                       "grad_accum": recipe.train.grad_accum},
        )
        how = ", warm standby: imports already done" if warm else ""
        io.record(EventKind.LAUNCHED, f"attempt {attempt} started{what} (pid {self.proc.pid}{how})",
                  evidence={"argv": redact_argv(argv)[:3], "resume": resume, "rung": rung,
                            "rung_label": ladder.label(rung), "output_dir": str(out),
                            "warm_standby": bool(warm)})

    def on_phase(self, phase: str) -> None:
        """The next attempt's standby: beside the load of a cold attempt (an OOM can come at its
        first step), after the first step of a warm one (nothing competes with its load)."""
        warm = bool((self.last_launch or {}).get("warm"))
        if phase == ("training" if warm else "loading_model"):
            self.prepare_standby()

    def prepare_standby(self) -> None:
        """A warm standby for the next attempt, once this one trains (its imports then compete
        with nothing but training). Never for a user's command; replaced after each use."""
        last = self.last_launch
        if last is None or self.standby.current is not None or self.st.run_state.terminal:
            return
        recipe = last["recipe"]
        if StandbyManager.off_reason(recipe, last["argv"]) is not None:
            return
        from supervisor.runner.backends import planned_backend

        nxt = last["attempt"] + 1
        adir = self.store.attempt_dir(nxt)
        try:
            adir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError:
            return
        env = {k: v for k, v in last["env"].items() if not k.startswith("QLW_")}
        backend = planned_backend(recipe) if recipe.model is not None else "hf"
        self.standby.start(attempt=nxt, folder=self.store.path / "standby" / str(nxt), env=env,
                           cwd=last["cwd"], backend=backend, recipe=recipe, exit_file=adir / "exit.json",
                           log_path=self.store.log_path,
                           log_max_bytes=recipe.supervisor.log_max_bytes,
                           log_backups=recipe.supervisor.log_backups)

    # -- polling ----------------------------------------------------------------------
    async def poll(self) -> None:
        statuses = procgroup.reap_children()
        self.standby.forget_if_reaped(statuses)
        if self.standby.current is not None and self.st.run_state.terminal:
            await asyncio.to_thread(self.standby.discard)
        w = self.st.wrapper or {}
        tree = getattr(self.sampler, "tree_pids", None)
        if tree and self.trainer_alive():
            self.tree_pids = set(tree)
        if self.proc is not None and self.proc.pid in statuses:
            self.child_rc = statuses[self.proc.pid]
            self.proc.returncode = self.child_rc  # keep Popen from waiting again
        if w and not self.st.exited:
            gone = (self.child_rc is not None) if self.proc is not None else not procgroup.verify(w)
            if gone:
                info = await self._read_exit_file()
                await self.handle_exit(info)
        if self.stop_deadline is not None and time.monotonic() > self.stop_deadline:
            self.stop_deadline = None
            if w and procgroup.signal_group(w["pid"], signal.SIGKILL):
                self.stop_killed = True
                self.io.record(EventKind.STOP_SENT, f"trainer did not exit within {self.recipe.supervisor.stop_grace_s:.0f} s "
                               f"of {self.recipe.trainer.stop_signal}: killed the process group",
                               level="warning")
        if self.next_launch_mono is not None and time.monotonic() >= self.next_launch_mono:
            self.next_launch_mono = None
            action, self.pending = self.pending, None
            if action is not None:
                await self._relaunch_now(action)

    async def _read_exit_file(self) -> dict[str, Any]:
        path = self.attempt_dir() / "exit.json"
        for _ in range(20):
            info = read_json(path)
            if info is not None:
                return info
            await asyncio.sleep(0.05)
        # No exit file: the wrapper itself was killed (SIGKILL to the group).
        rc = self.child_rc
        return {"returncode": rc, "signal": -rc if rc is not None and rc < 0 else None,
                "tail": self.events.log_ring[-TAIL_LINES:], "no_exit_file": True}  # as the wrapper keeps

    async def handle_exit(self, info: dict[str, Any]) -> None:
        st, io = self.st, self.io
        w = st.wrapper or {}
        rc, sig = info.get("returncode"), info.get("signal")
        tail = [str(x) for x in info.get("tail") or []]
        pgid = w.get("pid")
        if pgid:  # leftover workers hold GPU memory: kill the group and subreaped escapers
            procgroup.signal_group(pgid, signal.SIGKILL)
        # not the trackers' own (wandb's service), not the standby
        procgroup.kill_orphans(self.helper_pids() | self.standby.pids())
        io.set_state(exited=True, exit_code=rc, exit_signal=sig, ended_at=time.time())
        self.events.read()  # the last events and log lines before exit (checkpoint, finished)
        self.events.discover_checkpoints()  # a command without events: its last save
        await self._prune()
        before, now = st.oom_kills_at_launch, oom_kills()
        cls = guardlib.classify_exit(
            returncode=rc, signal=sig, stderr_tail=tail,
            oom_kill_delta=now - before if isinstance(before, int) and now is not None else None,
            gpu_lost=self.gpu_lost(),
            spawn_error=info.get("spawn_error"), stop_requested=self.stop_reason is not None,
        )
        io.record(EventKind.TRAINER_EXITED, f"attempt {st.attempt} exited: {cls.describe()}",
                  level="info" if cls.kind in ("completed", "stopped") else "error",
                  evidence={"returncode": rc, "signal": sig, "class": cls.kind,
                            "last_lines": tail[-5:]})
        if self.stop_reason is not None:
            killed = " (killed, nothing saved)" if self.stop_now else " (killed after grace)"
            msg = self.stop_reason + (killed if self.stop_killed else "")
            newest = checkpoints.newest_complete(self.output_dir(), run_id=self.store.run_id)
            if newest:
                msg += (f"; newest complete checkpoint: {newest.path.name}; continue with "
                        f"`qlora-watch resume {self.store.run_id}`")
            final = st.stop_state or RunState.STOPPED
            io.set_state(final, why=f"the trainer exited after a stop ({cls.kind})", message=msg)
            return
        if cls.kind == "completed":
            io.set_state(RunState.COMPLETED, why="the trainer exited 0 after its last step",
                         message="training finished", adapter_path=st.adapter_path)
            return
        actions = guardlib.decide_relaunch(cls, self.window(), self.recipe, self.recipe.guards)
        await self.execute(actions)

    async def _prune(self) -> None:
        """The final retention pass when an attempt ends."""
        try:
            plan = prune_plan(checkpoints.scan(self.output_dir()),
                              keep=self.recipe.train.save_total_limit,
                              keep_best=self.recipe.guards.checkpoints.keep_best,
                              run_id=self.store.run_id)
        except Exception as e:  # noqa: BLE001
            log.warning("prune plan failed: %s", e)
            return
        if plan:
            await self.execute([PruneCheckpoints(
                names=[c.name for c in plan],
                reason=f"retention: keep {self.recipe.train.save_total_limit} complete checkpoints")])

    # -- stop ---------------------------------------------------------------------------
    async def request_stop(self, now: bool, reason: str, state: RunState = RunState.STOPPED) -> None:
        st, io = self.st, self.io
        if st.run_state.terminal:
            return
        self.stop_reason = reason
        self.next_launch_mono, self.pending = None, None
        w = st.wrapper or {}
        if not self.trainer_alive():
            io.set_state(state, why=f"stop with no trainer running: {reason}", message=reason)
            return
        io.set_state(RunState.STOPPING, why=f"stop requested: {reason}", stop_state=state, message=reason)
        pgid = w["pid"]
        if now:
            procgroup.signal_group(pgid, signal.SIGKILL)
            self.stop_killed = self.stop_now = True
            io.record(EventKind.STOP_SENT, f"{reason}: killed the process group (--now)", level="warning")
            return
        name = self.recipe.trainer.stop_signal  # SIGINT for scripts that save on KeyboardInterrupt
        procgroup.signal_group(pgid, getattr(signal, name))
        procgroup.signal_group(pgid, signal.SIGCONT)  # a stopped trainer must see the signal
        self.stop_deadline = time.monotonic() + self.recipe.supervisor.stop_grace_s
        io.record(EventKind.STOP_SENT, f"{reason}: {name} sent; the trainer saves a checkpoint "
                  f"(grace {self.recipe.supervisor.stop_grace_s:.0f} s)")

    def fail(self, message: str, kind: str = EventKind.RUN_FAILED, state: RunState = RunState.FAILED) -> None:
        self.io.record(kind, message, level="error")
        self.io.set_state(state, why=f"{kind}: {_first_line(message)}", message=message, exited=True)

    # -- relaunch -----------------------------------------------------------------------
    async def relaunch_after_backoff(self, a: Relaunch) -> None:
        """A Relaunch action: stop a stuck trainer, BACKOFF for a.delay_s, then launch."""
        st, io = self.st, self.io
        if self.trainer_alive():  # a stall: stop the stuck trainer first
            w = st.wrapper or {}
            procgroup.signal_group(w["pid"], signal.SIGKILL)
            await asyncio.to_thread(procgroup.wait_gone, w["pid"], 10.0)
            io.set_state(exited=True)
        io.record(EventKind.RELAUNCH_SCHEDULED, a.message, level="warning", guard=a.guard, evidence=a.evidence)
        io.set_state(RunState.BACKOFF, why=f"{a.reason}: relaunch in {a.delay_s:g} s",
                     next_launch_in_s=a.delay_s,
                     # restarts: every relaunch of the run (what `status --json` and the report count);
                     # restarts_since_progress: the crash budget (guards.relaunch.restarts_after)
                     restarts=(st.restarts or 0) + 1,
                     restarts_since_progress=restarts_after(st.restarts_since_progress or 0, "relaunch",
                                                            rung_before=st.rung, rung_after=a.rung))
        self.pending = a
        self.next_launch_mono = time.monotonic() + max(0.0, a.delay_s)

    async def _relaunch_now(self, a: Relaunch) -> None:
        if not await self._gpu_released():
            return
        # A checkpoint cut short by the crash must never be resumed or counted: set it aside.
        infos = checkpoints.scan(self.output_dir())
        newest = newest_complete_of(infos, run_id=self.store.run_id)
        partial = [i.name for i in infos if not i.complete and not i.quarantined
                   and i.step is not None
                   and (newest is None or i.step > newest.step)]
        if partial:
            checkpoints.quarantine(self.output_dir(), partial)
            self.io.record(EventKind.CHECKPOINT_QUARANTINED, f"set aside incomplete {', '.join(partial)}",
                           level="warning")
        rung = a.rung
        if rung != self.st.rung and rung is not None:
            # what this rung changes, from the rung below as this run had it (its --set included)
            desc = ladder.describe_change(self.effective_recipe(ladder.previous(rung)),
                                          ladder.change(self.recipe, rung))
            self.io.set_state(rung_desc=f"{desc} after OOM")
        await self.launch(resume=a.resume_from, rung=rung, fresh=a.fresh_output)

    async def _gpu_released(self) -> bool:
        """Bounded wait: the old group gone and its GPU memory back near the baseline."""
        w = self.st.wrapper or {}
        cfg = self.recipe.guards.oom
        if w.get("pid") and not await asyncio.to_thread(procgroup.wait_gone, w["pid"], cfg.release_timeout_s):
            self.fail(f"the old trainer group {w['pid']} is still alive after "
                      f"{cfg.release_timeout_s:.0f} s: not relaunching")
            return False
        nvml = getattr(self.sampler, "nvml", None)
        held = getattr(nvml, "gpu_memory_held_by", None)
        if held is None or getattr(nvml, "status", "ok") != "ok":
            return True  # no NVML (a CPU box): nothing to wait for
        pids = set(self.tree_pids) | ({w["pid"]} if w.get("pid") else set())
        deadline = time.monotonic() + cfg.release_timeout_s
        mib: float | None = None
        while time.monotonic() < deadline:
            try:
                mib = await asyncio.wait_for(asyncio.to_thread(held, pids), 5.0)
            except Exception:  # noqa: BLE001 - a hung or failing NVML: do not wait forever
                mib = None
            if mib is not None and mib <= cfg.release_tolerance_mib:
                return True
            await asyncio.sleep(0.2)
        if mib is None:
            self.io.record(EventKind.GPU_RELEASE_UNCONFIRMED, "could not confirm that the GPU memory was released "
                           "(NVML did not answer); relaunching anyway", level="warning")
            return True
        self.fail(f"GPU memory still held ({mib:.0f} MiB) by the old trainer's processes "
                  f"{sorted(pids)}: not relaunching")
        return False


def _first_line(text: str, limit: int = 120) -> str:
    return text.split("\n", 1)[0][:limit]

"""Attempts: launching, adopting, stopping and relaunching the trainer; guard actions.

An attempt is one launch of the trainer. A *lineage* is a chain of attempts that resume
from each other's checkpoints in one output folder; an OOM-ladder rung that changes the
adapter's shape (rank, targets) starts a new lineage in a folder of its own, and the
earlier lineage's checkpoints are kept.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from supervisor import guards as guardlib
from supervisor import ladder, procgroup, runenv
from supervisor.checkpoints import folders as checkpoints
from supervisor.checkpoints.plan import newest_complete_of, prune_plan
from supervisor.daemon import foreign, handoff
from supervisor.daemon.followers import JsonlFollower
from supervisor.daemon.standby import StandbyManager
from supervisor.guards.relaunch import restarts_after
from supervisor.recipe import Recipe, recipe_to_json
from supervisor.records import EventKind, Step
from supervisor.redact import redact_argv
from supervisor.sinks import trackers
from supervisor.states import RunState
from supervisor.store import read_json
from supervisor.telemetry.host import oom_kills
from supervisor.wrapper import TAIL_LINES

if TYPE_CHECKING:
    from supervisor.daemon.core import Supervisor

log = logging.getLogger("qlora-watch.attempts")

GUARD_EVERY_S = 1.0

PHASE_STATES = {
    "loading_model": RunState.LOADING,
    "tokenising": RunState.LOADING,
    "training": RunState.TRAINING,
    "saving": RunState.SAVING,
}


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


def _runs_builtin(command: list[str]) -> bool:
    return "supervisor.runner.train" in command


class AttemptRunner:
    def __init__(self, sup: "Supervisor"):
        self.sup = sup
        self.proc: Any = None  # Popen of the wrapper when it is our child
        self.child_rc: int | None = None
        self.stop_deadline: float | None = None  # monotonic
        self.stop_reason: str | None = None
        self.stop_killed = False
        self.next_launch_mono: float | None = None
        self.pending: Any = None  # the Relaunch action waiting for its back-off
        self.fired: set[str] = set()
        self.last_state_write = 0.0
        self.busy = False  # a decisive action (stop, relaunch) is being carried out
        self.stop_now = False
        self.last_guard_mono = 0.0
        self.tree_pids: set[int] = set()  # the trainer's processes, for the GPU release check
        self._reach: tuple[str | None] | None = None  # ladder_reach(), read once
        self.standby = StandbyManager(lambda *a, **kw: self.sup.record(*a, **kw))  # the warm interpreter
        self.last_launch: dict[str, Any] | None = None  # env/cwd/argv of the latest launch

    # -- helpers ------------------------------------------------------------------------
    @property
    def st(self) -> dict[str, Any]:
        return self.sup.state

    @property
    def recipe(self) -> Recipe:
        return self.sup.recipe

    def wrapper_pid(self) -> int | None:
        w = self.st.get("wrapper") or {}
        return w.get("pid") if self.trainer_alive() else None

    def output_dir(self) -> Path:
        return Path(self.st.get("output_dir") or self.sup.run_info["output_dir"])

    def attempt_dir(self) -> Path:
        """The current attempt's folder in the run store."""
        return self.sup.store.attempt_dir(self.st.get("attempt") or 1)

    def trainer_alive(self) -> bool:
        w = self.st.get("wrapper")
        if not w or self.st.get("exited"):
            return False
        return procgroup.group_alive(w["pid"])

    def ladder_reach(self) -> str | None:
        """How the ladder's settings reach this trainer; None when they cannot (handoff.py)."""
        if self.st.get("settings_read"):
            return "settings"
        if self._reach is None:
            cwd = Path(self.sup.run_info.get("cwd") or os.getcwd())
            self._reach = (handoff.ladder_reaches(self.recipe, cwd),)
        return self._reach[0]

    def effective_recipe(self, rung: int | None) -> Recipe:
        """The base recipe at `rung` (ladder.effective), then the --set of every
        `qlora-watch resume` (resume.effective)."""
        from supervisor.control.resume import effective

        return effective(self.recipe, rung, list(self.st.get("overrides") or []))

    # -- start ------------------------------------------------------------------------
    def mark_time(self, wall: float) -> None:
        """Anchor the guards' clock: `wall` was just seen; build.py advances it monotonically."""
        self.sup.clock_anchor = (wall, time.monotonic())

    async def begin(self) -> None:
        self.mark_time(time.time())
        st = self.st
        state = st.get("state")
        if not state:
            self.sup.set_state(RunState.STARTING, attempt=0, lineage=1, rung=None, restarts=0,
                               restarts_since_progress=0,
                               started_at=time.time(), output_dir=self.sup.run_info["output_dir"])
            self._finish_pending_deletes()
            await self.execute(self._prelaunch_checks())
            rung = self.sup.run_info.get("start_rung")  # --auto-fit
            await self.launch(resume=None, rung=rung)
            return
        if RunState(state).terminal:
            return  # serve history only
        request = st.get("resume_request")
        if request is not None:  # `qlora-watch resume` (resume.py): a new attempt in this run
            # The last attempt's wrapper is history now: any process of it still alive (a LOST
            # run's trainer) is a stray, and two trainers must not share the output folder.
            self.sup.set_state(resume_request=None, wrapper=None)
            self._finish_pending_deletes()
            await self._stop_strays()
            await self.launch(resume=request.get("from"), rung=st.get("rung"),
                              fresh=bool(request.get("fresh")))
            return
        self._finish_pending_deletes()  # a supervisor killed mid-delete left .deleting-<ts>
        await self._stop_strays()  # a supervisor killed between spawn and record left one
        wrapper = st.get("wrapper")
        attempt = st.get("attempt") or 1
        exit_file = self.attempt_dir() / "exit.json"
        self._follow_attempt(attempt, offset=st.get("events_offset", 0))
        if wrapper and procgroup.verify(wrapper):
            self.sup.record(EventKind.ADOPTED, f"adopted trainer group {wrapper['pid']} (attempt {attempt}); "
                            "pid, start time, boot id and command line verified")
            return
        if exit_file.exists():
            self.sup.record(EventKind.ADOPTED, f"attempt {attempt} ended while no supervisor was running")
            await self.handle_exit(read_json(exit_file) or {})
            return
        if not wrapper:
            # Supervisor died before recording a launch: launch now, from what exists.
            newest = checkpoints.newest_complete(self.output_dir(), run_id=self.sup.store.run_id)
            await self.launch(resume=newest.target if newest else None,
                              rung=self.sup.run_info.get("start_rung"))
            return
        newest = checkpoints.newest_complete(self.output_dir(), run_id=self.sup.store.run_id)
        hint = (f"; continue from {newest.path.name} with `qlora-watch resume {self.sup.store.run_id}`"
                if newest else "")
        self.sup.record(EventKind.TRAINER_LOST, f"trainer pid {wrapper.get('pid')} cannot be verified (gone or "
                        f"reused); it was not signalled{hint}", level="error")
        self.sup.set_state(RunState.LOST, message=f"trainer lost{hint}", exited=True)

    async def _stop_strays(self) -> None:
        """Stop trainer groups of this run that the state does not name.

        A supervisor killed between spawning the wrapper and recording it in state.json leaves
        a trainer nobody tracks; launching again would put two trainers on one output folder.
        Such a wrapper is recognised by its --exit-file inside this run's folder (and our uid);
        its group is killed, and the complete checkpoints it wrote are adopted so that the
        relaunch resumes from them.
        """
        known = (self.st.get("wrapper") or {}).get("pid")
        prefix = str(self.sup.store.path / "attempts") + os.sep
        stopped = []
        for p in psutil.process_iter(["pid", "cmdline", "uids"]):
            try:
                cmd = p.info.get("cmdline") or []
                if p.pid == known or "supervisor.wrapper" not in cmd or "--exit-file" not in cmd:
                    continue
                exit_file = cmd[cmd.index("--exit-file") + 1]
                uids = p.info.get("uids")
                if not exit_file.startswith(prefix) or uids is None or uids.real != os.getuid():
                    continue
                if p.status() == psutil.STATUS_ZOMBIE:
                    continue
            except (psutil.Error, IndexError):
                continue
            procgroup.signal_group(p.pid, signal.SIGKILL)
            await asyncio.to_thread(procgroup.wait_gone, p.pid, 10.0)
            stopped.append(p.pid)
        if not stopped:
            return
        adopted = checkpoints.adopt_checkpoints(self.output_dir(), self.sup.store.run_id)
        self.sup.record(EventKind.STRAYS_STOPPED, f"stopped trainer group(s) {stopped} that a previous supervisor "
                        "started but never recorded (two trainers must not share a run)"
                        + (f"; adopted {', '.join(adopted)}" if adopted else ""), level="warning")

    def _finish_pending_deletes(self) -> None:
        """Complete the phase 2 of deletes that an earlier supervisor did not finish."""
        out = self.output_dir()
        if not out.is_dir():
            return
        results = checkpoints.finish_pending_deletes(out, self.sup.store.path / "deletions.log")
        for r in results:
            if r.ok:
                self.sup.record(EventKind.CHECKPOINT_PRUNED, f"finished the interrupted delete of {r.name}",
                                evidence={"bytes": r.size_bytes})
            else:
                self.sup.record(EventKind.PRUNE_FAILED, f"could not finish deleting {r.name}: {r.error}",
                                level="warning")

    def _prelaunch_checks(self) -> list[Any]:
        """Host RAM against what the run needs (model loading + paged optimiser state)."""
        need = (self.sup.run_info.get("estimate") or {}).get("host_ram_needed_bytes")
        return guardlib.prelaunch_host_ram(psutil.virtual_memory().available, need,
                                           self.recipe.guards.host_ram)

    def _follow_attempt(self, attempt: int, offset: int = 0) -> None:
        path = self.sup.store.attempt_dir(attempt) / "events.jsonl"
        self.sup.events_follower = JsonlFollower(path, offset=offset)

    async def launch(self, resume: str | None, rung: int | None = None, fresh: bool = False) -> None:
        st = self.st
        attempt = (st.get("attempt") or 0) + 1
        lineage = (st.get("lineage") or 1) + (1 if fresh else 0)
        base_out = Path(self.sup.run_info["output_dir"])
        out = base_out if lineage == 1 else base_out / f"attempt-{attempt}"
        recipe = self.effective_recipe(rung)
        adir = self.sup.store.attempt_dir(attempt)
        adir.mkdir(parents=True, exist_ok=True, mode=0o700)
        (adir / "recipe.json").write_text(recipe_to_json(recipe))
        events = adir / "events.jsonl"
        try:
            out.mkdir(parents=True, exist_ok=True)
            checkpoints.claim_output_dir(out, self.sup.store.run_id)
            out_st = os.stat(out)
        except Exception as e:  # noqa: BLE001 - a bad output folder is a config error
            self._fail(f"output folder {out}: {e}", kind=EventKind.CONFIG_REJECTED)
            return
        env = runenv.for_run(self.sup.store.path)  # captured at start, not this supervisor's own
        env.update(recipe.env)
        env.update({
            "QLW_RECIPE": str(adir / "recipe.json"), "QLW_EVENTS": str(events),
            "QLW_OUTPUT_DIR": str(out), "QLW_ATTEMPT": str(attempt), "QLW_EXTERNAL_PRUNE": "1",
            "QLW_RUN_ID": self.sup.store.run_id, "PYTHONUNBUFFERED": "1",
        })
        env.update(trackers.trainer_env(recipe.train.report_to, self.sup.store.run_id, self.sup.store.path))
        env.pop("QLW_RESUME", None)
        if resume:
            env["QLW_RESUME"] = resume
        cache_dir = weight_cache_dir(recipe, self.sup.store.path)
        env.pop("QLW_QCACHE_DIR", None)
        if cache_dir is not None:
            env["QLW_QCACHE_DIR"] = str(cache_dir)
        cwd = Path(self.sup.run_info.get("cwd") or os.getcwd())
        try:  # the ladder's settings, three ways: QLW_* env, {placeholders}, an axolotl copy
            ho = handoff.prepare(recipe, procgroup.trainer_argv(recipe),
                                 rungs=ladder.changes(self.recipe, rung),
                                 resume=resume, attempt=attempt, rung=rung, output_dir=out,
                                 cwd=cwd, attempt_dir=adir)
        except (handoff.HandoffError, OSError) as e:
            self._fail(f"cannot launch the command: {e}", kind=EventKind.CONFIG_REJECTED)
            return
        argv = ho.argv
        env.update(ho.env)
        for copy in ho.rewritten:
            self.sup.record(EventKind.CONFIG_REWRITTEN, f"attempt {attempt} runs with {copy} (the ladder's "
                            "settings, resume_from_checkpoint and output_dir written in)")
        self._follow_attempt(attempt)
        self.sup.new_attempt()
        self.child_rc = None
        oom_kills_before = oom_kills()  # the kernel's count: a SIGKILL exit is checked against it
        warm = await self.standby.take(attempt=attempt, env=env, cwd=cwd, argv=argv, recipe=recipe)
        self.last_launch = {"env": env, "cwd": cwd, "argv": argv, "recipe": recipe, "attempt": attempt,
                            "warm": warm is not None}
        try:
            self.proc = warm or procgroup.spawn(
                argv, env=env, cwd=cwd,
                exit_file=adir / "exit.json", log_path=self.sup.store.log_path,
                log_max_bytes=recipe.supervisor.log_max_bytes,
                log_backups=recipe.supervisor.log_backups,
            )
        except OSError as e:
            self._fail(f"cannot start the trainer wrapper: {e}", kind=EventKind.CONFIG_REJECTED)
            return
        self.sup.download.on_launch(env, recipe.model.name if recipe.model else None)
        ident = await asyncio.to_thread(procgroup.identity_after_exec, self.proc.pid, list(self.proc.args))
        launched = time.time()
        self.mark_time(launched)
        self.sup.set_state(
            RunState.STARTING, attempt=attempt, lineage=lineage, rung=rung, output_dir=str(out),
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
        what = f" from {Path(resume).name}" if resume else ""
        how = ", warm standby: imports already done" if warm else ""
        self.sup.record(EventKind.LAUNCHED, f"attempt {attempt} started{what} (pid {self.proc.pid}{how})",
                        evidence={"argv": redact_argv(argv)[:3], "resume": resume, "rung": rung,
                                  "rung_label": ladder.label(rung),
                                  "output_dir": str(out), "warm_standby": bool(warm)})

    def prepare_standby(self) -> None:
        """A warm standby for the next attempt, once this one trains (its imports then compete
        with nothing but training). Never for a user's command; replaced after each use."""
        last = self.last_launch
        if last is None or self.standby.current is not None or self.sup.run_state.terminal:
            return
        recipe = last["recipe"]
        if StandbyManager.off_reason(recipe, last["argv"]) is not None:
            return
        from supervisor.runner.backends import planned_backend

        nxt = last["attempt"] + 1
        adir = self.sup.store.attempt_dir(nxt)
        try:
            adir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError:
            return
        env = {k: v for k, v in last["env"].items() if not k.startswith("QLW_")}
        backend = planned_backend(recipe) if recipe.model is not None else "hf"
        self.standby.start(attempt=nxt, folder=self.sup.store.path / "standby" / str(nxt), env=env,
                           cwd=last["cwd"], backend=backend, recipe=recipe, exit_file=adir / "exit.json",
                           log_path=self.sup.store.log_path,
                           log_max_bytes=recipe.supervisor.log_max_bytes,
                           log_backups=recipe.supervisor.log_backups)

    # -- polling ----------------------------------------------------------------------
    async def poll(self) -> None:
        statuses = procgroup.reap_children()
        self.standby.forget_if_reaped(statuses)
        if self.standby.current is not None and self.sup.run_state.terminal:
            await asyncio.to_thread(self.standby.discard)
        w = self.st.get("wrapper") or {}
        tree = getattr(self.sup.sampler, "tree_pids", None)
        if tree and self.trainer_alive():
            self.tree_pids = set(tree)
        if self.proc is not None and self.proc.pid in statuses:
            self.child_rc = statuses[self.proc.pid]
            self.proc.returncode = self.child_rc  # keep Popen from waiting again
        if w and not self.st.get("exited"):
            gone = (self.child_rc is not None) if self.proc is not None else not procgroup.verify(w)
            if gone:
                info = await self._read_exit_file()
                await self.handle_exit(info)
        if self.stop_deadline is not None and time.monotonic() > self.stop_deadline:
            self.stop_deadline = None
            if w and procgroup.signal_group(w["pid"], signal.SIGKILL):
                self.stop_killed = True
                self.sup.record(EventKind.STOP_SENT, f"trainer did not exit within {self.recipe.supervisor.stop_grace_s:.0f} s "
                                f"of {self.recipe.trainer.stop_signal}: killed the process group",
                                level="warning")
        if self.next_launch_mono is not None and time.monotonic() >= self.next_launch_mono:
            self.next_launch_mono = None
            action, self.pending = self.pending, None
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
                "tail": self.sup.log_ring[-TAIL_LINES:], "no_exit_file": True}  # as the wrapper keeps

    async def handle_exit(self, info: dict[str, Any]) -> None:
        w = self.st.get("wrapper") or {}
        rc, sig = info.get("returncode"), info.get("signal")
        tail = [str(x) for x in info.get("tail") or []]
        pgid = w.get("pid")
        if pgid:  # leftover workers hold GPU memory: kill the group and subreaped escapers
            procgroup.signal_group(pgid, signal.SIGKILL)
        procgroup.kill_orphans(self.sup.tb.helper_pids() | self.standby.pids())  # not the trackers' (wandb's service), not the standby
        self.sup.set_state(exited=True, exit_code=rc, exit_signal=sig, ended_at=time.time())
        self.sup._follow_events()  # the last events before exit (checkpoint, finished)
        self.sup._follow_log()
        self.discover_checkpoints()  # a command without events: its last save
        self._prune()
        before, now = self.st.get("oom_kills_at_launch"), oom_kills()
        cls = guardlib.classify_exit(
            returncode=rc, signal=sig, stderr_tail=tail,
            oom_kill_delta=now - before if isinstance(before, int) and now is not None else None,
            gpu_lost=any(g.lost for s in self.sup.recent_samples[-3:] for g in s.gpus),
            spawn_error=info.get("spawn_error"), stop_requested=self.stop_reason is not None,
        )
        self.sup.record(EventKind.TRAINER_EXITED, f"attempt {self.st.get('attempt')} exited: {cls.describe()}",
                        level="info" if cls.kind in ("completed", "stopped") else "error",
                        evidence={"returncode": rc, "signal": sig, "class": cls.kind,
                                  "last_lines": tail[-5:]})
        if self.stop_reason is not None:
            killed = " (killed, nothing saved)" if self.stop_now else " (killed after grace)"
            msg = self.stop_reason + (killed if self.stop_killed else "")
            newest = checkpoints.newest_complete(self.output_dir(), run_id=self.sup.store.run_id)
            if newest:
                msg += (f"; newest complete checkpoint: {newest.path.name}; continue with "
                        f"`qlora-watch resume {self.sup.store.run_id}`")
            final = self.st.get("stop_state") or RunState.STOPPED.value
            self.sup.set_state(RunState(final), message=msg)
            return
        if cls.kind == "completed":
            self.sup.set_state(RunState.COMPLETED, message="training finished",
                               adapter_path=self.st.get("adapter_path"))
            return
        window = self.window()
        actions = guardlib.decide_relaunch(cls, window, self.recipe, self.recipe.guards)
        await self.execute(actions)

    # -- trainer events ---------------------------------------------------------------
    def on_trainer_event(self, obj: dict[str, Any]) -> None:
        kind = obj.get("event")
        if kind == "phase":
            phase = str(obj.get("phase"))
            new = PHASE_STATES.get(phase)
            fields: dict[str, Any] = {"phase": phase, "phase_since": time.time()}
            self.mark_time(fields["phase_since"])
            if new is not None and self.sup.run_state not in (RunState.STOPPING,):
                self.sup.set_state(new, **fields)
            else:
                self.sup.set_state(**fields)
            if phase not in ("saving", "training") or not self.st.get("step"):
                self.sup.record(EventKind.PHASE_CHANGED, f"trainer phase: {phase}")  # not every save's toggles
            # The next attempt's standby: beside the load of a cold attempt (an OOM can come at
            # its first step), after the first step of a warm one (nothing competes with its load).
            warm = bool((self.last_launch or {}).get("warm"))
            if phase == ("training" if warm else "loading_model"):
                self.prepare_standby()
        elif kind == "checkpoint":
            path = Path(str(obj.get("path", "")))
            info = checkpoints.checkpoint_status(path)
            if info.complete:
                try:
                    checkpoints.mark_checkpoint(path, self.sup.store.run_id)
                except OSError as e:  # ENOSPC: a full disk must not take the supervisor down
                    self.sup.record(EventKind.CHECKPOINT_UNMARKED, f"{path.name} is complete but could not be "
                                    f"marked as this run's ({e.strerror or e}); it will not be "
                                    "resumed from automatically", level="warning")
                    return
                self._accepted(info)
            else:
                self.sup.record(EventKind.CHECKPOINT_INCOMPLETE, f"{path.name}: {info.reason}", level="warning")
        elif kind == "finished":
            self.sup.set_state(adapter_path=obj.get("adapter_path"), phase="finished")
            self.sup.record(EventKind.TRAINING_FINISHED, f"adapter saved to {obj.get('adapter_path')}")
        elif kind == "notice":
            self.sup.record(EventKind.TRAINER_NOTED, str(obj.get("message", ""))[:2000])
            if isinstance(obj.get("cache_bytes"), int):  # the weight cache: shown in the dashboard
                self.sup.set_state(weight_cache={"bytes": obj["cache_bytes"], "key": obj.get("cache_key"),
                                                 "dir": obj.get("cache_dir")})
        elif kind == "settings":  # effective_settings() was called: the ladder reaches it
            self.sup.set_state(settings_read=True)

    def _accepted(self, info: Any) -> None:
        """A complete checkpoint of this run: progress (it resets the crash budget)."""
        self.sup.set_state(last_checkpoint=str(info.path), last_checkpoint_step=info.step,
                           last_checkpoint_bytes=info.size_bytes,
                           restarts_since_progress=restarts_after(self.st.get("restarts_since_progress") or 0, "progress"),
                           last_progress_t=time.time())
        from supervisor.units import size

        self.sup.record(EventKind.CHECKPOINT_SAVED, f"{info.name} saved ({size(info.size_bytes)})",
                        evidence={"step": info.step, "bytes": info.size_bytes})

    def discover_checkpoints(self) -> None:
        """A command that sends no checkpoint events: find its saves by scanning (foreign.py)."""
        if not self.recipe.trainer.command or self.st.get("speaks_events"):
            return  # a trainer that sends `checkpoint` events says itself which saves are its own
        new, no_adapter = foreign.discover(self.output_dir(), self.sup.store.run_id)
        for info in new:
            self._accepted(info)
            if self.sup.step_source in (None, "history"):  # no callback, no log lines: its log_history
                self.sup.take_steps(foreign.history_steps(info.path, after=self.st.get("step") or 0),
                                    source="history")
        for info in no_adapter[-1:]:
            if "no_adapter" not in self.fired:  # said once, not every scan
                self.fired.add("no_adapter")
                self.sup.record(EventKind.CHECKPOINT_WITHOUT_ADAPTER, foreign.no_adapter_message(info),
                                level="warning")

    def _training_seen(self) -> None:
        """A trainer with no phase events (a foreign command) is training once it shows steps."""
        if self.sup.run_state in (RunState.STARTING, RunState.LOADING) and self.st.get("phase") is None:
            self.sup.set_state(RunState.TRAINING, phase="training", phase_since=time.time())

    def on_steps(self, steps: list[Step]) -> None:
        last = steps[-1]
        self._training_seen()
        self.mark_time(last.t)
        fields: dict[str, Any] = {"step": last.step, "last_step_t": last.t}
        if last.loss is not None:
            fields["last_loss"] = last.loss
        if last.max_steps:
            fields["max_steps"] = last.max_steps
        if last.tokens_per_s is not None:
            fields["tokens_per_s"] = last.tokens_per_s
        fields["eta_s"] = self._eta(last)
        fields["events_offset"] = self.sup.events_follower.offset if self.sup.events_follower else 0
        self.st.update(fields)
        now = time.monotonic()
        if now - self.last_state_write >= 1.0:  # state.json at most once a second
            self.last_state_write = now
            self.sup.set_state()

    def on_bar(self, step: int, total: int) -> None:
        """A progress bar line (no logged step): the step and total for status and ETA."""
        self._training_seen()
        self.st.update(step=step, max_steps=total, last_step_t=time.time())
        self.mark_time(time.time())
        now = time.monotonic()
        if now - self.last_state_write >= 1.0:
            self.last_state_write = now
            self.sup.set_state()

    def _eta(self, last: Step) -> float | None:
        steps = [s for s in self.sup.recent_steps[-50:] if s.attempt == last.attempt]
        if not last.max_steps or len(steps) < 2:
            return None
        dt = steps[-1].t - steps[0].t
        ds = steps[-1].step - steps[0].step
        if dt <= 0 or ds <= 0:
            return None
        return max(0.0, (last.max_steps - last.step) * dt / ds)

    # -- stop ---------------------------------------------------------------------------
    async def request_stop(self, now: bool, reason: str, state: RunState = RunState.STOPPED) -> None:
        if self.sup.run_state.terminal:
            return
        self.stop_reason = reason
        self.next_launch_mono, self.pending = None, None
        w = self.st.get("wrapper") or {}
        if not self.trainer_alive():
            self.sup.set_state(state, message=reason)
            return
        self.sup.set_state(RunState.STOPPING, stop_state=state.value, message=reason)
        pgid = w["pid"]
        if now:
            procgroup.signal_group(pgid, signal.SIGKILL)
            self.stop_killed = self.stop_now = True
            self.sup.record(EventKind.STOP_SENT, f"{reason}: killed the process group (--now)", level="warning")
            return
        name = self.recipe.trainer.stop_signal  # SIGINT for scripts that save on KeyboardInterrupt
        procgroup.signal_group(pgid, getattr(signal, name))
        procgroup.signal_group(pgid, signal.SIGCONT)  # a stopped trainer must see the signal
        self.stop_deadline = time.monotonic() + self.recipe.supervisor.stop_grace_s
        self.sup.record(EventKind.STOP_SENT, f"{reason}: {name} sent; the trainer saves a checkpoint "
                        f"(grace {self.recipe.supervisor.stop_grace_s:.0f} s)")

    def _fail(self, message: str, kind: str = EventKind.RUN_FAILED, state: RunState = RunState.FAILED) -> None:
        self.sup.record(kind, message, level="error")
        self.sup.set_state(state, message=message, exited=True)

    # -- guards -----------------------------------------------------------------------
    def window(self) -> Any:
        return guardlib.Window.from_supervisor(self.sup)

    def run_guards(self) -> None:
        """Once a second, while no decisive action is being carried out."""
        now = time.monotonic()
        if self.busy or self.sup.run_state.terminal or now - self.last_guard_mono < GUARD_EVERY_S:
            return
        self.last_guard_mono = now
        try:
            actions = guardlib.run_guards(self.window(), self.recipe.guards)
        except Exception as e:  # noqa: BLE001 - a guard bug must not take the run down
            log.exception("guards failed: %s", e)
            return
        if actions:
            self.busy = True
            asyncio.get_running_loop().create_task(self.execute(actions))

    def _prune(self) -> None:
        """The final retention pass when an attempt ends."""
        try:
            plan = prune_plan(checkpoints.scan(self.output_dir()),
                              keep=self.recipe.train.save_total_limit,
                              keep_best=self.recipe.guards.checkpoints.keep_best,
                              run_id=self.sup.store.run_id)
        except Exception as e:  # noqa: BLE001
            log.warning("prune plan failed: %s", e)
            return
        if plan:
            self._delete([c.name for c in plan], "retention: keep "
                         f"{self.recipe.train.save_total_limit} complete checkpoints")

    def _delete(self, names: list[str], reason: str) -> None:
        ident = self.st.get("output_dir_id")
        results = checkpoints.safe_delete(self.output_dir(), names,
                                          self.sup.store.path / "deletions.log", reason=reason,
                                          expect=tuple(ident) if ident else None)
        for r in results:
            if r.ok:
                self.sup.record(EventKind.CHECKPOINT_PRUNED, f"deleted {r.name} ({reason})",
                                evidence={"bytes": r.size_bytes})
            else:
                key = f"prune_failed:{r.name}:{r.error}"
                if key in self.fired:  # retried every guard tick; announced once
                    continue
                self.fired.add(key)
                self.sup.record(EventKind.PRUNE_FAILED, f"could not delete {r.name}: {r.error}", level="warning")

    async def execute(self, actions: list[Any]) -> None:
        try:
            for a in actions:
                await self._execute_one(a)
        finally:
            self.busy = False

    async def _execute_one(self, a: Any) -> None:
        kind = type(a).__name__
        if kind == "Warn":
            key = getattr(a, "key", None) or a.message
            if key in self.fired:
                return
            self.fired.add(key)
            self.sup.record(EventKind.GUARD_FIRED, a.message, level="warning", guard=a.guard, evidence=a.evidence)
        elif kind == "PruneCheckpoints":
            self._delete(list(a.names), a.reason)
        elif kind == "CaptureStacks":
            await self._capture_stacks(a)
        elif kind == "StopRun":
            self.sup.record(EventKind.GUARD_FIRED, a.message, level="error", guard=a.guard, evidence=a.evidence)
            await self.request_stop(now=not a.graceful, reason=a.message, state=a.state)
        elif kind == "Fail":
            self._fail(a.message)
        elif kind == "Relaunch":
            if self.trainer_alive():  # a stall: stop the stuck trainer first
                w = self.st["wrapper"]
                procgroup.signal_group(w["pid"], signal.SIGKILL)
                await asyncio.to_thread(procgroup.wait_gone, w["pid"], 10.0)
                self.sup.set_state(exited=True)
            self.sup.record(EventKind.RELAUNCH_SCHEDULED, a.message, level="warning", guard=a.guard, evidence=a.evidence)
            # restarts: every relaunch of the run (what `status --json` and the report count);
            # restarts_since_progress: the crash budget (guards.relaunch.restarts_after)
            self.sup.set_state(RunState.BACKOFF, next_launch_in_s=a.delay_s,
                               restarts=(self.st.get("restarts") or 0) + 1,
                               restarts_since_progress=restarts_after(
                                   self.st.get("restarts_since_progress") or 0, "relaunch",
                                   rung_before=self.st.get("rung"), rung_after=a.rung))
            self.pending = a
            self.next_launch_mono = time.monotonic() + max(0.0, a.delay_s)

    async def _relaunch_now(self, a: Any) -> None:
        if not await self._gpu_released():
            return
        # A checkpoint cut short by the crash must never be resumed or counted: set it aside.
        infos = checkpoints.scan(self.output_dir())
        newest = newest_complete_of(infos, run_id=self.sup.store.run_id)
        partial = [i.name for i in infos if not i.complete and not i.quarantined
                   and i.step is not None
                   and (newest is None or i.step > newest.step)]
        if partial:
            checkpoints.quarantine(self.output_dir(), partial)
            self.sup.record(EventKind.CHECKPOINT_QUARANTINED, f"set aside incomplete {', '.join(partial)}",
                            level="warning")
        rung = a.rung
        if rung != self.st.get("rung") and rung is not None:
            # what this rung changes, from the rung below as this run had it (its --set included)
            desc = ladder.describe_change(self.effective_recipe(ladder.previous(rung)),
                                          ladder.change(self.recipe, rung))
            self.sup.set_state(rung_desc=f"{desc} after OOM")
        await self.launch(resume=a.resume_from, rung=rung, fresh=a.fresh_output)

    async def _gpu_released(self) -> bool:
        """Bounded wait: the old group gone and its GPU memory back near the baseline."""
        w = self.st.get("wrapper") or {}
        cfg = self.recipe.guards.oom
        if w.get("pid") and not await asyncio.to_thread(procgroup.wait_gone, w["pid"], cfg.release_timeout_s):
            self._fail(f"the old trainer group {w['pid']} is still alive after "
                       f"{cfg.release_timeout_s:.0f} s: not relaunching")
            return False
        nvml = getattr(self.sup.sampler, "nvml", None)
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
            self.sup.record(EventKind.GPU_RELEASE_UNCONFIRMED, "could not confirm that the GPU memory was released "
                            "(NVML did not answer); relaunching anyway", level="warning")
            return True
        self._fail(f"GPU memory still held ({mib:.0f} MiB) by the old trainer's processes "
                   f"{sorted(pids)}: not relaunching")
        return False

    async def _capture_stacks(self, a: Any) -> None:
        """py-spy dump of the trainer's Python stacks, if py-spy is installed."""
        import shutil

        pyspy = shutil.which("py-spy")
        pid_file = read_json(self.attempt_dir() / "trainer.pid.json")
        if not pyspy or not pid_file:
            self.sup.record(EventKind.STACKS_CAPTURED, "py-spy not installed: no stack dump", guard=a.guard)
            return
        proc = await asyncio.create_subprocess_exec(
            pyspy, "dump", "--pid", str(pid_file["pid"]),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), 30)
        except asyncio.TimeoutError:
            proc.kill()
            out = b"py-spy timed out"
        path = self.attempt_dir() / "stacks.txt"
        path.write_bytes(out)
        self.sup.record(EventKind.STACKS_CAPTURED, f"trainer stacks saved to {path}", guard=a.guard)



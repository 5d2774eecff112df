"""Preemption: the machine is being taken away; save, record PREEMPTED, leave with exit 0.

Slurm sends `--signal=B:USR1@120` (or USR1 to the job's steps) ahead of the end, then SIGTERM
and, KillWait seconds later, SIGKILL; a spot instance's shutdown and `docker stop` send
SIGTERM. The supervisor forwards a save request (the recipe's stop signal) to the trainer's
group, waits for it to exit within the grace, records the run as PREEMPTED (resumable, not
failed) and exits 0; `qlora-watch resume` (or the next start of the same job) continues it.

SIGUSR1 always means preemption. SIGTERM means preemption when `QLW_ON_SIGTERM=preempt`, under
Slurm (`SLURM_JOB_ID` in the supervisor's environment) or as a container's pid 1; elsewhere
(`QLW_ON_SIGTERM=detach`, the default on a workstation) a SIGTERM to the supervisor leaves the
trainer running for the next supervisor to re-adopt, as before.
"""

from __future__ import annotations

import asyncio
import os
import signal
from typing import TYPE_CHECKING, Mapping

from supervisor.records import EventKind
from supervisor.states import RunState

if TYPE_CHECKING:
    from supervisor.daemon.attempts import Attempts
    from supervisor.daemon.runio import RunIO

PREEMPT_ENV = "QLW_ON_SIGTERM"
GRACE_ENV = "QLW_PREEMPT_GRACE_S"  # caps the save grace: Slurm's KillWait after SIGTERM is 30 s


def sigterm_preempts(env: Mapping[str, str] | None = None, pid: int | None = None) -> bool:
    """Whether a SIGTERM to the supervisor is a preemption (save and end) or a detach."""
    env = os.environ if env is None else env
    choice = (env.get(PREEMPT_ENV) or "").strip().lower()
    if choice in ("preempt", "detach"):
        return choice == "preempt"
    return bool(env.get("SLURM_JOB_ID")) or (os.getpid() if pid is None else pid) == 1


def grace_cap(env: Mapping[str, str] | None = None) -> float | None:
    env = os.environ if env is None else env
    try:
        v = float(env.get(GRACE_ENV) or "")
    except ValueError:
        return None
    return v if v > 0 else None


class Preemption:
    """The supervisor's preemption handling; `install()` adds the signal handlers."""

    def __init__(self, io: RunIO, attempts: Attempts):
        self.io = io  # the store, the status, set_state, record
        self.attempts = attempts  # the lifecycle: request_stop, and a stop in progress
        self.signals: list[str] = []
        self._task: asyncio.Task[None] | None = None

    @property
    def active(self) -> bool:
        return bool(self.signals)

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.add_signal_handler(signal.SIGUSR1, self.on_signal, "SIGUSR1")

    def settle(self, loop: asyncio.AbstractEventLoop, sigterm_preempts: bool) -> None:
        """The loop is ending: Slurm's SIGTERM after USR1 (or a second one) may still come while
        the store closes; ignore it from here, so the exit status stays 0."""
        names = ["SIGUSR1"] + (["SIGTERM", "SIGINT"] if self.active or sigterm_preempts else [])
        for n in names:
            sig = getattr(signal, n)
            loop.remove_signal_handler(sig)
            signal.signal(sig, signal.SIG_IGN)

    def on_signal(self, name: str) -> None:
        self.signals.append(name)
        loop = asyncio.get_running_loop()
        if len(self.signals) > 1:  # USR1 then TERM, as Slurm sends them: still saving
            self.io.record(EventKind.PREEMPTION_RECEIVED, f"{name} received while the preemption save runs; waiting for "
                            "the checkpoint", level="warning")
            return
        self._task = loop.create_task(self.begin(name))  # kept: the loop holds tasks weakly

    async def begin(self, name: str) -> None:
        io = self.io
        if io.status.run_state.terminal:
            return
        io.record(EventKind.PREEMPTION_RECEIVED, f"{name}: the machine is being taken away (preemption); saving "
                   "a checkpoint, then the run is PREEMPTED", level="warning")
        reason = f"preempted ({name})"  # handle_exit adds the checkpoint and `qlora-watch resume`
        att = self.attempts
        if io.status.run_state == RunState.STOPPING:  # a user's stop already saves: it ends preempted
            io.set_state(stop_state=RunState.PREEMPTED)
            att.stop_reason = reason
            return
        await att.request_stop(now=False, reason=reason, state=RunState.PREEMPTED)
        cap = grace_cap()
        if cap is not None and att.stop_deadline is not None:
            import time

            att.stop_deadline = min(att.stop_deadline, time.monotonic() + cap)

"""Actions: the core's executor for what guards ask (guards/base.py: the Action union).

One `match` over the union, ending in `assert_never`: an action type added to the union
and not handled here fails mypy, and raises at run time instead of being dropped. What an
action does to the trainer (stop it, relaunch it, end the run) is the attempt lifecycle's
(attempts.py), reached through the `Lifecycle` protocol; deleting checkpoints and dumping
stacks happen here.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path
from typing import Any, Protocol, assert_never

from supervisor.checkpoints import folders as checkpoints
from supervisor.daemon.runio import RunIO
from supervisor.guards.base import (
    Action,
    CaptureStacks,
    Fail,
    PruneCheckpoints,
    Relaunch,
    StopRun,
    Warn,
)
from supervisor.records import EventKind
from supervisor.states import RunState
from supervisor.store import read_json

log = logging.getLogger("qlora-watch.actions")


class Lifecycle(Protocol):
    """What the executor asks of the attempt lifecycle."""

    def output_dir(self) -> Path: ...

    def attempt_dir(self) -> Path: ...

    async def request_stop(self, now: bool, reason: str, state: RunState = RunState.STOPPED) -> None: ...

    def fail(self, message: str, kind: str = EventKind.RUN_FAILED, state: RunState = RunState.FAILED) -> None: ...

    async def relaunch_after_backoff(self, a: Relaunch) -> None: ...


class Actions:
    """Carries out guard actions, one after another."""

    def __init__(self, io: RunIO, life: Lifecycle) -> None:
        self.io = io
        self.life = life
        self.fired: set[str] = set()  # Warn keys (and failed deletes) already announced

    async def execute(self, actions: list[Action]) -> None:
        for a in actions:
            await self.execute_one(a)

    async def execute_one(self, a: Action) -> None:
        match a:
            case Warn():
                key = a.key or a.message
                if key in self.fired:
                    return
                self.fired.add(key)
                self.io.record(EventKind.GUARD_FIRED, a.message, level="warning", guard=a.guard, evidence=a.evidence)
            case PruneCheckpoints():
                self.delete(list(a.names), a.reason)
            case CaptureStacks():
                await self.capture_stacks(a)
            case StopRun():
                self.io.record(EventKind.GUARD_FIRED, a.message, level="error", guard=a.guard, evidence=a.evidence)
                await self.life.request_stop(now=not a.graceful, reason=a.message, state=a.state)
            case Fail():
                self.life.fail(a.message)
            case Relaunch():
                await self.life.relaunch_after_backoff(a)
            case _:
                assert_never(a)

    def delete(self, names: list[str], reason: str) -> None:
        """Delete checkpoints of the current output folder (two-phase, audited: delete.py)."""
        ident = self.io.status.output_dir_id
        results = checkpoints.safe_delete(self.life.output_dir(), names,
                                          self.io.store.path / "deletions.log", reason=reason,
                                          expect=tuple(ident) if ident else None)
        for r in results:
            if r.ok:
                self.io.record(EventKind.CHECKPOINT_PRUNED, f"deleted {r.name} ({reason})",
                               evidence={"bytes": r.size_bytes})
            else:
                key = f"prune_failed:{r.name}:{r.error}"
                if key in self.fired:  # retried every guard tick; announced once
                    continue
                self.fired.add(key)
                self.io.record(EventKind.PRUNE_FAILED, f"could not delete {r.name}: {r.error}", level="warning")

    async def capture_stacks(self, a: CaptureStacks) -> None:
        """py-spy dump of the trainer's Python stacks, if py-spy is installed."""
        pyspy = shutil.which("py-spy")
        adir = self.life.attempt_dir()
        pid_file: Any = read_json(adir / "trainer.pid.json")
        if not pyspy or not pid_file:
            self.io.record(EventKind.STACKS_CAPTURED, "py-spy not installed: no stack dump", guard=a.guard)
            return
        proc = await asyncio.create_subprocess_exec(
            pyspy, "dump", "--pid", str(pid_file["pid"]),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), 30)
        except asyncio.TimeoutError:
            proc.kill()
            out = b"py-spy timed out"
        path = adir / "stacks.txt"
        path.write_bytes(out)
        self.io.record(EventKind.STACKS_CAPTURED, f"trainer stacks saved to {path}", guard=a.guard)

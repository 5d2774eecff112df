"""A client that replays a recorded run: a supervisor.control.client.RunClient, as AsyncRunClient is."""

from __future__ import annotations

import asyncio
import copy
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any


class ReplayCommandError(Exception):
    """A command refused, like supervisor.control.client's CommandError."""


def load_recorded(path: str | Path) -> dict[str, Any]:
    """Read a recorded run file ({"run", "state", "samples", "steps", "events", "log", "live"})."""
    return json.loads(Path(path).read_text())


class ReplayClient:
    """Plays a recorded run: the snapshot on connect, then its "live" list at `rate` per second.

    rate=None plays the live list as fast as the loop takes it. After the list the stream
    stays open (a quiet run) unless it held a "bye" or the client was closed. Commands are
    recorded in `commands` and answered ok.
    """

    def __init__(
        self,
        recorded: dict[str, Any] | str | Path,
        *,
        rate: float | None = 10.0,
        lead_s: float = 0.0,
    ) -> None:
        self.recorded = recorded if isinstance(recorded, dict) else load_recorded(recorded)
        self.rate = rate
        self.lead_s = lead_s  # quiet before the first live message
        self.fail: dict[str, str] = {}  # cmd -> error: that command raises (tests of failure paths)
        self.commands: list[tuple[str, dict[str, Any]]] = []
        self.sent_at: list[float] = []  # perf_counter when each live message was handed over
        self.connected = False
        self.closed = False
        self._finished: asyncio.Event | None = None
        self._closing: asyncio.Event | None = None

    @property
    def finished(self) -> asyncio.Event:
        """Set once the whole live list has been handed over (created in the running loop)."""
        if self._finished is None:
            self._finished = asyncio.Event()
        return self._finished

    async def connect(self, history: bool = True) -> dict[str, Any]:
        """The snapshot; without history only the run, the state and the last sample."""
        rec = self.recorded
        self.connected = True
        samples = rec.get("samples") or []
        snap = {
            "run": rec.get("run") or {},
            "state": rec.get("state") or {},
            "samples": samples if history else samples[-1:],
            "steps": (rec.get("steps") or []) if history else [],
            "events": rec.get("events") or [],
            "log": (rec.get("log") or []) if history else [],
        }
        # The app may mark events acked in place; the recording stays as it was. The
        # big lists are shared, not copied: nobody writes into samples or steps.
        snap["events"] = copy.deepcopy(snap["events"])
        snap["state"] = dict(snap["state"])
        return snap

    async def messages(self) -> AsyncIterator[dict[str, Any]]:
        """The live messages, paced at `rate`; then quiet until closed."""
        if self._closing is None:
            self._closing = asyncio.Event()
        interval = 1.0 / self.rate if self.rate else 0.0
        if self.lead_s:
            await asyncio.sleep(self.lead_s)
        start = time.perf_counter()
        for i, msg in enumerate(self.recorded.get("live") or []):
            if self.closed:
                return
            if interval:
                # Pace against the start time, so a slow consumer does not slow the clock.
                delay = start + (i + 1) * interval - time.perf_counter()
                await asyncio.sleep(max(0.0, delay))
            else:
                await asyncio.sleep(0)
            self.sent_at.append(time.perf_counter())
            yield copy.deepcopy(msg) if msg.get("type") == "event" else msg
            if msg.get("type") == "bye":
                self.finished.set()
                return
        self.finished.set()
        await self._closing.wait()

    async def send_command(self, cmd: str, **args: Any) -> dict[str, Any]:
        """Record the command and return the reply's data, as AsyncRunClient does."""
        self.commands.append((cmd, args))
        if cmd in self.fail:
            raise ReplayCommandError(self.fail[cmd])
        if cmd == "status":
            return dict(self.recorded.get("state") or {})
        if cmd == "ping":
            return {"pong": True}
        if cmd == "ack":
            ids = args.get("event_ids")
            return {
                "acked": len(ids) if ids is not None else len(self.recorded.get("events") or [])
            }
        return {}

    async def close(self) -> None:
        """End the stream."""
        self.closed = True
        if self._closing is not None:
            self._closing.set()

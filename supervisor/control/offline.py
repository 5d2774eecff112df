"""A read-only client over a finished run's store, with the dashboard client's interface.

A finished run has no supervisor and no socket; attaching to it still shows its history.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, AsyncIterator

from supervisor.records import to_dict
from supervisor.store import RunStore


class StoreClient:
    def __init__(self, run_dir: Path):
        self.store = RunStore(Path(run_dir))

    async def connect(self, history: bool = True) -> dict[str, Any]:
        s = self.store
        return {
            "run": s.info(), "state": s.read_state(),
            "samples": s.samples() if history else [], "steps": s.steps() if history else [],
            "events": [to_dict(e) for e in s.events()], "log": s.log_tail(500),
        }

    async def messages(self) -> AsyncIterator[dict[str, Any]]:
        return
        yield  # an empty async generator: a finished run sends nothing live

    async def send_command(self, cmd: str, **args: Any) -> dict[str, Any]:
        if cmd == "ack":
            return {"acked": self.store.ack_events(args.get("event_ids"))}
        if cmd in ("ping", "status"):
            return {"state": self.store.read_state()}
        raise RuntimeError(f"run {self.store.run_id} has ended: {cmd!r} is not possible")

    async def close(self) -> None:
        self.store.close()

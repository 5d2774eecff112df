"""What a part of the core may touch: the run's store, its status, and the three ways to
change what others see. The core (`Supervisor`) builds one `RunIO` and hands it to each part
(trainer events, attempts, actions) instead of itself, so a part cannot reach into another's
private state and a test can build a part with a real store and a few lambdas.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from supervisor.records import Event
from supervisor.states import RunState
from supervisor.status import RunStatus
from supervisor.store import RunStore


class SetState(Protocol):
    def __call__(self, new: RunState | None = None, *, why: str | None = None,
                 persist: bool = True, **fields: Any) -> None:
        """Change the status: `new` is an edge of states.EDGES taken for `why` (one line);
        fields are RunStatus fields. persist=False: in memory only (written with the next
        persisted change; the step counters, at most once a second)."""


class Record(Protocol):
    def __call__(self, kind: str, message: str, level: str = "info", **kw: Any) -> Event:
        """An event: stored, sent to clients, trackers and notifications."""


class Broadcast(Protocol):
    def __call__(self, msg: dict[str, Any]) -> None:
        """A protocol message to every attached client."""


@dataclass
class RunIO:
    store: RunStore
    status: RunStatus  # read freely; change only through set_state
    set_state: SetState
    record: Record
    broadcast: Broadcast

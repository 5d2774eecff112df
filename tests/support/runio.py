"""A RunIO for building one part of the core in a test: the status in memory, checked as the
core checks it (states.EDGES, declared fields), records collected in a list."""

from __future__ import annotations

from typing import Any

from supervisor.daemon.runio import RunIO
from supervisor.records import Event
from supervisor.states import RunState
from supervisor.status import RunStatus


def memory_io(store: Any, status: dict[str, Any] | RunStatus | None = None,
              recorded: list[tuple[str, str, str]] | None = None) -> RunIO:
    st = status if isinstance(status, RunStatus) else RunStatus.from_json(status)
    out = recorded if recorded is not None else []

    def set_state(new: RunState | None = None, *, why: str | None = None, persist: bool = True,
                  **fields: Any) -> None:
        st.change(new, why, **fields)

    def record(kind: str, message: str, level: str = "info", **kw: Any) -> Event:
        out.append((kind, message, level))
        return Event(t=0.0, kind=kind, level=level, message=message)

    return RunIO(store=store, status=st, set_state=set_state, record=record, broadcast=lambda msg: None)

"""What the socket worker tells the app: small messages, one per thing that arrived."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from textual.message import Message


@dataclass
class SnapshotReceived(Message):
    """The attach snapshot: run, state and history."""

    snapshot: dict[str, Any]


@dataclass
class LiveReceived(Message):
    """One live message (sample, step, event, log, bye); the model keeps every one."""

    payload: dict[str, Any]


@dataclass
class StateReceived(Message):
    """A new run state; only the newest matters, so a queued older one is dropped."""

    state: dict[str, Any]

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, StateReceived)


@dataclass
class StreamEnded(Message):
    """The connection to the supervisor ended (bye, error or closed)."""

    reason: str


@dataclass
class Reconnecting(Message):
    """The link dropped; the app is reconnecting (attach --ssh)."""

    reason: str


@dataclass
class Reconnected(Message):
    """The link is back."""

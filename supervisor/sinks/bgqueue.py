"""Bounded background workers (notifications, trackers): how one is asked to finish."""

from __future__ import annotations

import queue
import threading
from typing import Any


def close_worker(q: queue.Queue[Any], thread: threading.Thread | None, timeout: float) -> None:
    """Queue the None sentinel and wait for the worker to drain and finish, both bounded:
    a dead endpoint must not hang the supervisor's exit."""
    if thread is None or not thread.is_alive():
        return
    try:
        q.put(None, timeout=timeout)
    except queue.Full:
        return
    thread.join(timeout)

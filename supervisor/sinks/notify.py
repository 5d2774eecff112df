"""Notifications through apprise (ntfy, Slack, Discord, e-mail, webhooks, ...).

Sends happen on a background thread with a bounded queue: a slow or dead endpoint never
blocks the supervisor; when the queue is full, notifications are dropped and counted.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any

from supervisor.records import Event, EventKind
from supervisor.redact import redact
from supervisor.sinks.bgqueue import close_worker

log = logging.getLogger("qlora-watch.notify")

# Which event kinds belong to which [notify] `on` category.
CATEGORY = {
    EventKind.RELAUNCH_SCHEDULED: "relaunch",
    EventKind.GUARD_FIRED: "warning",
    EventKind.RUN_FAILED: "failed",
    EventKind.CONFIG_REJECTED: "failed",
    EventKind.TRAINER_LOST: "failed",
}


def category_of(ev: Event, state_after: str | None = None) -> str | None:
    if ev.kind == EventKind.STATE_CHANGED and state_after in ("completed", "failed", "diverged", "stopped"):
        return "completed" if state_after == "completed" else "failed"
    cat = CATEGORY.get(ev.kind)
    if cat == "warning" and ev.level == "error":
        return "error"
    if cat is None and ev.level == "error":
        return "error"
    return cat


class Notifier:
    def __init__(self, urls: list[str], on: list[str], run_id: str, max_queue: int = 100):
        self.urls, self.on, self.run_id = list(urls), set(on), run_id
        self.q: queue.Queue[tuple[str, str] | None] = queue.Queue(maxsize=max_queue)
        self.dropped = 0
        self.failures = 0
        self.sent = 0
        self._thread: threading.Thread | None = None
        if self.urls:
            self._thread = threading.Thread(target=self._worker, name="notify", daemon=True)
            self._thread.start()

    def maybe_send(self, ev: Event, state_after: str | None = None) -> bool:
        cat = category_of(ev, state_after)
        if not self.urls or cat is None or cat not in self.on:
            return False
        title = f"qlora-watch {self.run_id}: {cat}"
        return self.send(title, ev.message)

    def send(self, title: str, body: str) -> bool:
        if not self.urls:
            return False
        try:
            self.q.put_nowait((redact(title), redact(body)))
            return True
        except queue.Full:
            self.dropped += 1
            return False

    def close(self, timeout: float = 5.0) -> None:
        close_worker(self.q, self._thread, timeout)

    def _worker(self) -> None:
        try:
            import apprise
        except ImportError:
            log.warning("apprise is not installed: notifications are off")
            return
        app = apprise.Apprise()
        for url in self.urls:
            if not app.add(url):
                log.warning("notify: invalid URL %s", redact(url))
        while True:
            item = self.q.get()
            if item is None:
                return
            title, body = item
            try:
                ok = app.notify(title=title, body=body)
            except Exception as e:  # noqa: BLE001 - a notifier must never take the loop down
                ok = False
                log.warning("notify failed: %s", e)
            if ok:
                self.sent += 1
            else:
                self.failures += 1


def from_recipe(recipe: Any, run_id: str) -> Notifier:
    return Notifier(recipe.notify.urls, list(recipe.notify.on), run_id)


__all__ = ["Notifier", "from_recipe"]

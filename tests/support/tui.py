"""Helpers for the dashboard's tests: an app on a recorded run, the first frame, the screen as text."""

from __future__ import annotations

import asyncio
import functools
from datetime import timezone
from typing import Any, Callable, Coroutine

from supervisor.tui.app import WatchApp, make_app
from supervisor.tui.replay import ReplayClient, load_recorded
from tests.support import FIXTURES


def run_async(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test in a fresh event loop (no pytest-asyncio in this project)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(fn(*args, **kwargs))

    return wrapper


def recorded(name: str) -> dict[str, Any]:
    return load_recorded(FIXTURES / f"recorded_run_{name}.json")


def make(
    name: str, *, live: bool = False, rate: float | None = None, lead_s: float = 0.0
) -> tuple[WatchApp, ReplayClient]:
    """An app on a recorded run with the clock frozen at the recording's last update, in UTC."""
    rec = recorded(name)
    if not live:
        rec["live"] = []  # the snapshot alone: what the screen shows does not depend on timing
    client = ReplayClient(rec, rate=rate, lead_s=lead_s)
    now = rec["state"]["updated_at"]
    return make_app(client, now=lambda: now, tz=timezone.utc), client


async def ready(pilot: Any) -> None:
    """Wait for the first whole frame (snapshot loaded, panels drawn)."""
    app = pilot.app
    for _ in range(400):
        if app.first_frame_at is not None:
            break
        await asyncio.sleep(0.01)
    assert app.first_frame_at is not None, "no first frame"
    await pilot.pause()


def screen_text(app: WatchApp) -> str:
    """What the terminal shows now, as plain text (the compositor's strips)."""
    return "\n".join(strip.text for strip in app.screen._compositor.render_strips())

"""The Textual dashboard: a client of the supervisor's socket; it never imports the core.

Public API: make_app(client) and pick_run(runs) build apps, ReplayClient replays a recorded
run, serve() puts the dashboard in a browser tab. Loaded lazily: `import supervisor.tui`
alone does not import Textual.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ReplayClient", "make_app", "pick_run", "sanitize", "serve"]

_WHERE = {
    "make_app": "app",
    "pick_run": "app",
    "ReplayClient": "replay",
    "sanitize": "sanitize",
    "serve": "serve",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(name)

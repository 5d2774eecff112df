"""The trainer's log tail, sanitised and written as plain Text (never markup)."""

from __future__ import annotations

from itertools import islice
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Footer, RichLog, Static

from .model import LOG_KEEP, RunModel

PANEL_LINES = 500  # the main screen's tail; the full view keeps all the model has


class LogTail(RichLog):
    """A RichLog that writes only the model's new lines on each refresh."""

    def __init__(self, model: RunModel, max_lines: int, **kw: Any) -> None:
        super().__init__(max_lines=max_lines, wrap=False, highlight=False, markup=False, **kw)
        self.model = model
        self.written = 0  # model.log_total when we last wrote

    def update_from(self) -> None:
        """Append what arrived since the last call (lines were sanitised on arrival)."""
        m = self.model
        new = min(m.log_total - self.written, len(m.log), self.max_lines or len(m.log))
        if new <= 0:
            return
        # Only the newest `new` lines are copied, not the whole deque.
        lines = list(islice(m.log, len(m.log) - new, None))
        self.written = m.log_total
        for line in lines:
            # Text, not str: RichLog would otherwise be free to interpret the string.
            self.write(Text(line, no_wrap=True), scroll_end=True)


class LogScreen(Screen[None]):
    """The whole log tail the client holds."""

    BINDINGS = [Binding("escape,q,l", "app.pop_screen", "back")]

    def __init__(self, model: RunModel) -> None:
        super().__init__()
        self.model = model

    def compose(self) -> ComposeResult:
        yield Static(
            Text.assemble(("Trainer log", "bold"), "  (esc: back)"), classes="screen-title"
        )
        yield LogTail(self.model, max_lines=LOG_KEEP, id="log-full")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(LogTail).update_from()

"""The trainer's log tail, sanitised and written as plain Text (never markup)."""

from __future__ import annotations

from itertools import islice
from typing import Any

from rich.style import Style
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.strip import Strip
from textual.widgets import Footer, RichLog, Static

from .model import LOG_KEEP, RunModel
from .panel import LOG, Panel
from .search import SEARCH_BINDINGS, SearchableScreen

MATCH_STYLE = Style(reverse=True)

PANEL_LINES = 500  # the main screen's tail; the full view keeps all the model has


class LogTail(RichLog, Panel):
    """A RichLog that writes only the model's new lines on each refresh."""

    WATCHES = frozenset({LOG})

    def __init__(self, model: RunModel, max_lines: int, **kw: Any) -> None:
        super().__init__(max_lines=max_lines, wrap=False, highlight=False, markup=False, **kw)
        self.model = model
        self.written = 0  # model.log_total when we last wrote
        self.marked: int | None = None  # the line of the current search match, shown reversed

    def render_line(self, y: int) -> Strip:
        strip = super().render_line(y)
        if self.marked is not None and self.scroll_offset.y + y == self.marked:
            return strip.apply_style(MATCH_STYLE)
        return strip

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


class LogScreen(SearchableScreen):
    """The whole log tail the client holds; `/` searches it."""

    BINDINGS = [Binding("escape,q,l", "app.pop_screen", "back"), *SEARCH_BINDINGS]

    def __init__(self, model: RunModel) -> None:
        super().__init__()
        self.model = model

    def compose(self) -> ComposeResult:
        yield Static(
            Text.assemble(("Trainer log", "bold"), "  (/ search, esc: back)"), classes="screen-title"
        )
        yield LogTail(self.model, max_lines=LOG_KEEP, id="log-full")
        yield from self.search_widgets()
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(LogTail).update_from()

    def search_texts(self) -> list[str]:
        return [strip.text for strip in self.query_one(LogTail).lines]

    def show_match(self, row: int | None) -> None:
        log = self.query_one(LogTail)
        log.marked = row
        if row is not None:
            log.auto_scroll = False  # new lines must not pull the match out of view
            log.scroll_to(y=max(0, row - log.size.height // 2), animate=False)
        log.refresh()

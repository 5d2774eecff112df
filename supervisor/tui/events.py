"""Events: every event with time, level, message and evidence; unseen warnings stand out."""

from __future__ import annotations

import json
from datetime import tzinfo
from typing import Any

from rich.text import Text
from textual.app import ComposeResult, RenderResult
from textual.binding import Binding
from textual.widget import Widget
from textual.widgets import DataTable, Footer, Static

from supervisor.sanitize import sanitize

from .fmt import LEVEL_STYLES, UNSEEN_STYLES, fmt_clock
from .model import RunModel, is_unseen
from .panel import EVENTS, Panel
from .search import SEARCH_BINDINGS, SearchableScreen

LEVEL_TAGS = {"info": "INFO", "warning": "WARN", "error": "ERR"}


def evidence_text(evidence: Any) -> str:
    """Evidence as "key=value" pairs, compact enough for one line."""
    if not isinstance(evidence, dict) or not evidence:
        return ""
    parts = []
    for k, v in evidence.items():
        parts.append(f"{k}={v if isinstance(v, (int, float, str)) else json.dumps(v)}")
    return sanitize(" ".join(parts))


def event_line(ev: dict[str, Any], tz: tzinfo | None) -> Text:
    """One event on one line; unseen warnings and errors in reverse colours."""
    level = str(ev.get("level") or "info")
    unseen = is_unseen(ev)
    t = Text(
        no_wrap=True, overflow="ellipsis", style=UNSEEN_STYLES.get(level, "") if unseen else ""
    )
    t.append(fmt_clock(ev.get("t"), tz), "" if unseen else "grey62")
    t.append(" ")
    t.append(
        LEVEL_TAGS.get(level, level[:4].upper()).ljust(4),
        "" if unseen else LEVEL_STYLES.get(level, ""),
    )
    t.append(" ")
    # Messages can quote trainer output (an exception text): same escape stripping as the log.
    t.append(sanitize(str(ev.get("message") or ev.get("kind") or "")))
    ev_text = evidence_text(ev.get("evidence"))
    if ev_text:
        t.append(f"  {ev_text}", "" if unseen else "grey50")
    return t


class EventsPanel(Widget, Panel):
    """The newest events that fit, newest first."""

    WATCHES = frozenset({EVENTS})

    def __init__(self, model: RunModel, tz: tzinfo | None, **kw: Any) -> None:
        super().__init__(**kw)
        self.model = model
        self.tz = tz

    def update_from(self) -> None:
        """Retitle and redraw."""
        n, unseen = len(self.model.events), len(self.model.unseen())
        self.border_title = f"Events ({n})"
        self.border_subtitle = f"[b]{unseen} unseen[/b] · a to ack · e all" if unseen else "e all"
        self.set_class(bool(unseen), "-unseen")
        self.refresh()

    def render(self) -> RenderResult:
        rows = max(1, self.size.height)
        shown = self.model.events[-rows:][::-1]
        if not shown:
            return Text("no events yet", "grey50")
        return Text("\n", no_wrap=True, overflow="ellipsis").join(
            event_line(ev, self.tz) for ev in shown
        )


class EventsScreen(SearchableScreen, Panel):
    """All events in a table; `a` acknowledges from here too; `/` searches."""

    WATCHES = frozenset({EVENTS})

    BINDINGS = [
        Binding("escape,q,e", "app.pop_screen", "back"),
        Binding("a", "app.ack", "ack warnings"),
        *SEARCH_BINDINGS,
    ]

    def __init__(self, model: RunModel, tz: tzinfo | None) -> None:
        super().__init__()
        self.model = model
        self.tz = tz

    def compose(self) -> ComposeResult:
        yield Static(id="events-title", classes="screen-title")
        yield DataTable(id="events-table", cursor_type="row", zebra_stripes=True)
        yield from self.search_widgets()
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_columns("id", "time", "level", "kind", "attempt", "message", "evidence")
        self.reload()

    def reload(self) -> None:
        """Refill the table from the model (newest last, like a log)."""
        table = self.query_one(DataTable)
        table.clear()
        for ev in self.model.events:
            level = str(ev.get("level") or "info")
            style = UNSEEN_STYLES.get(level, "") if is_unseen(ev) else LEVEL_STYLES.get(level, "")
            table.add_row(
                str(ev.get("id") if ev.get("id") is not None else ""),
                fmt_clock(ev.get("t"), self.tz),
                Text(level, style),
                sanitize(str(ev.get("kind") or "")),
                str(ev.get("attempt") or ""),
                Text(sanitize(str(ev.get("message") or ""))),
                Text(evidence_text(ev.get("evidence")), "grey62"),
            )
        unseen = len(self.model.unseen())
        self.query_one("#events-title", Static).update(
            Text.assemble(
                ("Events", "bold"),
                f"  {len(self.model.events)} in all, ",
                (f"{unseen} unseen", "bold yellow" if unseen else ""),
                "  (a: acknowledge, /: search, esc: back)",
            )
        )
        if self.current is not None and self.matches:  # a search holds the cursor on its match
            table.move_cursor(row=self.matches[self.current])
        elif self.model.events:
            table.move_cursor(row=len(self.model.events) - 1)

    def update_from(self) -> None:
        self.reload()

    def search_texts(self) -> list[str]:
        return [event_line(ev, self.tz).plain + f" {ev.get('kind') or ''}" for ev in self.model.events]

    def show_match(self, row: int | None) -> None:
        if row is not None:
            self.query_one(DataTable).move_cursor(row=row)

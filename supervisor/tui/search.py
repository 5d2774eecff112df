"""`/` search in the full-screen views (log, events), as in less and htop: `/` opens a prompt,
enter jumps to the newest match, `n` / `N` go to the next / previous one (wrapping)."""

from __future__ import annotations

from rich.text import Text
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Input, Static

SEARCH_BINDINGS = [
    Binding("slash", "search", "search", key_display="/"),
    Binding("n", "next_match", "next", show=False),
    Binding("N", "previous_match", "previous", show=False),
]


def find_matches(texts: list[str], query: str) -> list[int]:
    """Indices of the texts that contain `query`, ignoring case (smart case: an upper-case
    letter in the query makes it exact, as in less -i and vim's smartcase)."""
    if not query:
        return []
    if query.lower() == query:
        return [i for i, t in enumerate(texts) if query in t.lower()]
    return [i for i, t in enumerate(texts) if query in t]


class SearchInput(Input):
    """The prompt; esc closes it (its binding wins over the screen's `esc: back`)."""

    BINDINGS = [Binding("escape", "cancel", "cancel", show=False)]

    def action_cancel(self) -> None:
        screen = self.screen
        if isinstance(screen, SearchableScreen):
            screen.close_prompt()


class SearchableScreen(Screen[None]):
    """A screen with a search prompt; subclasses say what the rows are and how to show one."""

    def __init__(self) -> None:
        super().__init__()
        self.query_text = ""
        self.matches: list[int] = []
        self.current: int | None = None  # index into matches

    # -- what subclasses provide --------------------------------------------------------
    def search_texts(self) -> list[str]:
        """The rows, as plain text, in display order."""
        raise NotImplementedError

    def show_match(self, row: int | None) -> None:
        """Bring row `row` into view and mark it (None: clear the mark)."""
        raise NotImplementedError

    # -- the prompt ---------------------------------------------------------------------
    def search_widgets(self) -> tuple[Input, Static]:
        """The prompt (hidden until `/`) and the status line, for compose()."""
        prompt = SearchInput(placeholder="search (enter: find, esc: cancel)", compact=True,
                             id="search-input", classes="search-input")
        return prompt, Static(id="search-status", classes="search-status")

    def action_search(self) -> None:
        prompt = self.query_one("#search-input", Input)
        prompt.value = self.query_text
        prompt.add_class("-open")
        prompt.focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.close_prompt()
        self.query_text = event.value
        self.matches = find_matches(self.search_texts(), self.query_text)
        self.current = len(self.matches) - 1 if self.matches else None  # the newest first
        self._show()

    def close_prompt(self) -> None:
        """Hide the prompt and give the keys back to the view."""
        prompt = self.query_one("#search-input", Input)
        prompt.remove_class("-open")
        self.set_focus(None)

    def action_next_match(self) -> None:
        self._step(1)

    def action_previous_match(self) -> None:
        self._step(-1)

    def _step(self, delta: int) -> None:
        if not self.query_text:
            self.notify("press / to search first")
            return
        self.matches = find_matches(self.search_texts(), self.query_text)  # new rows may match
        if self.matches:
            self.current = ((self.current if self.current is not None else -1) + delta) % len(self.matches)
        self._show()

    def _show(self) -> None:
        status = self.query_one("#search-status", Static)
        if not self.matches:
            self.current = None
            self.show_match(None)
            status.update(Text.assemble(("/" + self.query_text, "bold"), ("  no match", "red")))
            return
        assert self.current is not None
        self.show_match(self.matches[self.current])
        status.update(Text.assemble(
            ("/" + self.query_text, "bold"),
            f"  match {self.current + 1} of {len(self.matches)}  ·  n next  N previous",
        ))

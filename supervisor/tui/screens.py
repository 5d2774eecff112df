"""Screens other than the dashboard: stop confirmation, help, and the runs list."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen, Screen
from textual.widgets import DataTable, Footer, Static

from supervisor.sanitize import sanitize
from supervisor.status import RunInfo

from .fmt import STATE_STYLES, fmt_num


class ConfirmScreen(ModalScreen[bool]):
    """A yes/no question; dismisses with True only on `y`."""

    BINDINGS = [
        Binding("y", "answer(True)", "yes"),
        Binding("n,escape", "answer(False)", "no"),
    ]

    def __init__(self, question: str, detail: str = "") -> None:
        super().__init__()
        self.question = question
        self.detail = detail

    def compose(self) -> ComposeResult:
        with Vertical(id="confirm-box"):
            yield Static(Text(self.question, "bold"), id="confirm-question")
            if self.detail:
                yield Static(Text(self.detail, "grey70"), id="confirm-detail")
            yield Static(
                Text.assemble(("y", "bold green"), " yes   ", ("n", "bold red"), " no"),
                id="confirm-keys",
            )

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


HELP = """\
qlora-watch dashboard: a client of the run's supervisor. Leaving it never stops the run.

  d      detach: leave the dashboard, the run goes on
  q      quit the dashboard (the run goes on); ctrl+c too
  s      stop the run gracefully (asks first): save a checkpoint, then stop
  S      stop the run now (asks first): no checkpoint
  a      acknowledge the highlighted warnings and errors
  e      all events
  l      the full trainer log
  /      in the log and events views: search; n / N next / previous match
  h ?    this help
  esc    back from any view

Header: run id, recipe, model, state; attempt and OOM-ladder rung with what changed;
uptime; step/total, loss, tokens/s and ETA. GPU: util and VRAM with 10-minute history,
temperatures (hotspot n/a where the driver does not report it), margin to slowdown,
power, SM clock and throttle reasons. Host: RAM against what the paged optimiser needs,
swap, trainer RSS (+uvm: paged optimiser state), disk against the next checkpoint.
"""


class HelpScreen(Screen[None]):
    """Keys and what the panels mean."""

    BINDINGS = [Binding("escape,q,h,question_mark", "app.pop_screen", "back")]

    def compose(self) -> ComposeResult:
        yield Static(Text("Help", "bold"), classes="screen-title")
        yield Static(Text(HELP), id="help-text")
        yield Footer()


class RunsListScreen(Screen[str]):
    """Pick one of several runs; dismisses with its run id."""

    BINDINGS = [
        Binding("escape,q", "app.quit", "quit"),
    ]

    def __init__(self, runs: list[dict[str, Any]]) -> None:
        super().__init__()
        self.runs = runs

    def compose(self) -> ComposeResult:
        yield Static(
            Text.assemble(("Runs", "bold"), "  pick one to attach (enter), q to quit"),
            classes="screen-title",
        )
        yield DataTable(id="runs-table", cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_columns("run", "state", "recipe", "model", "step", "attempt")
        for r in self.runs:
            st = r.get("state")
            st = st if isinstance(st, dict) else {"state": st} if st else {}
            state = str(st.get("state") or "?")
            step = f"{fmt_num(st.get('step') or r.get('step'))}/{fmt_num(st.get('max_steps') or r.get('max_steps'))}"
            table.add_row(
                str(r.get("run_id") or st.get("run_id") or "?"),
                Text(f" {state} ", STATE_STYLES.get(state, "")),
                sanitize(str(RunInfo.from_json(r).recipe or "")),
                sanitize(str(r.get("model") or "")),
                step,
                str(st.get("attempt") or r.get("attempt") or ""),
                key=str(r.get("run_id") or st.get("run_id")),
            )
        table.focus()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        self.dismiss(event.row_key.value)

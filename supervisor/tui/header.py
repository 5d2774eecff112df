"""The run header: who, what state, which attempt and rung, and how far along."""

from __future__ import annotations

from collections.abc import Callable
from datetime import tzinfo

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual.app import RenderResult
from textual.widget import Widget

from supervisor.sanitize import sanitize
from supervisor.states import TERMINAL_VALUES

from .fmt import NA, STATE_STYLES, bar, finite, fmt_duration, fmt_loss, fmt_num
from .model import RunModel
from .panel import CLOCK, ENDED, EVENTS, SAMPLES, STATE, STEPS, Panel


def _row(left: Text, right: Text) -> Table:
    grid = Table.grid(expand=True)
    grid.add_column(ratio=1, no_wrap=True, overflow="ellipsis")
    grid.add_column(justify="right", no_wrap=True)
    grid.add_row(left, right)
    return grid


class RunHeader(Widget, Panel):
    """Three lines: identity and state; attempt, rung and uptime; progress."""

    WATCHES = frozenset({SAMPLES, STEPS, EVENTS, STATE, ENDED, CLOCK})  # uptime ticks with the clock

    def __init__(
        self, model: RunModel, now: Callable[[], float], tz: tzinfo | None, **kw: object
    ) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.model = model
        self.now = now
        self.tz = tz
        self._stopped_at: float | None = None  # when the clock stopped: the run ended or the stream did

    def update_from(self) -> None:
        self.refresh()

    def render(self) -> RenderResult:
        m, st = self.model, self.model.state
        state = str(st.get("state") or "unknown")
        width = self.size.width or 80

        who = Text()
        # Names come from a recipe file and a trainer: no escapes reach the terminal.
        who.append(sanitize(m.run_id), "bold")
        who.append("  ")
        who.append(sanitize(m.recipe or NA), "cyan")
        who.append("  ")
        who.append(sanitize(str(m.run.get("model") or NA)), "grey70")
        badge = Text(f" {state.upper()} ", STATE_STYLES.get(state, "bold reverse"))
        if m.reconnecting:  # not the last frame's TRAINING: the link is down
            badge = Text(" RECONNECTING ", "bold black on yellow")

        how = Text()
        how.append(f"attempt {st.get('attempt') or 1}")
        rung = st.get("rung")  # numbered as supervisor/ladder.py says: rung 1 is the first change
        if rung is not None or st.get("rung_desc"):
            how.append("  rung ")
            how.append(str(rung if rung is not None else "?"), "bold")
            if st.get("rung_desc"):
                how.append(f": {sanitize(str(st['rung_desc']))}", "dark_orange")
        if st.get("message"):
            how.append(f"  {sanitize(str(st['message']))}", "grey70")
        if m.reconnecting:
            how.append(f"  {sanitize(m.reconnecting)}", "bold yellow")
        elif m.ended:
            how.append(f"  disconnected: {m.ended}", "bold red")
        unseen = len(m.unseen())
        right2 = Text()
        if unseen:
            right2.append(f" {unseen} unseen ", "bold black on yellow")
            right2.append(" ")
        started = finite(st.get("started_at"))
        if started is not None:
            end = self._end_time(state)
            right2.append(("ran " if end else "up ") + fmt_duration((end or self.now()) - started))

        progress = self._progress(width)
        return Group(_row(who, badge), _row(how, right2), progress)

    def _end_time(self, state: str) -> float | None:
        """When the run ended (the trainer's exit, else the first frame that saw it end); None
        while it runs. Live state messages carry no updated_at: a stale one would be wrong."""
        if state not in TERMINAL_VALUES and not self.model.ended:
            self._stopped_at = None
            return None
        if self._stopped_at is None:
            st = self.model.state
            self._stopped_at = (finite(st.get("ended_at")) or finite(st.get("updated_at"))
                                if state in TERMINAL_VALUES else None) or self.now()
        return self._stopped_at

    def _progress(self, width: int) -> Text:
        st = self.model.state
        dl = st.get("download") or {}
        if dl.get("active") and st.get("step") is None:  # loading: the download is the progress
            from supervisor.download import describe

            total = finite(dl.get("total"))
            got = finite(dl.get("bytes")) or 0.0
            text = Text(sanitize(describe(dl) or "downloading"), "cyan")
            frac = min(1.0, got / total) if total else None
            room = width - len(text) - 1
            return (bar(frac, max(4, room), "cyan") + Text(" ") + text) if frac is not None else text
        step, total = (
            finite(st.get("step")),
            finite(st.get("max_steps") or self.model.run.get("max_steps")),
        )
        frac = step / total if step is not None and total else None
        left = Text()
        left.append("step ")
        left.append(fmt_num(step) if step is not None else "-", "bold")  # "-" while loading
        left.append(f"/{fmt_num(total) if total else '-'} ")
        tail = Text()
        if frac is not None:
            tail.append(f" {fmt_num(100 * frac, 1)}%")
        tail.append("  loss ")
        loss = st.get("last_loss")
        tail.append(fmt_loss(loss) if loss is not None else "-", "bold")
        tps = st.get("tokens_per_s")
        tail.append(f"  {fmt_num(tps) if tps is not None else '-'} tok/s")
        eta = finite(st.get("eta_s"))
        if eta is not None and str(st.get("state")) not in TERMINAL_VALUES:
            tail.append("  ETA ")
            tail.append(fmt_duration(eta), "bold")
        room = width - len(left) - len(tail)
        return left + bar(frac, max(4, room), "green" if frac != 1.0 else "blue") + tail

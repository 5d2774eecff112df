"""The qlora-watch dashboard: a client of the supervisor's socket, built by make_app()."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import Awaitable, Callable
from datetime import tzinfo
from pathlib import Path
from typing import Any

from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Footer

from supervisor.control.client import RunClient

from .events import EventsPanel, EventsScreen
from .gpu import GpuPanel
from .header import RunHeader
from .host import HostPanel
from .logview import PANEL_LINES, LogScreen, LogTail
from .messages import (
    LiveReceived,
    Reconnected,
    Reconnecting,
    SnapshotReceived,
    StateReceived,
    StreamEnded,
)
from .model import RunModel
from .panel import CLOCK, ENDED, Panel
from .screens import ConfirmScreen, HelpScreen, RunsListScreen
from .training import TrainingPanel

CSS_FILE = Path(__file__).with_name("app.tcss")  # absolute: subclasses elsewhere find it too
RECONNECT_BASE_S = 0.5  # attach --ssh: back-off between reconnects, doubling to the cap
RECONNECT_MAX_S = 10.0
REFRESH_HZ = 4.0  # widgets redraw at most this often, however fast messages arrive
REFRESH_KEEP = 1000  # redraw timings kept (a list, trimmed back to this once it doubles)


class WatchApp(App[str]):
    """Follows one run: header, GPU, host, training, events and log panels."""

    CSS_PATH = CSS_FILE
    TITLE = "qlora-watch"
    ENABLE_COMMAND_PALETTE = False
    # The screen gets -narrow/-wide and -short/-tall: app.tcss collapses panels on small terminals.
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (120, "-wide")]
    VERTICAL_BREAKPOINTS = [(0, "-short"), (36, "-tall")]
    BINDINGS = [
        Binding("d", "detach", "detach"),
        Binding("s", "stop", "stop"),
        Binding("S", "stop_now", "stop now", show=False),
        Binding("a", "ack", "ack"),
        Binding("l", "log", "log"),
        Binding("e", "events", "events"),
        Binding("h,question_mark", "help", "help", key_display="h"),  # h as in htop and nvitop
        Binding("q", "quit_client", "quit"),
        # Textual's ctrl+c only says "press ctrl+q"; here it quits like q (the run goes on).
        Binding("ctrl+c", "quit_client", "quit", show=False, priority=True),
    ]

    def __init__(
        self,
        client: RunClient,
        *,
        run_id: str | None = None,
        now: Callable[[], float] = time.time,
        tz: tzinfo | None = None,
        refresh_hz: float = REFRESH_HZ,
        reconnect: Callable[[], Awaitable[RunClient]] | None = None,
    ) -> None:
        super().__init__()
        self.client = client
        # a new client after the link dropped (attach --ssh): back-off, "reconnecting" shown
        self.reconnect = reconnect
        self.now = now
        self.tz = tz
        self.refresh_hz = refresh_hz
        self.model = RunModel()
        if run_id:
            self.model.run["run_id"] = run_id
        self.first_frame_at: float | None = None  # perf_counter once every panel shows data
        # (perf_counter at the end, live messages applied, seconds spent) per redraw: the bench reads
        # it. A list (the bench slices it), bounded: at 4 Hz a day of redraws would be 345,600.
        self.refreshes: list[tuple[float, int, float]] = []
        self._closed = False
        self._last_second = -1

    def compose(self) -> ComposeResult:
        yield RunHeader(self.model, self.now, self.tz, id="header")
        with Horizontal(id="top"):
            with Vertical(id="left"):
                yield GpuPanel(self.model, id="gpu-panel")
                yield HostPanel(self.model, id="host-panel")
            yield TrainingPanel(self.model, id="training-panel")
        with Horizontal(id="bottom"):
            yield EventsPanel(self.model, self.tz, id="events-panel")
            yield LogTail(self.model, max_lines=PANEL_LINES, id="log-panel")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#host-panel").border_title = "Host"
        self.query_one("#log-panel").border_title = "Trainer log · l full view"
        self.follow()
        self.set_interval(1 / self.refresh_hz, self.refresh_panels)

    # ------------------------------------------------------------------ the socket

    @work(exclusive=True, group="follow", exit_on_error=False)
    async def follow(self) -> None:
        """Connect, post the snapshot, then one message per live message until the stream
        ends; with `reconnect`, a dropped link is retried with back-off ("reconnecting")."""
        _, reason = await self._follow_once(history=True)
        tries = 0
        while reason is not None and self.reconnect is not None and not self._closed:
            tries += 1
            delay = min(RECONNECT_MAX_S, RECONNECT_BASE_S * 2 ** (tries - 1))
            self.post_message(Reconnecting(f"{reason}; reconnecting (try {tries}, {delay:.1f} s)"))
            await asyncio.sleep(delay)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.client.close(), 2.0)
            try:
                self.client = await self.reconnect()
            except Exception as error:  # noqa: BLE001 - the link is still down: try again
                reason = f"link down: {error}"
                continue
            connected, reason = await self._follow_once(history=False)
            if connected:
                tries = 0  # it worked for a while: the next drop starts the back-off over
        if reason is not None:
            self.post_message(StreamEnded(reason))

    async def _follow_once(self, history: bool) -> tuple[bool, str | None]:
        """One connection: (connected, None when it ended with the server's bye, else why)."""
        try:
            snapshot = await self.client.connect(history=history)
        except Exception as error:  # the socket is gone or refused us: say so, do not crash
            return False, f"cannot connect: {error}"
        if history:
            self.post_message(SnapshotReceived(snapshot))
        else:  # a reconnect: the charts keep what they have; the state is new
            self.post_message(Reconnected())
            if isinstance(snapshot.get("state"), dict):
                self.post_message(StateReceived(snapshot["state"]))
        try:
            async for msg in self.client.messages():
                if msg.get("type") == "state" and isinstance(msg.get("state"), dict):
                    self.post_message(StateReceived(msg["state"]))
                else:
                    self.post_message(LiveReceived(msg))
                if msg.get("type") == "bye":
                    return True, None
        except asyncio.CancelledError:
            raise
        except Exception as error:
            return True, f"connection lost: {error}"
        return True, None if self._closed else "stream closed"

    def on_reconnecting(self, message: Reconnecting) -> None:
        self.model.reconnecting = message.reason
        self.model.changed.add(ENDED)  # the header watches it

    def on_reconnected(self, message: Reconnected) -> None:
        self.model.reconnecting = None
        self.model.changed.add(ENDED)  # the header watches it

    async def on_snapshot_received(self, message: SnapshotReceived) -> None:
        self.model.load_snapshot(message.snapshot)
        # What is alive now (the model's series; under ReplayClient the whole recording) lives
        # as long as the app: frozen, it is not walked again by every full collection, which
        # with a day of history was a ~150 ms stall. Refcounting still frees it.
        gc.freeze()
        await self.query_one(GpuPanel).sync_cards()
        self.refresh_panels()
        self.call_after_refresh(self._mark_first_frame)

    def on_live_received(self, message: LiveReceived) -> None:
        self.model.apply(message.payload)  # cheap: the timer redraws

    def on_state_received(self, message: StateReceived) -> None:
        self.model.apply({"type": "state", "state": message.state})

    def on_stream_ended(self, message: StreamEnded) -> None:
        self.model.ended = self.model.ended or message.reason
        self.model.changed.add(ENDED)

    def _mark_first_frame(self) -> None:
        if self.first_frame_at is None:
            self.first_frame_at = time.perf_counter()

    # ------------------------------------------------------------------ drawing

    def refresh_panels(self) -> None:
        """Redraw every panel that watches what changed (the clock: once a second, for uptime).

        The model is plain and the redraw is on this 4 Hz timer, not per-widget reactives: at
        10 Hz of samples over SSH, coalescing on a timer measured better (panel.py)."""
        start = time.perf_counter()
        changed = self.model.take_changed()
        second = int(self.now())
        if second != self._last_second:
            self._last_second = second
            changed.add(CLOCK)
        if not changed:
            return
        main = self.screen_stack[0] if self.screen_stack else self.screen
        screens = [main] if self.screen is main else [main, self.screen]  # and a full view on top
        for screen in screens:
            for panel in _panels(screen):
                if panel.WATCHES & changed:
                    panel.update_from()
        end = time.perf_counter()
        self.refreshes.append((end, self.model.applied, end - start))
        if len(self.refreshes) > 2 * REFRESH_KEEP:  # amortised: cut once it has doubled
            del self.refreshes[:-REFRESH_KEEP]

    # ------------------------------------------------------------------ actions

    async def _command(self, cmd: str, **args: Any) -> dict[str, Any] | None:
        """Send a command; tell the user when it fails, and return the reply if it worked."""
        try:
            reply = await self.client.send_command(cmd, **args)
        except Exception as error:
            self.notify(f"{cmd}: {error}", title="command failed", severity="error")
            return None
        return reply if isinstance(reply, dict) else {}  # the reply's data; refusals raise

    async def _close_client(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await asyncio.wait_for(self.client.close(), timeout=2.0)
        except Exception:  # leaving must not hang or fail on a dead socket
            pass

    async def action_detach(self) -> None:
        """Leave the dashboard; the run goes on."""
        await self._close_client()
        self.exit("detached")

    async def action_quit_client(self) -> None:
        """Quit the dashboard; the run goes on."""
        await self._close_client()
        self.exit("quit")

    def action_stop(self) -> None:
        """Ask, then ask the supervisor to stop gracefully (checkpoint, then exit)."""
        if isinstance(self.screen, ConfirmScreen):
            return  # already asking
        self.push_screen(
            ConfirmScreen(
                "Stop the run gracefully?",
                "The trainer saves a checkpoint and exits; the supervisor will not relaunch it.",
            ),
            self._stop_answered,
        )

    def action_stop_now(self) -> None:
        """Ask, then ask the supervisor to stop the trainer now, without a checkpoint."""
        if isinstance(self.screen, ConfirmScreen):
            return
        self.push_screen(
            ConfirmScreen(
                "Stop the run NOW?",
                "The trainer is terminated without saving; "
                "progress since the last checkpoint is lost.",
            ),
            self._stop_now_answered,
        )

    async def _stop_answered(self, yes: bool | None) -> None:
        if yes and await self._command("stop") is not None:
            self.notify("graceful stop requested", title="stop")

    async def _stop_now_answered(self, yes: bool | None) -> None:
        if yes and await self._command("stop_now") is not None:
            self.notify("immediate stop requested", title="stop")

    async def action_ack(self) -> None:
        """Acknowledge the unseen warnings and errors, and clear their highlight."""
        unseen = self.model.unseen()
        if not unseen:
            self.notify("nothing to acknowledge")
            return
        ids = [e["id"] for e in unseen if isinstance(e.get("id"), int)]
        complete = len(ids) == len(unseen)
        reply = await (self._command("ack", event_ids=ids) if complete else self._command("ack"))
        if reply is not None:
            self.model.mark_acked(ids if complete else None)
            self.refresh_panels()

    def action_log(self) -> None:
        """The full trainer log."""
        if not isinstance(self.screen, LogScreen):
            self.push_screen(LogScreen(self.model))

    def action_events(self) -> None:
        """All events."""
        if not isinstance(self.screen, EventsScreen):
            self.push_screen(EventsScreen(self.model, self.tz))

    def action_help(self) -> None:
        """Keys and panels."""
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    async def on_unmount(self) -> None:
        await self._close_client()


def _panels(screen: Screen[Any]) -> list[Panel]:
    """The panels of a screen (the screen itself may be one), in DOM order."""
    return [n for n in (screen, *screen.walk_children()) if isinstance(n, Panel)]


class RunPickerApp(App[str]):
    """Lists runs and returns the chosen run id (None when the user quits)."""

    CSS_PATH = CSS_FILE
    TITLE = "qlora-watch"
    ENABLE_COMMAND_PALETTE = False

    def __init__(self, runs: list[dict[str, Any]]) -> None:
        super().__init__()
        self.runs = runs

    def on_mount(self) -> None:
        self.push_screen(RunsListScreen(self.runs), self.exit)


def make_app(
    client: RunClient,
    *,
    run_id: str | None = None,
    now: Callable[[], float] = time.time,
    tz: tzinfo | None = None,
    refresh_hz: float = REFRESH_HZ,
    reconnect: Callable[[], Awaitable[RunClient]] | None = None,
) -> WatchApp:
    """The dashboard for the run behind `client` (AsyncRunClient, or ReplayClient in tests);
    `reconnect` makes a new client when the link drops (attach --ssh)."""
    return WatchApp(client, run_id=run_id, now=now, tz=tz, refresh_hz=refresh_hz, reconnect=reconnect)


def pick_run(runs: list[dict[str, Any]]) -> RunPickerApp:
    """An app that lists `runs` and exits with the chosen run_id."""
    return RunPickerApp(runs)

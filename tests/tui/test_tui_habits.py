"""Keys people already know: ctrl+c quits (the run goes on), h is help, / searches, n/N step."""

from __future__ import annotations

from typing import Any

from textual.widgets import DataTable

from supervisor.tui.events import EventsScreen
from supervisor.tui.logview import LogScreen, LogTail
from supervisor.tui.screens import HelpScreen
from supervisor.tui.search import find_matches
from tests.support.tui import make, ready, run_async


@run_async
async def test_ctrl_c_quits_the_dashboard_and_sends_nothing() -> None:
    app, client = make("training")
    async with app.run_test() as pilot:
        await ready(pilot)
        await pilot.press("ctrl+c")
        await pilot.pause()
    assert app.return_value == "quit" and client.commands == []  # no stop: the run goes on


@run_async
async def test_h_opens_help_and_h_closes_it() -> None:
    app, _ = make("training")
    async with app.run_test() as pilot:
        await ready(pilot)
        await pilot.press("h")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        assert "search; n / N" in str(app.screen.query_one("#help-text").render())
        await pilot.press("h")
        await pilot.pause()
        assert not isinstance(app.screen, HelpScreen)


@run_async
async def test_slash_searches_the_log_and_n_N_step_through_matches() -> None:
    app, _ = make("oom_relaunch")
    async with app.run_test(size=(120, 30)) as pilot:
        screen = await open_view(pilot, "l", LogScreen)
        texts = screen.search_texts()
        hits = [i for i, t in enumerate(texts) if "loss" in t.lower()]
        assert len(hits) >= 3
        await pilot.press("slash", *"loss", "enter")
        await pilot.pause()
        log = screen.query_one(LogTail)
        assert log.marked == hits[-1]  # the newest match first
        status = str(screen.query_one("#search-status").render())
        assert f"match {len(hits)} of {len(hits)}" in status
        await pilot.press("N")
        await pilot.pause()
        assert log.marked == hits[-2]
        assert log.scroll_offset.y <= hits[-2] < log.scroll_offset.y + log.size.height  # in view
        await pilot.press("n", "n")  # wraps past the newest to the oldest
        await pilot.pause()
        assert log.marked == hits[0]
        # typing into the prompt never triggers the screen's keys (q would leave the view)
        await pilot.press("slash", *"qq", "escape")
        await pilot.pause()
        assert isinstance(app.screen, LogScreen) and not screen.query_one("#search-input").has_class("-open")
        await pilot.press("slash", *"no such line", "enter")
        await pilot.pause()
        assert log.marked is None and "no match" in str(screen.query_one("#search-status").render())


@run_async
async def test_slash_searches_the_events_view() -> None:
    app, _ = make("oom_relaunch")
    async with app.run_test(size=(120, 30)) as pilot:
        await open_view(pilot, "e", EventsScreen)
        await pilot.press("slash", *"out of memory", "enter")
        await pilot.pause()
        table = app.screen.query_one(DataTable)
        row = [ev.get("message") for ev in app.model.events].index(
            next(m for m in (ev.get("message") for ev in app.model.events) if "out of memory" in m))
        assert table.cursor_row == row
        await pilot.press("slash", *"checkpoint", "enter", "N")  # saved, and relaunched from
        await pilot.pause()
        assert "match 1 of 2" in str(app.screen.query_one("#search-status").render())


async def open_view(pilot: Any, key: str, screen: type) -> Any:
    """Wait for the dashboard, press `key`, return the view it opened."""
    await ready(pilot)
    await pilot.press(key)
    await pilot.pause()
    assert isinstance(pilot.app.screen, screen)
    return pilot.app.screen


def test_find_matches_smart_case() -> None:
    rows = ["CUDA out of memory", "cuda ok", "nothing"]
    assert find_matches(rows, "cuda") == [0, 1]
    assert find_matches(rows, "CUDA") == [0]
    assert find_matches(rows, "") == []

"""A dashboard panel is one file: a widget that is a Panel, composed once; the app does the rest."""

from __future__ import annotations

import asyncio
import copy
from datetime import timezone

from textual.app import ComposeResult
from textual.widgets import Static

from supervisor.tui.app import WatchApp
from supervisor.tui.panel import STEPS, Panel
from supervisor.tui.replay import ReplayClient, load_recorded
from tests.support import FIXTURES

RECORDED = FIXTURES / "recorded_run_training.json"


class StepCount(Static, Panel):
    """A new panel: everything it needs is here (what it watches, how it redraws)."""

    WATCHES = frozenset({STEPS})

    def __init__(self, app: WatchApp) -> None:
        super().__init__(id="step-count")
        self.model = app.model
        self.calls = 0

    def update_from(self) -> None:
        self.calls += 1
        self.update(f"{len(self.model.step_x)} logged steps")


class WithStepCount(WatchApp):
    def compose(self) -> ComposeResult:  # the one other edit a panel needs
        yield from super().compose()
        yield StepCount(self)


def test_a_new_panel_is_redrawn_when_what_it_watches_changes_and_only_then() -> None:
    rec = load_recorded(RECORDED)
    steps = [m for m in rec["live"] if m.get("type") == "step"]
    logs = [m for m in rec["live"] if m.get("type") == "log"]
    assert steps and logs
    rec["live"] = []
    client = ReplayClient(rec, rate=None)
    now = rec["state"]["updated_at"]
    app = WithStepCount(client, now=lambda: now, tz=timezone.utc)

    async def go() -> None:
        async with app.run_test() as pilot:
            for _ in range(400):
                if app.first_frame_at is not None:
                    break
                await asyncio.sleep(0.01)
            panel = app.query_one(StepCount)
            first, shown = panel.calls, len(app.model.step_x)
            assert first >= 1 and f"{shown} logged steps" in str(panel.render())
            app.model.apply(copy.deepcopy(logs[0]))  # a log line: not watched
            app.refresh_panels()
            assert panel.calls == first
            app.model.apply(copy.deepcopy(steps[0]))  # a step: redrawn
            app.refresh_panels()
            await pilot.pause()
            assert panel.calls == first + 1 and f"{shown + 1} logged steps" in str(panel.render())

    asyncio.run(go())


def test_host_needs_come_from_the_run_not_only_from_recorded_state() -> None:
    """A real run's state carries no host_ram_needed_mib / next_checkpoint_bytes (only recorded
    fixtures do): the dashboard reads preflight's estimate in run.json and the last checkpoint's size."""
    from supervisor.tui.model import RunModel

    m = RunModel()
    m.load_snapshot({"run": {"estimate": {"host_ram_needed_bytes": 6 * 2**30}},
                     "state": {"state": "training", "last_checkpoint_bytes": 512 * 2**20},
                     "samples": [], "steps": [], "events": [], "log": []})
    assert (m.host_ram_needed_mib, m.next_checkpoint_bytes) == (6144.0, 512 * 2**20)
    m.load_snapshot({"run": {}, "state": {"host_ram_needed_mib": 100, "next_checkpoint_bytes": 5},
                     "samples": [], "steps": [], "events": [], "log": []})
    assert (m.host_ram_needed_mib, m.next_checkpoint_bytes) == (100.0, 5.0)

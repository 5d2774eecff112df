"""Words and numbers a person reads: status, the dashboard header and titles, ls, merge errors."""

from __future__ import annotations

import re
from datetime import timezone
from pathlib import Path

import pytest

from supervisor.control import runs
from supervisor.control.merge import MergeError, find_adapter
from supervisor.tui.app import make_app
from supervisor.tui.header import RunHeader
from supervisor.tui.replay import ReplayClient
from supervisor.tui.training import TrainingPanel
from tests.support.tui import ready, recorded, run_async, screen_text

RUN = {"recipe": "tiny", "model": "tiny-llama", "output_dir": "/tmp/out"}


def test_status_rounds_and_never_says_none() -> None:
    text = runs.render_status({"run_id": "amber", "run": RUN, "state": "training", "attempt": 1,
                               "step": 1234, "max_steps": 5000, "last_loss": 0.44321,
                               "tokens_per_s": 958.4, "eta_s": 3700, "events": []})
    assert "loss      0.443\n" in text and "speed     958 tok/s" in text
    assert "step      1,234/5,000" in text and "ETA       1h01m" in text
    assert "None" not in text
    loading = runs.render_status({"run_id": "amber", "run": RUN, "state": "starting", "events": []})
    assert "None" not in loading and "loss      -" in loading and "step      -/-" in loading


def test_status_has_no_eta_once_the_run_ended() -> None:
    text = runs.render_status({"run_id": "amber", "run": RUN, "state": "completed", "step": 200,
                               "max_steps": 200, "eta_s": 12.0, "events": []})
    assert "ETA" not in text


def app_on(rec: dict, now: list[float]):
    return make_app(ReplayClient(rec, rate=None), now=lambda: now[0], tz=timezone.utc)


@run_async
async def test_header_says_step_dash_while_loading() -> None:
    rec = recorded("training")
    rec["live"] = []
    rec["steps"] = []
    rec["state"] = {**rec["state"], "state": "loading", "step": None, "max_steps": None,
                    "last_loss": None, "tokens_per_s": None, "eta_s": None}
    rec["run"] = {**rec["run"], "max_steps": None}
    app = app_on(rec, [rec["state"]["updated_at"]])
    async with app.run_test(size=(120, 36)) as pilot:
        await ready(pilot)
        text = app.query_one(RunHeader).render()
        plain = "\n".join(line.plain for line in text.renderables[2:])  # the progress line
        assert "step -/-" in plain and "n/a" not in plain


@run_async
async def test_uptime_stops_when_the_run_ends() -> None:
    rec = recorded("training")
    # As the supervisor broadcasts it: no updated_at (only state.json has one)
    ended = {k: v for k, v in rec["state"].items() if k != "updated_at"}
    rec["live"] = [{"type": "state", "state": {**ended, "state": "completed"}}]
    now = [rec["state"]["updated_at"]]
    app = app_on(rec, now)
    async with app.run_test(size=(120, 36)) as pilot:
        await ready(pilot)
        await app.client.finished.wait()
        await pilot.pause(0.3)

        def clock() -> str:
            return re.search(r"(ran|up) \S+", screen_text(app)).group(0)

        first = clock()
        assert first.startswith("ran ")
        now[0] += 3600
        app.refresh_panels()
        await pilot.pause()
        assert clock() == first  # an ended run's clock does not go on


@run_async
async def test_training_title_counts_steps_not_logged_points() -> None:
    rec = recorded("training")
    rec["live"] = []
    app = app_on(rec, [rec["state"]["updated_at"]])
    async with app.run_test(size=(120, 36)) as pilot:
        await ready(pilot)
        panel = app.query_one(TrainingPanel)
        last = int(app.model.step_x[-1])
        assert len(app.model.step_x) < last  # logged every 10 steps
        assert panel.border_title == f"Training · {last:,} steps"


def test_merge_error_reads_as_english(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text('{"output_dir": "%s"}' % (tmp_path / "out"))
    (run / "state.json").write_text("{}")
    with pytest.raises(MergeError) as e:
        find_adapter(run)
    assert str(e.value).startswith("no final adapter found") and "no a " not in str(e.value)



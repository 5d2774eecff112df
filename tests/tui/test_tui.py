"""The dashboard against recorded runs: keys, highlights, live updates, snapshots, helpers."""

from __future__ import annotations

import math
import shutil
import tempfile
from datetime import timezone
from pathlib import Path
from typing import Any

import pytest
from textual.widgets import Static

from supervisor.sanitize import sanitize
from supervisor.tui.app import WatchApp, make_app, pick_run
from supervisor.tui.downsample import bucket_max, minmax, stride
from supervisor.tui.events import EventsPanel, EventsScreen
from supervisor.tui.fmt import UNSEEN_STYLES, fmt_duration, num, throttle_words
from supervisor.tui.gpu import GpuPanel
from supervisor.tui.logview import LogScreen, LogTail
from supervisor.tui.model import SAMPLE_KEEP, RunModel
from supervisor.tui.replay import ReplayClient
from supervisor.tui.screens import ConfirmScreen, HelpScreen, RunsListScreen
from supervisor.tui.serve import make_server
from supervisor.tui.training import LossChart
from tests.fakes.tui_scenarios import SCENARIOS, Plan, build
from tests.support.tui import make, ready, recorded, run_async, screen_text

# ------------------------------------------------------------------------------ keys


@run_async
async def test_detach_exits_with_detached() -> None:
    app, client = make("training")
    async with app.run_test() as pilot:
        await ready(pilot)
        await pilot.press("d")
        await pilot.pause()
    assert app.return_value == "detached"
    assert client.closed and client.commands == []  # detaching sends nothing: the run goes on


@run_async
async def test_quit_exits_without_commands() -> None:
    app, client = make("training")
    async with app.run_test() as pilot:
        await ready(pilot)
        await pilot.press("q")
        await pilot.pause()
    assert app.return_value == "quit"
    assert client.closed and client.commands == []


@run_async
async def test_stop_asks_then_sends_stop() -> None:
    app, client = make("training")
    async with app.run_test() as pilot:
        await ready(pilot)
        await pilot.press("s")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmScreen)
        assert client.commands == []  # nothing until the user says yes
        await pilot.press("y")
        await pilot.pause()
        assert not isinstance(app.screen, ConfirmScreen)
        assert client.commands == [("stop", {})]
        assert app.is_running  # stopping the run is not leaving the dashboard


@run_async
async def test_stop_answer_no_sends_nothing() -> None:
    app, client = make("training")
    async with app.run_test() as pilot:
        await ready(pilot)
        await pilot.press("s", "n")
        await pilot.pause()
        assert not isinstance(app.screen, ConfirmScreen)
        await pilot.press("s", "escape")
        await pilot.pause()
        assert client.commands == []


@run_async
async def test_stop_now_asks_then_sends_stop_now() -> None:
    app, client = make("training")
    async with app.run_test() as pilot:
        await ready(pilot)
        await pilot.press("S")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("y")
        await pilot.pause()
        assert client.commands == [("stop_now", {})]


def _highlighted(panel: EventsPanel) -> int:
    """How many spans of the events panel carry an unseen-warning style."""
    text = panel.render()
    styles = set(UNSEEN_STYLES.values())
    return sum(1 for span in text.spans if str(span.style) in styles)


@run_async
async def test_warning_highlighted_until_acknowledged() -> None:
    app, client = make("throttling")
    async with app.run_test() as pilot:
        await ready(pilot)
        panel = app.query_one(EventsPanel)
        assert [e["id"] for e in app.model.unseen()] == [6]
        assert panel.has_class("-unseen") and _highlighted(panel) == 1
        assert "1 unseen" in screen_text(app)
        await pilot.press("a")
        await pilot.pause()
        assert client.commands == [("ack", {"event_ids": [6]})]
        assert app.model.unseen() == []
        assert not panel.has_class("-unseen") and _highlighted(panel) == 0
        assert "unseen" not in screen_text(app)
        await pilot.press("a")  # nothing left: no second command
        await pilot.pause()
        assert len(client.commands) == 1


@run_async
async def test_oom_relaunch_error_and_warning_acked_together() -> None:
    app, client = make("oom_relaunch")
    async with app.run_test() as pilot:
        await ready(pilot)
        assert {e["level"] for e in app.model.unseen()} == {"error", "warning"}
        await pilot.press("a")
        await pilot.pause()
        assert client.commands == [("ack", {"event_ids": [5, 6]})]
        assert app.model.unseen() == []


@run_async
async def test_failed_ack_keeps_highlight() -> None:
    app, client = make("throttling")
    client.fail["ack"] = "supervisor busy"
    async with app.run_test() as pilot:
        await ready(pilot)
        await pilot.press("a")
        await pilot.pause()
        assert len(app.model.unseen()) == 1  # not acknowledged: still shown
        assert app.is_running


@run_async
async def test_acked_message_from_another_client_clears_highlight() -> None:
    rec = recorded("throttling")
    rec["live"] = [{"type": "acked", "event_ids": [6]}]
    client = ReplayClient(rec, rate=None)
    app = make_app(client, now=lambda: rec["state"]["updated_at"], tz=timezone.utc)
    async with app.run_test() as pilot:
        await ready(pilot)
        await client.finished.wait()
        await pilot.pause(0.3)
        assert app.model.unseen() == []
        assert _highlighted(app.query_one(EventsPanel)) == 0


@run_async
async def test_screens_open_and_close() -> None:
    app, _ = make("training")
    async with app.run_test() as pilot:
        await ready(pilot)
        for key, screen in (("l", LogScreen), ("e", EventsScreen), ("question_mark", HelpScreen)):
            await pilot.press(key)
            await pilot.pause()
            assert isinstance(app.screen, screen), key
            await pilot.press("escape")
            await pilot.pause()
            assert not isinstance(app.screen, screen), key
        await pilot.press("e")
        await pilot.pause()
        assert app.screen.query_one("#events-table").row_count == len(app.model.events)


@run_async
async def test_log_view_strips_escapes() -> None:
    app, _ = make("training")
    async with app.run_test(size=(160, 48)) as pilot:
        await ready(pilot)
        await pilot.press("l")
        await pilot.pause()
        log = app.screen.query_one(LogTail)
        text = "\n".join(strip.text for strip in log.lines)
        assert "escapes above were stripped" in text
        assert "\x1b" not in text and "pwned" not in text and "\x07" not in text


# ------------------------------------------------------------------------------ live


@run_async
async def test_live_messages_update_header_step() -> None:
    app, client = make("training", live=True, rate=50, lead_s=1.0)
    async with app.run_test() as pilot:
        await ready(pilot)
        assert "step 2,500/10,000" in screen_text(app)
        for _ in range(200):  # the first step record is the 5th live message
            await pilot.pause(0.05)
            if "step 2,510/10,000" in screen_text(app):
                break
        assert "step 2,510/10,000" in screen_text(app)
        assert app.model.step_x[-1] == 2510


@run_async
async def test_updates_coalesce() -> None:
    rec = recorded("training")
    sample = rec["samples"][-1]
    rec["live"] = [
        {"type": "sample", "sample": {**sample, "t": sample["t"] + i / 10}} for i in range(500)
    ]
    client = ReplayClient(rec, rate=None)
    app = make_app(client, now=lambda: rec["state"]["updated_at"], tz=timezone.utc)
    async with app.run_test() as pilot:
        await ready(pilot)
        await client.finished.wait()
        await pilot.pause(0.3)
        assert app.model.applied == 500
        assert len(app.refreshes) < 50  # redraws on a 4 Hz timer, not per message


@run_async
async def test_bye_shows_disconnected() -> None:
    rec = recorded("training")
    rec["live"] = [{"type": "bye", "reason": "server shutting down"}]
    client = ReplayClient(rec, rate=None)
    app = make_app(client, now=lambda: rec["state"]["updated_at"], tz=timezone.utc)
    async with app.run_test() as pilot:
        await ready(pilot)
        await pilot.pause(0.4)
        assert "disconnected: server shutting down" in screen_text(app)


class RefusingClient(ReplayClient):
    async def connect(self, history: bool = True) -> dict[str, Any]:
        raise ConnectionRefusedError("no supervisor")


@run_async
async def test_connect_failure_is_shown_not_raised() -> None:
    app = make_app(RefusingClient({}), now=lambda: 0.0, tz=timezone.utc)
    async with app.run_test() as pilot:
        await pilot.pause(0.4)
        assert "cannot connect: no supervisor" in screen_text(app)
        await pilot.press("d")
    assert app.return_value == "detached"


@run_async
async def test_no_gpu_says_why() -> None:
    app, _ = make("no_gpu")
    async with app.run_test() as pilot:
        await ready(pilot)
        message = str(app.query_one("#gpu-none", Static).content)
        assert message == "No GPU (NVML unavailable: NVML library not found)"
        assert app.query_one("#gpu-none", Static).display
        assert not app.query_one(GpuPanel).query(".gpu-card")


@run_async
async def test_two_gpus_two_cards() -> None:
    rec = recorded("throttling")
    last = rec["samples"][-1]
    second = {
        **last["gpus"][0],
        "index": 1,
        "throttle_reasons": [],
        "throttle_mask": 0,
        "temp_c": 60,
    }
    rec["samples"][-1] = {**last, "gpus": [last["gpus"][0], second]}
    rec["live"] = [{"type": "sample", "sample": {**last, "t": last["t"] + 1}}]  # GPU 1 goes away
    client = ReplayClient(rec, rate=None, lead_s=1.0)
    app = make_app(client, now=lambda: rec["state"]["updated_at"], tz=timezone.utc)
    async with app.run_test(size=(160, 48)) as pilot:
        await ready(pilot)
        text = screen_text(app)
        assert "GPU 0 · NVIDIA H200" in text and "GPU 1 · NVIDIA H200" in text
        assert len(app.query(".gpu-card")) == 2
        await client.finished.wait()
        await pilot.pause(0.4)
        assert [c.id for c in app.query(".gpu-card")] == ["gpu-0"]


@run_async
async def test_runs_list_picks_a_run() -> None:
    runs = [
        {
            "run_id": "amber-falcon",
            "recipe": "llama-3.1-8b",
            "model": "m",
            "state": "training",
            "step": 10,
        },
        {
            "run_id": "quiet-otter",
            "recipe_name": "qwen-2.5-14b",
            "state": {"state": "backoff", "attempt": 2},
        },
    ]
    app = pick_run(runs)
    async with app.run_test() as pilot:
        await pilot.pause()
        assert isinstance(app.screen, RunsListScreen)
        await pilot.press("down", "enter")
        await pilot.pause()
    assert app.return_value == "quiet-otter"


@run_async
async def test_runs_list_quit_returns_none() -> None:
    app = pick_run([{"run_id": "amber-falcon"}])
    async with app.run_test() as pilot:
        await pilot.pause()
        await pilot.press("q")
        await pilot.pause()
    assert app.return_value is None


class SocketHandler:
    """The core's side of the control socket, serving a recorded run."""

    def __init__(self, rec: dict[str, Any]) -> None:
        self.rec = rec
        self.commands: list[tuple[str, dict[str, Any]]] = []

    def snapshot(self) -> dict[str, Any]:
        return {k: self.rec[k] for k in ("run", "state", "samples", "steps", "events", "log")}

    def handle_command(self, cmd: str, args: dict[str, Any], peer: Any) -> dict[str, Any]:
        self.commands.append((cmd, args))
        return {"acked": len(args.get("event_ids") or [])} if cmd == "ack" else {}


@run_async
async def test_through_the_real_socket() -> None:
    """The dashboard on AsyncRunClient and ControlServer: snapshot, live step, ack, stop, bye."""
    from supervisor.control.client import AsyncRunClient
    from supervisor.daemon.server import ControlServer

    rec = recorded("throttling")
    handler = SocketHandler(rec)
    folder = tempfile.mkdtemp(prefix="qlw-tui-", dir="/tmp")  # short: sun_path is 108 bytes
    server = ControlServer(Path(folder) / "run.sock", handler, run_id="copper-heron")
    await server.start()
    try:
        app = make_app(
            AsyncRunClient(server.path), now=lambda: rec["state"]["updated_at"], tz=timezone.utc
        )
        async with app.run_test() as pilot:
            await ready(pilot)
            assert "copper-heron" in screen_text(app) and len(app.model.unseen()) == 1
            step = {**rec["steps"][-1], "step": 2510, "loss": "NaN"}
            server.broadcast({"type": "step", "step": step})
            for _ in range(100):
                await pilot.pause(0.05)
                if "step 2,510/10,000" in screen_text(app):
                    break
            assert "step 2,510/10,000" in screen_text(app) and "loss NaN" in screen_text(app)
            await pilot.press("a")
            await pilot.pause(0.2)
            await pilot.press("s", "y")
            await pilot.pause(0.2)
            assert handler.commands == [("ack", {"event_ids": [6]}), ("stop", {})]
            assert app.model.unseen() == []
            await server.close(reason="run completed")
            await pilot.pause(0.5)
            assert "disconnected: run completed" in screen_text(app)
    finally:
        await server.close()
        shutil.rmtree(folder, ignore_errors=True)


# ------------------------------------------------------------------------------ snapshots


def _snap_app(name: str) -> WatchApp:
    app, _ = make(name)
    return app


@pytest.mark.parametrize("size", [(80, 24), (160, 48)], ids=["80x24", "160x48"])
@pytest.mark.parametrize("name", SCENARIOS)
def test_snapshot(snap_compare: Any, name: str, size: tuple[int, int]) -> None:
    assert snap_compare(_snap_app(name), terminal_size=size, run_before=ready)


# ------------------------------------------------------------------------------ pieces


def test_sanitize_strips_escapes_and_controls() -> None:
    assert sanitize("hi \x1b]52;c;ZXZpbA==\x07there") == "hi there"  # OSC 52: clipboard write
    assert sanitize("\x1b]0;pwned\x1b\\title") == "title"  # OSC 0 with ST
    assert sanitize("a\x1b[2Jb\x1b[31mred\x1b[0m") == "abred"  # CSI 2J, SGR
    assert sanitize("x\x9b31my\x9d0;t\x9cz") == "xyz"  # 8-bit CSI and OSC
    assert sanitize("\x1bPq#0;2\x1b\\end") == "end"  # DCS (sixel)
    assert sanitize("\x1b]52;c;cut off") == ""  # unterminated OSC
    assert sanitize("bell\x07 nul\x00 del\x7f bs\x08") == "bell nul del bs"
    assert sanitize("tab\there") == "tab here"
    assert sanitize("10%\r20%\r") == "20%"  # tqdm redraws: keep what a terminal would show
    assert sanitize("\u202eevil\u2066") == "evil"  # bidi overrides
    assert sanitize("bad \udcff byte") == "bad \ufffd byte"  # surrogateescape leftovers
    assert sanitize("[bold]not markup[/] é 日本") == "[bold]not markup[/] é 日本"


def test_model_reads_non_finite_strings_and_resumes() -> None:
    m = RunModel()
    m.load_snapshot({"steps": [{"step": s, "loss": 2.0, "lr": 1e-4} for s in (10, 20, 30)]})
    m.apply({"type": "step", "step": {"step": 40, "loss": "NaN", "grad_norm": "Infinity"}})
    assert math.isnan(m.loss[-1]) and m.ema[-1] == 2.0 and m.grad_norm[-1] == 0.0
    assert m.state["last_loss"] == "NaN"
    # A relaunch resumed from step 20: its step 30 replaces the lost 30 and 40.
    m.apply({"type": "step", "step": {"step": 30, "loss": 1.0}})
    assert m.step_x == [10, 20, 30] and m.loss[-1] == 1.0
    assert num("-Infinity") == -math.inf and num("abc") is None and num(None) is None


def test_model_bulk_and_one_by_one_steps_agree() -> None:
    steps = [
        {"step": s, "loss": 3.0 - s / 100, "lr": 1e-4, "tokens_per_s": 100.0} for s in range(1, 50)
    ]
    bulk, single = RunModel(), RunModel()
    bulk.load_snapshot({"steps": steps})
    for st in steps:
        single.apply({"type": "step", "step": st})
    assert bulk.step_x == single.step_x and bulk.ema == pytest.approx(single.ema)


def test_model_keeps_an_hour_of_samples_and_updates_events() -> None:
    m = RunModel()
    m.load_snapshot(
        {
            "samples": [
                {"t": i, "gpus": [{"index": 0, "util_pct": 50.0}]} for i in range(3 * SAMPLE_KEEP)
            ],
            "events": [{"id": 1, "level": "warning", "acked": False}],
        }
    )
    assert len(m.sample_t) == SAMPLE_KEEP and m.sample_t[-1] == 3 * SAMPLE_KEEP - 1
    assert len(m.unseen()) == 1
    m.apply({"type": "event", "event": {"id": 1, "level": "warning", "acked": True}})
    assert m.unseen() == [] and len(m.events) == 1
    m.apply({"type": "log", "lines": ["\x1b[2Jok"]})
    assert list(m.log) == ["ok"] and m.log_total == 1


def test_downsample_keeps_spikes_and_bounds_points() -> None:
    xs = list(range(20_000))
    ys = [1.0] * 20_000
    ys[12_345] = 9.0
    ys[100] = float("nan")
    dx, dy = minmax(xs, ys, 100)
    assert len(dx) <= 200 and 9.0 in dy and all(math.isfinite(y) for y in dy)
    sx, sy = stride(xs, ys, 150)
    assert len(sx) <= 151 and sx[-1] == 19_999
    assert len(bucket_max(ys, 70)) == 70 and max(bucket_max(ys, 70)) == 9.0


def test_formatting() -> None:
    assert fmt_duration(45) == "45s" and fmt_duration(3 * 3600 + 12 * 60) == "3h12m"
    assert fmt_duration(2 * 86400 + 4 * 3600) == "2d04h" and fmt_duration(None) == "n/a"
    assert throttle_words(["HwThermalSlowdown", "SwPowerCap"]) == [
        ("thermal (HW)", True),
        ("power cap", False),
    ]
    assert throttle_words([], 0x20 | 0x1) == [("idle", False), ("thermal (driver)", True)]


def test_fixtures_are_deterministic() -> None:
    assert build(Plan(scenario="throttling")) == build(Plan(scenario="throttling"))
    rec = recorded("oom_relaunch")
    assert rec["state"]["attempt"] == 2 and rec["state"]["rung"] == 1
    assert rec["state"]["rung_desc"] == "max_seq_len 1024 -> 768 after OOM"
    nogpu = recorded("no_gpu")["samples"][-1]
    assert nogpu["gpus"] == [] and nogpu["nvml"] == "unavailable: NVML library not found"


@run_async
async def test_big_history_downsamples_chart() -> None:
    plan = Plan(
        scenario="training",
        step=20_000,
        max_steps=40_000,
        step_time_s=4.32,
        log_every=1,
        history_s=600,
        live_s=0,
    )
    rec = build(plan)
    client = ReplayClient(rec, rate=None)
    app = make_app(client, now=lambda: rec["state"]["updated_at"], tz=timezone.utc)
    async with app.run_test(size=(160, 48)) as pilot:
        await ready(pilot)
        chart = app.query_one(LossChart)
        assert len(app.model.step_x) == 20_000
        assert 0 < chart.points_drawn <= 6 * chart.size.width  # not 20,000
        assert "step 20,000/40,000" in screen_text(app)


# ------------------------------------------------------------------------------ serve


def test_serve_refuses_non_loopback() -> None:
    server = make_server(["qlora-watch", "attach", "run id"], port=8123)
    assert server.host == "127.0.0.1" and server.port == 8123
    assert server.command == "qlora-watch attach 'run id'"  # quoted: textual-serve uses a shell
    with pytest.raises(ValueError):
        make_server(["x"], port=8123, host="0.0.0.0")



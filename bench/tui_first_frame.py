"""Dashboard responsiveness: first full frame over 24 h of history, then a 10 Hz live replay.

    python bench/tui_first_frame.py                 # both, 160x48, 10 s of live replay
    python bench/tui_first_frame.py --live-s 30 --size 80x24

1. First frame: a recorded run with 86,400 samples (24 h at 1 Hz) and 20,000 steps goes through
   ReplayClient; the figure is the time from entering App.run_test() to the first frame with
   every panel populated (after the snapshot is in the model, the panels are drawn and the
   screen has refreshed). Target: under 1 s.
2. Live: on top of that history, samples at 10 Hz plus a step and a log line every second,
   for --live-s seconds. Reported: the worst gap between redraws, the lag from a message
   leaving the client to the redraw that shows it (p50/p99/max), the longest redraw, and the
   longest event-loop stall seen by a 10 ms heartbeat.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import statistics
import sys
import time
from datetime import timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from supervisor.tui.app import WatchApp, make_app  # noqa: E402
from supervisor.tui.events import EventsPanel  # noqa: E402
from supervisor.tui.gpu import GpuCard  # noqa: E402
from supervisor.tui.logview import LogTail  # noqa: E402
from supervisor.tui.model import SAMPLE_KEEP  # noqa: E402
from supervisor.tui.replay import ReplayClient  # noqa: E402
from supervisor.tui.training import LossChart  # noqa: E402
from tests.fakes.tui_scenarios import Plan, build  # noqa: E402


def day_of_history() -> dict[str, Any]:
    """24 h at 1 Hz and 20,000 logged steps (one every 4.32 s), no live part."""
    plan = Plan(
        scenario="training",
        step=20_000,
        max_steps=40_000,
        step_time_s=4.32,
        log_every=1,
        history_s=86_400,
        live_s=0,
    )
    return build(plan)


def live_part(rec: dict[str, Any], seconds: int) -> list[dict[str, Any]]:
    """10 Hz samples, a step and a log line each second, continuing the recording."""
    last_sample, last_step = rec["samples"][-1], rec["steps"][-1]
    t0, out = last_sample["t"], []
    for i in range(1, seconds * 10 + 1):
        out.append({"type": "sample", "sample": {**last_sample, "t": t0 + i / 10}})
        if i % 10 == 0:
            n = last_step["step"] + i // 10
            out.append({"type": "step", "step": {**last_step, "step": n, "t": t0 + i / 10}})
            out.append({"type": "log", "lines": [f"{{'loss': {last_step['loss']}, 'step': {n}}}"]})
    return out


def check_populated(app: WatchApp) -> None:
    """Fail loudly if a panel is empty: the figure must be for a whole frame."""
    m = app.model
    # The model keeps the last hour of samples (all the sparklines can show) and every step.
    assert len(m.sample_t) == min(SAMPLE_KEEP, 86_400) and len(m.step_x) == 20_000, (
        "history not loaded"
    )
    assert app.query(GpuCard), "no GPU card"
    assert app.query_one(LossChart).points_drawn > 0, "loss chart empty"
    assert m.events and app.query_one(EventsPanel).size.height > 0, "events panel empty"
    log = app.query_one("#log-panel", LogTail)
    assert log.lines or not log.display, "log panel empty"  # the panel is hidden below 120 columns


async def first_frame(rec: dict[str, Any], size: tuple[int, int]) -> float:
    """Seconds from run_test() to the first whole frame."""
    client = ReplayClient({**rec, "live": []}, rate=None)
    now = rec["state"]["updated_at"]
    app = make_app(client, now=lambda: now, tz=timezone.utc)
    t0 = time.perf_counter()
    async with app.run_test(size=size) as pilot:
        while app.first_frame_at is None:
            await asyncio.sleep(0.002)
        took = app.first_frame_at - t0
        await pilot.pause()
        check_populated(app)
    return took


async def live(rec: dict[str, Any], seconds: int, size: tuple[int, int]) -> dict[str, float]:
    """Replay `seconds` of 10 Hz samples over the day of history; measure redraws and lag."""
    msgs = live_part(rec, seconds)
    # The live part starts a second after connecting: the first frame is measured above.
    client = ReplayClient({**rec, "live": msgs}, rate=len(msgs) / seconds, lead_s=1.0)
    now = rec["state"]["updated_at"]
    app = make_app(client, now=lambda: now, tz=timezone.utc)
    beats: list[float] = []
    async with app.run_test(size=size) as pilot:
        while app.first_frame_at is None:
            await asyncio.sleep(0.005)
        app.set_interval(0.01, lambda: beats.append(time.perf_counter()))
        start = len(app.refreshes)
        await client.finished.wait()
        await pilot.pause(0.6)  # the last messages reach a redraw
    redraws = app.refreshes[start:]
    times = [r[0] for r in redraws]
    applied = [r[1] for r in redraws]
    # Message i is on screen at the first redraw that had applied more than i live messages.
    lags = []
    for i, sent in enumerate(client.sent_at):
        k = bisect.bisect_right(applied, i)
        if k < len(times):
            lags.append(times[k] - sent)
    window = [t for t in times if t <= client.sent_at[-1]]
    gaps = [b - a for a, b in zip(window, window[1:], strict=False)]
    beat_gaps = [b - a for a, b in zip(beats, beats[1:], strict=False)]
    lags.sort()
    return {
        "messages": len(msgs),
        "redraws": len(redraws),
        "worst_gap_s": max(gaps) if gaps else float("nan"),
        "lag_p50_s": statistics.median(lags),
        "lag_p99_s": lags[int(0.99 * (len(lags) - 1))],
        "lag_max_s": lags[-1],
        "redraw_max_s": max(r[2] for r in redraws),
        "redraw_mean_s": statistics.fmean(r[2] for r in redraws),
        "stall_max_s": max(beat_gaps) if beat_gaps else float("nan"),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="160x48", help="terminal size WxH")
    ap.add_argument("--live-s", type=int, default=10, help="seconds of 10 Hz live replay (0: skip)")
    ap.add_argument(
        "--repeat", type=int, default=3, help="first-frame runs; the best and worst are printed"
    )
    args = ap.parse_args()
    w, h = (int(x) for x in args.size.split("x"))

    t = time.perf_counter()
    rec = day_of_history()
    print(
        f"recording: {len(rec['samples']):,} samples, {len(rec['steps']):,} steps "
        f"(built in {time.perf_counter() - t:.1f} s, not counted)"
    )
    runs = [asyncio.run(first_frame(rec, (w, h))) for _ in range(args.repeat)]
    print(
        f"first full frame at {w}x{h}: best {min(runs) * 1000:.0f} ms, worst {max(runs) * 1000:.0f} ms "
        f"over {len(runs)} runs (target < 1000 ms)"
    )
    if args.live_s:
        r = asyncio.run(live(rec, args.live_s, (w, h)))
        print(
            f"10 Hz live replay, {args.live_s} s, {r['messages']} messages, {r['redraws']} redraws:"
        )
        print(f"  worst gap between redraws {r['worst_gap_s'] * 1000:.0f} ms (timer: 250 ms)")
        print(
            f"  message to redraw lag p50 {r['lag_p50_s'] * 1000:.0f} ms, p99 {r['lag_p99_s'] * 1000:.0f} ms, "
            f"max {r['lag_max_s'] * 1000:.0f} ms"
        )
        print(
            f"  redraw work max {r['redraw_max_s'] * 1000:.1f} ms, mean {r['redraw_mean_s'] * 1000:.1f} ms; "
            f"longest event-loop stall {r['stall_max_s'] * 1000:.0f} ms"
        )
    return 0 if max(runs) < 1.0 else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Issue #14's dashboard parts, against recorded runs: the download in the header, GPUs that are
not the run's, and the reconnect after a dropped link (docs/reliability.md, rows R2, R3, R9)."""

from __future__ import annotations

import asyncio
import copy
import time
from datetime import timezone

from supervisor.tui.app import make_app
from supervisor.tui.replay import ReplayClient
from tests.support.tui import ready, recorded, run_async, screen_text


def _app(rec: dict, **kw: object):
    rec = copy.deepcopy(rec)
    rec.setdefault("live", [])
    return make_app(ReplayClient(rec, rate=None), now=lambda: rec["state"]["updated_at"],
                    tz=timezone.utc, **kw)


@run_async
async def test_r3_header_shows_the_download_while_loading() -> None:
    rec = recorded("training")
    rec["live"] = []
    rec["state"].update(state="loading", phase="loading_model", step=None, download={
        "active": True, "bytes": 3 * 2**30, "total": 16 * 2**30, "rate_bps": 45 * 2**20,
        "eta_s": 296, "progress_t": rec["state"]["updated_at"]})
    app = _app(rec)
    async with app.run_test(size=(160, 48)) as pilot:
        await ready(pilot)
        text = screen_text(app)
    assert "downloading the model: 3.0 GB of 16.0 GB at 45.0 MB/s, ETA 4m56s" in text, text


@run_async
async def test_r2_a_gpu_outside_cuda_visible_devices_is_marked() -> None:
    rec = recorded("training")
    rec["live"] = []
    last = rec["samples"][-1]
    g0 = dict(last["gpus"][0], index=0, this_run=False, others_mem_mib=20_000.0)
    g1 = dict(last["gpus"][0], index=1, this_run=True, others_mem_mib=2048.0)
    last["gpus"] = [g0, g1]
    app = _app(rec)
    async with app.run_test(size=(160, 48)) as pilot:
        await ready(pilot)
        await pilot.pause()
        text = screen_text(app)
    assert "GPU 0" in text and "not this run's" in text, text
    assert "others hold 2.0 GiB" in text, text


def test_r9_dashboard_reconnects_with_back_off() -> None:
    """The stream breaks, the first reconnect fails (the link is still down), the second works;
    the header said RECONNECTING meanwhile (not the last frame's TRAINING), then the state."""
    rec = recorded("training")
    rec["live"] = rec.get("live", [])[:3]

    class Dropping(ReplayClient):
        async def messages(self):  # type: ignore[override]
            for m in self.recorded.get("live") or []:
                await asyncio.sleep(0.05)
                yield m
            await asyncio.sleep(0.3)
            raise ConnectionResetError("ssh link dropped")

    tries: list[float] = []

    async def reconnect() -> ReplayClient:
        tries.append(time.monotonic())
        if len(tries) == 1:
            raise ConnectionRefusedError("forward not up yet")
        return ReplayClient({**rec, "live": []})

    async def main() -> tuple[list[bool], str | None]:
        app = make_app(Dropping(rec, rate=None), now=lambda: rec["state"]["updated_at"],
                       tz=timezone.utc, reconnect=reconnect)
        said: list[bool] = []
        async with app.run_test(size=(160, 48)) as pilot:
            for _ in range(120):
                await pilot.pause(0.05)
                said.append("RECONNECTING" in screen_text(app))
                if len(tries) >= 2 and app.model.reconnecting is None:
                    break
            await pilot.pause(0.3)
            after = screen_text(app)
            await pilot.press("d")
        assert "RECONNECTING" not in after and "TRAINING" in after
        return said, app.model.reconnecting

    said, still = asyncio.run(main())
    assert any(said) and still is None and len(tries) == 2
    assert tries[1] - tries[0] >= 0.9  # back-off: 0.5 s, then 1 s

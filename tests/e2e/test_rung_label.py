"""One rung numbering: a real run through the first ladder change reads "rung 1" everywhere.

The tiny recipe on the real trainer, with debug.raise_oom_above_seq_len making attempt 1 (max_seq_len
1024) raise a real torch.OutOfMemoryError; the supervisor relaunches it at the first ladder change
(768). Preflight, `status` (JSON and text), the events, the dashboard header and the report must all
call that change "rung 1".
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
from html import escape
from pathlib import Path

import pytest

from supervisor import ladder
from supervisor.preflight.check import estimate
from supervisor.preflight.memory import CALIBRATION
from supervisor.recipe import load_recipe
from tests.support import ROOT, qlw, read_state

pytestmark = pytest.mark.slow

CHANGE = "max_seq_len 1024 -> 768"


def _preflight_says() -> str:
    """Preflight on a card between what the recipe needs as written and at its first change."""
    r = load_recipe(ROOT / "recipes/tiny.toml")
    cal = dataclasses.replace(CALIBRATION, estimate_error=0.0)  # no tight band: the tiny model's rungs differ by 2 %
    room = {"host_ram_gib": 256.0, "disk_free_gib": 1000.0, "cal": cal}
    base = estimate(r, gpu_mem_gib=80, **room).vram.need
    first = estimate(ladder.effective(r, 1), gpu_mem_gib=80, **room).vram.need
    rep = estimate(r, gpu_mem_gib=(base + first) / 2 / 2**30, **room)
    assert not rep.fits and rep.first_fitting_rung == 1
    return rep.first_fitting_rung_desc or ""


def _header_text(run_dir: Path) -> str:
    """The dashboard's header line 2 for the finished run (the store-backed client, as `attach` uses)."""
    from rich.console import Console

    from supervisor.control.client import StoreClient
    from supervisor.tui.app import make_app
    from supervisor.tui.header import RunHeader

    async def go() -> str:
        app = make_app(StoreClient(run_dir))
        async with app.run_test(size=(120, 40)) as pilot:
            for _ in range(400):
                if app.first_frame_at is not None:
                    break
                await asyncio.sleep(0.01)
            await pilot.pause()
            console = Console(width=120, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
            console.print(app.query_one(RunHeader).render())
            return console.export_text()

    return asyncio.run(go())


@pytest.mark.timeout(600)
def test_the_first_ladder_change_is_rung_1_everywhere(qlw_home: Path, tmp_path: Path) -> None:
    assert _preflight_says() == f"rung 1 ({CHANGE})"

    out = tmp_path / "out"
    res = qlw("start", "recipes/tiny.toml", "--detach", "--set", f'train.output_dir="{out}"',
              "--set", "train.max_steps=8", "--set", "train.save_steps=2",
              "--set", "debug.raise_oom_above_seq_len=800", check=True)
    run_id = res.stdout.strip().splitlines()[-1]
    assert qlw("wait", run_id, "--timeout", "500", timeout=540).returncode == 0, qlw("logs", run_id).stdout
    run_dir = qlw_home / "runs" / run_id

    st = read_state(qlw_home, run_id)
    assert st["state"] == "completed" and st["attempt"] == 2 and st["rung"] == 1
    assert st["rung_desc"] == f"{CHANGE} after OOM"

    status = json.loads(qlw("status", run_id, "--json", check=True).stdout)
    assert status["rung"] == 1 and status["rung_label"] == "rung 1"
    text = qlw("status", run_id, check=True).stdout
    assert re.search(r"^attempt\s+2\s+ladder rung 1\b", text, re.M), text

    from supervisor.store import RunStore

    store = RunStore(run_dir)
    events = store.events()
    store.close()
    relaunch = [e for e in events if e.kind == "relaunch"]
    assert len(relaunch) == 1 and f"relaunching at rung 1 ({CHANGE})" in relaunch[0].message
    assert [e.evidence["rung_label"] for e in events if e.kind == "launch"] == ["base", "rung 1"]

    header = _header_text(run_dir)
    assert f"attempt 2  rung 1: {CHANGE} after OOM" in header, header

    from supervisor.report.html import generate_report

    html = generate_report(run_dir, tmp_path / "report").read_text()
    assert "<th>ladder</th>" in html and "<td>rung 1</td>" in html
    assert escape(f"relaunching at rung 1 ({CHANGE})") in html
    # and no "rung 0" anywhere a user reads
    for where in (json.dumps(status), text, header, html, *(e.message for e in events)):
        assert "rung 0" not in where

"""Export the dashboard's main states as SVG for the docs.

python -m tests.fakes.tui_screenshots docs/screenshots      # 120x36, one file per state
"""

from __future__ import annotations

import asyncio
import sys
from datetime import timezone
from pathlib import Path

from supervisor.tui.app import make_app
from supervisor.tui.replay import ReplayClient
from tests.fakes.tui_scenarios import SCENARIOS, build, plan_for

SIZE = (120, 36)


async def screenshot(scenario: str, size: tuple[int, int] = SIZE) -> str:
    """The SVG of `scenario`'s recorded snapshot, clock frozen at its last update, in UTC."""
    rec = {**build(plan_for(scenario)), "live": []}
    now = rec["state"]["updated_at"]
    app = make_app(ReplayClient(rec, rate=None), now=lambda: now, tz=timezone.utc)
    async with app.run_test(size=size) as pilot:
        while app.first_frame_at is None:
            await asyncio.sleep(0.01)
        await pilot.pause()
        return app.export_screenshot(title=f"qlora-watch: {scenario.replace('_', ' ')}")


def save_all(folder: str | Path) -> list[Path]:
    """Write <scenario>.svg for every scenario into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name in SCENARIOS:
        path = folder / f"{name}.svg"
        path.write_text(asyncio.run(screenshot(name)))
        out.append(path)
    return out


if __name__ == "__main__":
    for p in save_all(sys.argv[1] if len(sys.argv) > 1 else "docs/screenshots"):
        print(p)

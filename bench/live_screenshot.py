"""Attach the real dashboard to a live run over its socket, headless, and save an SVG of it.

    python bench/live_screenshot.py RUN_ID OUT.svg [--seconds 6] [--size 160x48]

QLORA_WATCH_HOME selects the runs folder, as for `qlora-watch attach`. Used by
bench/gpu_suite.py to show what the dashboard draws on a GPU machine (both cards of an FSDP
run); it is the same client and app that `qlora-watch attach` runs, only without a terminal.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


async def shoot(run_id: str, seconds: float, size: tuple[int, int]) -> str:
    from supervisor import paths
    from supervisor.control.client import AsyncRunClient
    from supervisor.tui.app import make_app

    sock = Path(paths.socket_path(run_id))
    for _ in range(300):
        if sock.exists():
            break
        await asyncio.sleep(0.1)
    app = make_app(AsyncRunClient(sock), run_id=run_id)
    async with app.run_test(size=size) as pilot:
        for _ in range(int(seconds * 20)):
            await asyncio.sleep(0.05)
        await pilot.pause()
        return app.export_screenshot(title=f"qlora-watch attach {run_id}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_id")
    ap.add_argument("out", type=Path)
    ap.add_argument("--seconds", type=float, default=6.0, help="watch this long before the shot")
    ap.add_argument("--size", default="160x48")
    a = ap.parse_args()
    w, h = (int(x) for x in a.size.split("x"))
    svg = asyncio.run(shoot(a.run_id, a.seconds, (w, h)))
    a.out.write_text(svg)
    print(a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

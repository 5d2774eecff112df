"""Attach to a run with 24 hours of history, end to end: store -> socket -> client -> first frame.

    python bench/attach_24h.py [--repeat 3]

Builds a real run store (SQLite) with 86,400 samples (1 Hz for 24 h) and 20,000 steps, serves
it from a real supervisor object through the real ControlServer in a separate process, then
times, in this process: AsyncRunClient.connect() (snapshot read from SQLite, thinned, framed,
sent, decoded) and the dashboard's first full frame on that snapshot. Target: under 1 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SERVER = """
import asyncio, sys
from pathlib import Path
from supervisor.daemon.core import Supervisor
from supervisor.store import RunStore

async def main():
    sup = Supervisor(RunStore(Path(sys.argv[1])), socket_path=Path(sys.argv[2]))
    await sup._start_server()
    print("ready", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def build_store(root: Path) -> Path:
    from supervisor.recipe import load_recipe, recipe_to_json
    from supervisor.records import GpuSample, HostSample, Sample, Step
    from supervisor.store import create_run

    store = create_run(root / "runs", {"recipe": "8b", "model": "meta-llama/Llama-3.1-8B-Instruct",
                                       "output_dir": str(root / "out")})
    (store.path / "recipe.json").write_text(recipe_to_json(load_recipe(ROOT / "recipes/8b.toml")))
    t0 = time.time() - 86_400
    g = dict(index=0, name="NVIDIA H200", util_pct=97.0, mem_used_mib=61_000.0, mem_total_mib=143_771.0,
             temp_c=64.0, margin_c=23.0, power_w=610.0, power_limit_w=700.0, sm_clock_mhz=1980.0,
             sm_clock_max_mhz=1980.0, throttle_mask=0)
    store.add_samples([Sample(t=t0 + i, gpus=[GpuSample(**g)],
                              host=HostSample(mem_available_mib=90_000.0, trainer_rss_mib=12_000.0))
                       for i in range(86_400)])
    store.add_steps([Step(t=t0 + i * 4.32, step=i, loss=2.0 / (1 + i / 5000), grad_norm=0.3, lr=2e-4,
                          tokens=i * 65_536, tokens_per_s=15_170.0, max_steps=40_000)
                     for i in range(1, 20_001)], lineage=1)
    store.write_state({"state": "training", "run_id": store.run_id, "step": 20_000, "max_steps": 40_000,
                       "attempt": 1, "output_dir": str(root / "out")})
    store.close()
    return store.path


async def attach_once(sock: Path) -> tuple[float, float, int, int]:
    from supervisor.control.client import AsyncRunClient
    from supervisor.tui.app import make_app
    from supervisor.tui.replay import ReplayClient

    t = time.perf_counter()
    c = AsyncRunClient(sock)
    snap = await c.connect()
    t_snap = time.perf_counter() - t
    await c.close()
    app = make_app(ReplayClient({**snap, "live": []}, rate=None))
    t1 = time.perf_counter()
    async with app.run_test(size=(160, 48)) as pilot:
        await pilot.pause()
        t_frame = time.perf_counter() - t1
    return t_snap, t_frame, len(snap["samples"]), len(snap["steps"])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["QLORA_WATCH_HOME"] = str(root)
        t = time.perf_counter()
        run = build_store(root)
        print(f"built a 24 h store in {time.perf_counter() - t:.1f} s")
        sock = root / "s.sock"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        srv = subprocess.Popen([sys.executable, "-c", SERVER, str(run), str(sock)], env=env,
                               stdout=subprocess.PIPE, text=True)
        try:
            assert srv.stdout.readline().strip() == "ready"
            rows = [asyncio.run(attach_once(sock)) for _ in range(args.repeat)]
        finally:
            srv.terminate()
            srv.wait()
    for snap_s, frame_s, ns, nst in rows:
        print(f"snapshot {snap_s * 1000:6.0f} ms ({ns} samples, {nst} steps) + first frame "
              f"{frame_s * 1000:6.0f} ms = {(snap_s + frame_s) * 1000:6.0f} ms")
    worst = max(a + b for a, b, *_ in rows)
    print(json.dumps({"worst_attach_to_first_frame_ms": round(worst * 1000)}))
    return 0 if worst < 1.0 else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""The whole supervisor process's CPU while it supervises a run (sampling at 1 Hz).

    python bench/supervisor_cpu.py [--seconds 60] [--clients 1]

Starts a real supervised run of the scripted fake trainer (a step every 0.1 s, a checkpoint
every 50 steps), attaches --clients dashboard-like socket clients, and reads the supervisor
process's CPU time (user + system, psutil) over --seconds of steady state. This includes
everything the supervisor does: 5 Hz ticks, following the trainer's events and log, telemetry
sampling (NVML where present, host always), guards once a second, SQLite writes, broadcasts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    from tests.support import fake_recipe

    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--clients", type=int, default=1)
    ap.add_argument("--step-time", type=float, default=0.1, help="seconds per trainer step")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        env = {**os.environ, "QLORA_WATCH_HOME": str(tmp_path / "home"), "PYTHONPATH": str(ROOT)}
        recipe = fake_recipe(tmp_path, ["--steps", "1000000", "--step-time", str(args.step_time),
                                         "--save-every", "50"])
        # fake_recipe samples at 5 Hz for tests: the bench measures the 1 Hz default
        text = recipe.read_text().replace("sample_interval_s = 0.2\n", "sample_interval_s = 1.0\n", 1)
        recipe.write_text(text)
        qlw = [sys.executable, "-m", "supervisor"]
        run_id = subprocess.run(qlw + ["start", str(recipe), "--detach"], env=env, cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout.split()[-1]
        lock = tmp_path / "home" / "runs" / run_id / "supervisor.lock"
        time.sleep(5)  # steady state
        sup = psutil.Process(int(lock.read_text()))
        clients = [subprocess.Popen([sys.executable, str(ROOT / "bench" / "attach_client.py"),
                                     str(tmp_path / "home"), run_id], env=env, cwd=ROOT,
                                    stdout=subprocess.DEVNULL) for _ in range(args.clients)]
        time.sleep(2)
        c0, t0 = sup.cpu_times(), time.monotonic()
        time.sleep(args.seconds)
        c1, t1 = sup.cpu_times(), time.monotonic()
        cpu = (c1.user - c0.user) + (c1.system - c0.system)
        rss = sup.memory_info().rss / 2**20
        subprocess.run(qlw + ["stop", run_id, "--now"], env=env, cwd=ROOT, capture_output=True)
        subprocess.run(qlw + ["wait", run_id, "--timeout", "30"], env=env, cwd=ROOT, capture_output=True)
        for c in clients:
            c.terminate()
            c.wait()
    pct = 100 * cpu / (t1 - t0)
    print(f"supervisor CPU: {cpu:.2f} s over {t1 - t0:.0f} s = {pct:.2f} % of one core "
          f"(RSS {rss:.0f} MiB, {args.clients} client(s), {1 / args.step_time:g} steps/s, 1 Hz sampling)")
    print(json.dumps({"supervisor_cpu_pct": round(pct, 2), "rss_mib": round(rss)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

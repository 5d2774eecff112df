"""Where a relaunched attempt spends its seconds (issue 20): the trainer run as a fresh process,
twice, on the Llama 3.1 8B shape at full depth at rung 1's shape (batch 16 x seq 768, r 64),
the second under cProfile with the weight cache warm. The trainer's own `timing` events give the
phases; the profile (OUT/attempt2.prof, read with `python -m pstats`) says what is inside
trainer_init and the first step.

    python bench/relaunch_profile.py --out $OUT          # on the H200, ~3 minutes
    python bench/relaunch_profile.py --out /tmp/rp --plan tiny   # CPU rehearsal
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.gpu_models import build, write_text_data  # noqa: E402
from bench.gpu_suite import bench_env, read_events, recipe_text  # noqa: E402
from bench.relaunch import drop_pages  # noqa: E402

WORK = Path(os.environ.get("QLW_BENCH_WORK", "/tmp/qlw-relaunch"))


def read_all(path: Path) -> int:
    n = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(64 << 20):
            n += len(chunk)
    return n


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--plan", choices=["full", "tiny"], default="full")
    ap.add_argument("--runs", type=int, default=2, help="trainer processes (the last is profiled)")
    ap.add_argument("--set", action="append", default=[], help="recipe override for every run")
    ap.add_argument("--model", default="llama-3.1-8b", help="a bench/gpu_models.py shape")
    ap.add_argument("--depth", type=int, default=None, help="layers (default: the shape's full depth)")
    ap.add_argument("--no-profile", action="store_true", help="time only, no cProfile")
    ap.add_argument("--pieces", action="store_true", help="also time reading the bf16 files alone (disk, page cache)")
    ap.add_argument("--resume", action="store_true",
                    help="then one more process resuming from the last run's checkpoint-3 (adapter + optimizer restore)")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    WORK.mkdir(parents=True, exist_ok=True)
    tiny = a.plan == "tiny"
    t = time.monotonic()
    if tiny:
        from supervisor.preflight.shapes import ModelShape

        shape = ModelShape(name="tiny", hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128,
                           vocab=4096, tied_embeddings=False)
        mdir = build("tiny", 2, WORK / "tiny-llama", shape=shape)
        data = write_text_data(WORK / "prof.jsonl", 0, [300] * 32)
        seq, batch = 128, 4
    else:
        mdir = build(a.model, a.depth, WORK / f"{a.model}-{a.depth or 32}L")
        data = write_text_data(WORK / "ladder.jsonl", 0, [4200] * 64)
        seq, batch = 768, 16
    results: dict[str, Any] = {"build_s": round(time.monotonic() - t, 1), "runs": [], "model": a.model,
                               "depth": a.depth, "command": " ".join(sys.argv)}
    rdir = WORK / f"prof-{a.model}-{a.depth or 'full'}"
    rdir.mkdir(parents=True, exist_ok=True)
    text = recipe_text(mdir, data, rdir / "out", seq=seq, batch=batch, r=64, steps=3, save_steps=3)
    text = text.replace("[model]\n", '[model]\nweight_cache = "run"\n', 1)
    if tiny:
        text = text.replace("[train]\n", "[train]\nuse_cpu = true\nbf16 = true\n", 1)
    recipe = rdir / "recipe.toml"
    recipe.write_text(text)
    env = bench_env()
    env["QLW_QCACHE_DIR"] = str(rdir / "qcache")
    env["QLW_DCACHE_DIR"] = str(rdir / "dcache")
    name = f"profile-{a.model}-{a.depth or 'full'}.json"

    def save() -> None:
        (out / name).write_text(json.dumps(results, indent=1, default=str))

    if a.pieces:  # the bf16 files' read alone: from disk (pages dropped), then from the page cache
        results["read"] = {}
        for label in ("disk", "page_cache"):
            if label == "disk":
                drop_pages(mdir)
            t = time.perf_counter()
            nbytes = sum(read_all(f) for f in sorted(mdir.glob("*.safetensors")))
            results["read"][label] = {"s": round(time.perf_counter() - t, 3), "bytes": nbytes}
        save()
        print(json.dumps(results["read"]), flush=True)

    def trainer(n: int, extra: list[str], profile: bool) -> dict[str, Any]:
        events = rdir / f"events{n}.jsonl"
        events.unlink(missing_ok=True)
        prof = [sys.executable, "-m", "cProfile", "-o", str(out / f"attempt{n}.prof")] if profile else [sys.executable]
        cmd = [*prof, "-m", "supervisor.runner.train", "--recipe", str(recipe), "--events", str(events),
               "--output-dir", str(rdir / f"out{n}")] + [f"--set={s}" for s in a.set] + extra
        t = time.monotonic()
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        wall = time.monotonic() - t
        evs = read_events(events)
        row = {"n": n, "rc": p.returncode, "wall_s": round(wall, 2), "profiled": profile, "extra": extra,
               "timing": [{k: e.get(k) for k in e if k not in ("event",)} for e in evs if e.get("event") == "timing"],
               "steps": [{"step": e.get("step"), "t": e.get("t"), "loss": e.get("loss"),
                          "step_time_s": e.get("step_time_s")} for e in evs if e.get("event") == "step"],
               "phases": [(e.get("t"), e.get("phase")) for e in evs if e.get("event") == "phase"],
               "stderr_tail": p.stderr[-3000:] if p.returncode else p.stderr[-600:]}
        results["runs"].append(row)
        save()
        print(json.dumps({k: row[k] for k in ("n", "rc", "wall_s", "timing", "steps")}, default=str), flush=True)
        return row

    for n in range(1, a.runs + 1):
        trainer(n, [], n == a.runs and not a.no_profile)
    if a.resume:  # a relaunch that restores the adapter and the optimizer state (the last run's checkpoint)
        ck = rdir / f"out{a.runs}" / "checkpoint-3"
        if (ck / "trainer_state.json").is_file():
            trainer(a.runs + 1, ["--resume", str(ck), "--set=train.max_steps=5"], False)
        else:
            results["resume_error"] = f"no {ck}"
            save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

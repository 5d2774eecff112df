"""Fast relaunch (issue 20): OOM -> first step of the next attempt, cold vs cache + warm standby.

    python bench/relaunch.py --out $OUT --budget-s 470                # on the H200
    python bench/relaunch.py --out /tmp/rl --plan tiny                # CPU rehearsal (minutes)

Part 1, "ladder": the OOM ladder under `qlora-watch start` on the Llama 3.1 8B shape at full
depth (random weights, bench/gpu_models.py), on a faithful 24 GB card (another process holds all
but 24,564 MiB of the H200 for the whole part; `--card emulate` uses hardware.emulate_vram_gib =
24 instead, whose ballast every attempt starts), batch 16 x seq 4096, r 64:
attempt 1 hits a real CUDA OOM at its first step, the supervisor relaunches at rung 1 (seq 768)
and attempt 2 trains 2 steps. Twice: "cold" (model.weight_cache = "off", supervisor.warm_standby =
false, data.cache = false) and "fast" (all three on). Every phase comes from the trainer's `timing` events and the
supervisor's own records: OOM (exit file) -> launch -> imports -> weight load -> trainer built ->
first step.

Part 2, "load70": the Llama 3.1 70B shape at two reduced depths, in this process: the base model
loaded and quantised from the bf16 files, saved to the cache, and loaded from the cache, each
from disk (pages dropped with posix_fadvise DONTNEED after fsync: no root needed) and the cache
also from the page cache; the per-layer slope extrapolates to 80 layers as the estimator tables do.

Results: OUT/relaunch.json (written as phases finish); the table is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.gpu_models import build, write_text_data  # noqa: E402
from bench.gpu_suite import bench_env, qlw_start, qlw_wait, read_events, recipe_text  # noqa: E402

WORK = Path(os.environ.get("QLW_BENCH_WORK", "/tmp/qlw-relaunch"))
T0 = time.monotonic()
RESULTS: dict[str, Any] = {"ladder": {}, "load70": {}}


def log(*a: Any) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s]", *a, flush=True)


def left(budget: float) -> float:
    return budget - (time.monotonic() - T0)


def save(out: Path) -> None:
    (out / "relaunch.json").write_text(json.dumps(RESULTS, indent=1, default=str))


def drop_pages(folder: Path) -> None:
    """Evict the folder's files from the page cache (clean pages only: fsync first)."""
    for p in folder.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


# ------------------------------------------------------------------------------ part 1: ladder


def timings(events: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for e in events:
        if e.get("event") == "timing":
            key = e["phase"] + ("_cache" if e.get("source") == "cache" else "")
            out[key] = e["s"]
            out[f"{e['phase']}_t"] = e["t"]
            out[f"{e['phase']}_ev"] = {k: v for k, v in e.items() if k not in ("event", "t", "phase")}
    steps = [e for e in events if e.get("event") == "step"]
    if steps:
        out["first_step_end_t"] = steps[0]["t"]
        out["first_loss"] = steps[0].get("loss")
    return out


HOLDER = r"""
import json, os, sys, time
import torch
keep = int(sys.argv[1]) << 20
parent = os.getppid()
torch.cuda.init()
held = []
for chunk in (1 << 30, 64 << 20, 2 << 20):
    while torch.cuda.mem_get_info()[0] - keep >= chunk:
        held.append(torch.empty(chunk, dtype=torch.uint8, device="cuda"))
torch.cuda.synchronize()
free, total = torch.cuda.mem_get_info()
print(json.dumps({"free_mib": free / 2**20, "total_mib": total / 2**20,
                  "held_gib": sum(t.numel() for t in held) / 2**30}), flush=True)
while os.getppid() == parent:
    time.sleep(0.5)
"""


def hold_card(mib: int) -> tuple[Any, dict[str, Any]]:
    """Another process holding all but `mib` MiB of the GPU's free memory, for the whole ladder:
    the trainer then sees what a card of that size offers, its own CUDA context included (the
    brief's faithful 24 GB card). Unlike hardware.emulate_vram_gib (a ballast started by every
    attempt, 3.7 s each) it costs the attempts nothing, as on a real card."""
    import subprocess

    env = {**os.environ, "PYTORCH_CUDA_ALLOC_CONF": ""}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(mib)], stdout=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline() if proc.stdout else ""
    try:
        return proc, json.loads(line)
    except ValueError:
        proc.kill()
        raise RuntimeError(f"card holder failed: {line!r}") from None


def ladder_run(name: str, fast: bool, mdir: Path, data: Path, budget: float, out: Path,
               tiny: bool, emulate: bool = False) -> None:
    home = WORK / f"home-{name}"
    rdir = WORK / f"ladder-{name}"
    rdir.mkdir(parents=True, exist_ok=True)
    seq, batch = (256, 4) if tiny else (4096, 16)
    extra = f"""
        [supervisor]
        sample_interval_s = 1.0
        warm_standby = {'true' if fast else 'false'}
        """
    if not tiny and emulate:
        extra += """
        [hardware]
        emulate_vram_gib = 24
        """
    else:  # the CPU cannot OOM on cue: the debug knob raises the same error at step 1
        extra += f"""
        [debug]
        raise_oom_above_seq_len = {seq // 2}
        """
    text = recipe_text(mdir, data, rdir / "out", seq=seq, batch=batch, accum=1, r=64, steps=2,
                       save_steps=1000, extra=extra)
    text = text.replace('oom_ladder = [{ "train.max_seq_len" = 768 }',
                        f'oom_ladder = [{{ "train.max_seq_len" = {seq // 2 if tiny else 768} }}')
    text = text.replace("[model]\n", f"[model]\nweight_cache = \"{'run' if fast else 'off'}\"\n", 1)
    text = text.replace("[data]\n", f"[data]\ncache = {'true' if fast else 'false'}\n", 1)
    if tiny:
        text = text.replace("[train]\n", "[train]\nuse_cpu = true\nbf16 = true\n", 1)
    recipe = rdir / "recipe.toml"
    recipe.write_text(text)
    env = bench_env(home)
    t_start = time.time()
    run_id, err = qlw_start(recipe, env)
    log(name, "run", run_id, err[-300:])
    if not run_id:
        RESULTS["ladder"][name] = {"error": err[-2000:]}
        return
    qlw_wait(run_id, env, max(30, left(budget) - 30), timeout=max(60, left(budget)))
    run = home / "runs" / run_id
    db = sqlite3.connect(run / "db.sqlite")
    evs = [dict(zip(("t", "kind", "message", "evidence"), r, strict=False)) for r in
           db.execute("SELECT t, kind, message, evidence FROM events ORDER BY id")]
    state = json.loads((run / "state.json").read_text())
    row: dict[str, Any] = {"run_id": run_id, "state": state.get("state"), "attempts": state.get("attempt"),
                           "started_at": t_start,
                           "records": [(round(e["t"] - t_start, 2), e["kind"], e["message"][:200]) for e in evs]}
    for n in (1, 2):
        adir = run / "attempts" / str(n)
        row[f"attempt{n}"] = timings(read_events(adir / "events.jsonl"))
        ex = adir / "exit.json"
        if ex.exists():
            info = json.loads(ex.read_text())
            row[f"attempt{n}"]["exit_t"] = info.get("ended_at")
            row[f"attempt{n}"]["tail"] = (info.get("tail") or [])[-2:]
    launches = [e for e in evs if e["kind"] == "launch"]
    row["standby_ready"] = {p.parent.name: json.loads(p.read_text()) for p in run.glob("standby/*/ready.json")}
    log_path = run / "trainer.log"
    row["trainer_log_tail"] = log_path.read_text(errors="replace").splitlines()[-15:] if log_path.exists() else []
    try:
        a1, a2 = row["attempt1"], row["attempt2"]
        oom_t = a1["exit_t"]
        l2 = launches[1]["t"]
        row["relaunch"] = {
            "oom_to_launch_s": round(l2 - oom_t, 3),
            "launch_to_imports_done_s": round(a2["imports_t"] - l2, 3),
            "imports_s": a2.get("imports"),
            "emulate_card_s": a2.get("emulate_card"),
            "model_load_s": a2.get("model_load_cache", a2.get("model_load")),
            "from_cache": "model_load_cache" in a2,
            "cache_verify_s": a2.get("cache_verify"),
            "trainer_init_s": a2.get("trainer_init"),
            "lora_s": a2.get("lora"),
            "dataset_s": (a2.get("trainer_init_ev") or {}).get("dataset_s"),
            "dataset_from_cache": "dataset_cache_load" in a2,
            "cache_hashed": (a2.get("cache_verify_ev") or {}).get("hashed"),
            "first_step_s": a2.get("first_step"),
            "first_step_parts": {k: v for k, v in (a2.get("first_step_ev") or {}).items() if k.endswith("_s")},
            "oom_to_training_s": round(a2["first_step_t"] - (a2.get("first_step") or 0.0) - oom_t, 3),
            "oom_to_first_step_s": round(a2["first_step_end_t"] - oom_t, 3),
            "oom_to_first_step_without_rehearsal_s": round(
                a2["first_step_end_t"] - oom_t - (a2.get("emulate_card") or 0.0), 3),
            "warm_standby": "warm standby" in launches[1]["message"],
            "attempt1_cache_save_s": a1.get("cache_save"),
            "attempt1_model_load_s": a1.get("model_load"),
            "attempt1_imports_s": a1.get("imports"),
            "attempt1_emulate_card_s": a1.get("emulate_card"),
            "attempt1_trainer_init_s": a1.get("trainer_init"),
            "attempt1_first_step_s": a1.get("first_step"),
            "attempt1_launch_to_first_step_s": round(a1["first_step_end_t"] - launches[0]["t"], 3)
            if "first_step_end_t" in a1 else None,
        }
    except (KeyError, IndexError) as e:
        row["relaunch"] = {"error": repr(e)}
    RESULTS["ladder"][name] = row
    save(out)
    log(name, row.get("state"), row["relaunch"])


def part_ladder(a: argparse.Namespace, out: Path) -> None:
    tiny = a.plan == "tiny"
    if tiny:
        from supervisor.preflight.shapes import ModelShape

        shape = ModelShape(name="tiny", hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=4096,
                           tied_embeddings=False)
        mdir = build("tiny", 2, WORK / "tiny-llama", shape=shape)
        data = write_text_data(WORK / "ladder.jsonl", 0, [300] * 32)
    else:
        t = time.monotonic()
        mdir = build("llama-3.1-8b", None, WORK / "llama-3.1-8b-32L")
        RESULTS["build_8b_s"] = round(time.monotonic() - t, 1)
        log("8B built", RESULTS["build_8b_s"])
        data = write_text_data(WORK / "ladder.jsonl", 0, [4200] * 64)
    holder = None
    if not tiny and a.card == "held":
        holder, info = hold_card(24564)
        RESULTS["card"] = {"how": "another process holds all but 24,564 MiB for the whole part", **info}
        log("card held", info)
    try:
        for name in a.runs.split(","):
            fast = name.startswith("fast")
            if left(a.budget_s) < (20 if tiny else 150):
                log("ladder: no budget left for", name)
                break
            ladder_run(name, fast, mdir, data, a.budget_s, out, tiny, emulate=a.card == "emulate")
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
    if a.cleanup and not tiny:  # disk for part 2
        import shutil

        shutil.rmtree(mdir, ignore_errors=True)
        for name in a.runs.split(","):
            for qc in (WORK / f"home-{name}" / "runs").glob("*/qcache"):
                shutil.rmtree(qc, ignore_errors=True)


# ------------------------------------------------------------------------------ part 2: 70B load


class _Writer:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def emit(self, event: str, **f: Any) -> None:
        self.events.append({"event": event, "t": time.time(), **f})

    def notice(self, message: str, **f: Any) -> None:
        self.emit("notice", message=message, **f)


def part_load70(a: argparse.Namespace, out: Path) -> None:
    import shutil

    import torch

    from supervisor.recipe import validate
    from supervisor.runner.backends import Backend
    from supervisor.runner.qcache import load_base_cached

    tiny = a.plan == "tiny"
    depths = (1, 2) if tiny else tuple(int(x) for x in a.depths70.split(","))
    key = "llama-3.1-70b"
    for depth in depths:
        if left(a.budget_s) < (10 if tiny else 90):
            log("load70: no budget left for depth", depth)
            break
        t = time.monotonic()
        if tiny:
            from supervisor.preflight.shapes import ModelShape

            shape = ModelShape(name="tiny70", hidden=128, layers=depth, heads=4, kv_heads=2, intermediate=256,
                               vocab=4096, tied_embeddings=False)
            mdir = build("tiny", depth, WORK / f"tiny70-{depth}L", shape=shape)
        else:
            mdir = build(key, depth, WORK / f"{key}-{depth}L")
        row: dict[str, Any] = {"build_s": round(time.monotonic() - t, 1),
                               "bf16_bytes": sum(p.stat().st_size for p in mdir.glob("*.safetensors"))}
        recipe = validate({"name": "load70", "model": {"name": str(mdir)},
                           "data": {"path": str(WORK / "ladder.jsonl")},
                           "train": {"use_cpu": bool(tiny), "output_dir": str(WORK / "o70")}}, "load70")
        root = WORK / f"qc70-{depth}"
        shutil.rmtree(root, ignore_errors=True)
        device = "cpu" if tiny else "cuda"
        for label, drop_src, drop_cache in (("original_disk", True, False), ("cache_disk", False, True),
                                            ("cache_hot", False, False)):
            w = _Writer()
            if drop_src:
                drop_pages(mdir)
            if drop_cache and root.exists():
                drop_pages(root)
            t = time.perf_counter()
            model, _tok = load_base_cached(Backend("hf", "bench"), recipe, str(mdir), "sdpa", w,
                                           device, root=str(root))
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            wall = time.perf_counter() - t
            del model
            import gc

            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            row[label] = {"wall_s": round(wall, 3),
                          **{e["phase"]: e["s"] for e in w.events if e["event"] == "timing"},
                          "notices": [e["message"][:160] for e in w.events if e["event"] == "notice"]}
            log(f"70B {depth}L {label}", row[label])
        row["cache_bytes"] = sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.exists() else None
        RESULTS["load70"][str(depth)] = row
        save(out)
        if not tiny and a.cleanup:
            shutil.rmtree(mdir, ignore_errors=True)
            shutil.rmtree(root, ignore_errors=True)
    rows = RESULTS["load70"]
    if len(rows) >= 2:
        (d1, r1), (d2, r2) = sorted(((int(k), v) for k, v in rows.items()))[:2]
        ext: dict[str, Any] = {}
        for label in ("original_disk", "cache_disk", "cache_hot"):
            try:
                slope = (r2[label]["wall_s"] - r1[label]["wall_s"]) / (d2 - d1)
                ext[label] = {"per_layer_s": round(slope, 3),
                              "at_80_layers_s": round(r2[label]["wall_s"] + slope * (80 - d2), 1)}
            except (KeyError, TypeError):
                pass
        try:
            per_layer = (r2["cache_bytes"] - r1["cache_bytes"]) / (d2 - d1)
            ext["cache_gb_at_80"] = round((r2["cache_bytes"] + per_layer * (80 - d2)) / 1e9, 1)
        except (KeyError, TypeError):
            pass
        RESULTS["load70_extrapolated"] = ext
        save(out)
        log("70B extrapolated", ext)


def env_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                            "cpus": os.cpu_count()}
    for mod in ("transformers", "peft", "trl", "bitsandbytes"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001
            info[mod] = f"n/a ({e})"
    return info


def print_table() -> None:
    lad = RESULTS.get("ladder") or {}
    keys = ["oom_to_launch_s", "imports_s", "emulate_card_s", "model_load_s", "cache_verify_s", "cache_hashed",
            "trainer_init_s", "lora_s", "dataset_s", "dataset_from_cache", "first_step_s", "first_step_parts",
            "oom_to_training_s", "oom_to_first_step_s",
            "oom_to_first_step_without_rehearsal_s", "attempt1_cache_save_s"]
    print("| phase (attempt 2) | " + " | ".join(lad) + " |")
    print("|---|" + "---|" * len(lad))
    for k in keys:
        print(f"| {k} | " + " | ".join(str((v.get("relaunch") or {}).get(k)) for v in lad.values()) + " |")
    print(json.dumps(RESULTS.get("load70_extrapolated"), indent=1))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget-s", type=float, default=470.0)
    ap.add_argument("--plan", choices=["full", "tiny"], default="full")
    ap.add_argument("--parts", default="ladder,load70")
    ap.add_argument("--depths70", default="2,6")
    ap.add_argument("--runs", default="fast1,cold,fast2",
                    help="ladder runs in order: cold, or fast (any name starting with fast). The "
                    "first run on a fresh machine also fills Triton's kernel cache: the default "
                    "runs fast on a fresh machine, cold, then fast on warm caches")
    ap.add_argument("--card", choices=["held", "emulate"], default="held",
                    help="the 24 GB card: held by another process for the whole part (default), or "
                    "hardware.emulate_vram_gib = 24 (a ballast per attempt)")
    ap.add_argument("--cleanup", action="store_true", help="delete each 70B build after use (disk)")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    WORK.mkdir(parents=True, exist_ok=True)
    RESULTS["env"] = env_info()
    RESULTS["command"] = " ".join(sys.argv)
    save(out)
    for part in a.parts.split(","):
        try:
            {"ladder": part_ladder, "load70": part_load70}[part](a, out)
        except Exception as e:  # noqa: BLE001 - one part failing must not lose the other's figures
            import traceback

            RESULTS[f"{part}_error"] = traceback.format_exc()[-3000:]
            log(part, "failed:", e)
            save(out)
    print_table()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

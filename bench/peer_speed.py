"""Peer speed (issue 17): our trainer against the article's script and Unsloth's own, one call.

Variants, each a fresh process on the same model folder, data and seed:
  article         bench/article_port.py (the source article's script, ported)
  hf              the shape's recipe with model.backend = "hf" (attention as the recipe says:
                  flash_attention_2, which without flash-attn is varlen on one GPU since session 4)
  hf_sdpa         the same with model.attn_implementation = "sdpa" (padded batches; what `hf`
                  measured before session 4)
  hf_varlen       the same with model.attn_implementation = "varlen" (padding-free batches on
                  PyTorch's varlen flash kernel: supervisor/runner/varlen.py)
  auto            the shape's recipe as shipped (model.backend = "auto": Unsloth where it imports)
  unsloth         the recipe with model.backend = "unsloth"
  unsloth_script  bench/unsloth_script.py (Unsloth's documented script)
`warmup:VARIANT` runs VARIANT for --warmup-steps steps first, untimed: it pays Unsloth's compile
(its generated modules and the inductor/Triton caches on disk) so that the timed rows after it
find the same warm caches; then order the timed rows ABBA (unsloth_script, auto, auto,
unsloth_script) so that any drift over the call falls on both alike.
The shape is a random-weight build at full depth (bench/gpu_models.py) of each model of the
plan; seq, batch, accum and r come from the shape's shipped recipe (recipes/8b.toml: seq 4096,
batch 4 x accum 4, r 64; 14b.toml the same; 32b.toml seq 2048, 2 x 8, r 32) unless given;
LoRA dropout 0, paged AdamW 8-bit. tokens/s is over steps 2..N and 3..N (non-padding tokens,
from the same step-event callback in every variant); MFU is 6 x params x tokens/s over the bf16
matmul rate measured at the start; peaks are torch's max allocated / reserved (the callback)
and NVML device memory minus the baseline before the process started.

    python bench/peer_speed.py --out OUT --budget-s 540 \\
        --plan "llama-3.1-8b=warmup:unsloth_script,unsloth_script,auto,auto,unsloth_script,hf_varlen,hf;
                qwen-2.5-14b=warmup:unsloth_script,unsloth_script,auto"

(--shape S --order O is the one-shape form of --plan "S=O".) A build goes to --work where the
disk has room for its bf16 safetensors, else to /dev/shm where that has room, else the shape is
skipped with the reason; a shape's build is removed once its rows are done and another shape
follows (32B: 65 GB of bf16).
`--supervised` first runs the Unsloth backend under `python -m supervisor start` (= `qlora-watch start`) on a
2-layer build of the shape: an injected OOM (debug.raise_oom_above_seq_len) at step 4, the
ladder's rung (seq 768) resuming checkpoint-4, then `stop` (SIGTERM: checkpoint, stopped).
`--tiny` is the CPU rehearsal: a tiny model of each shape's architecture, short samples, seq 128.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.gpu_models import build, write_text_data  # noqa: E402
from bench.gpu_suite import (  # noqa: E402
    QLW,
    NvmlPeak,
    bench_env,
    qlw_start,
    qlw_wait,
    read_events,
    speed_lengths,
    step_events,
    tokens_per_s,
)
from supervisor.preflight.shapes import BUILTIN_SHAPES, ModelShape  # noqa: E402

VARIANTS = ("article", "hf", "hf_sdpa", "hf_varlen", "auto", "unsloth", "unsloth_script")
DEFAULT_ORDER = "warmup:unsloth_script,unsloth_script,auto,auto,unsloth_script,hf_varlen,hf"
RECIPES = {"llama-3.1-8b": "8b", "qwen-2.5-14b": "14b", "mistral-small-22b": "22b",
           "qwen-2.5-32b": "32b", "llama-3.1-70b": "70b"}
TINY = ModelShape("tiny Llama (CPU rehearsal)", 64, 2, 4, 2, 128, 4096)
T0 = time.monotonic()


def log(*a: Any) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s]", *a, flush=True)


def left(budget: float) -> float:
    return budget - (time.monotonic() - T0)


def matmul_tflops() -> float | None:
    """bf16 8192^3 matmul rate on this GPU (20 timed iterations), None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        a @ b
    end.record()
    torch.cuda.synchronize()
    del a, b
    torch.cuda.empty_cache()
    return 2 * 8192**3 * 20 / (start.elapsed_time(end) / 1e3) / 1e12


def unsloth_skip() -> str | None:
    """Why an Unsloth variant cannot run here, or None."""
    if importlib.util.find_spec("unsloth") is None:
        return "unsloth is not installed here"
    return None


def shape_args(a: argparse.Namespace, shape_key: str) -> argparse.Namespace:
    """seq, batch, accum, r and the recipe of one shape: the shipped recipe's, unless given."""
    from supervisor.recipe import load_recipe

    recipe = ROOT / "recipes" / f"{RECIPES.get(shape_key, '8b')}.toml"
    r = load_recipe(recipe)
    return argparse.Namespace(
        recipe=recipe, steps=a.steps,
        seq=a.seq or r.train.max_seq_len, batch=a.batch or r.train.per_device_batch,
        accum=a.accum or r.train.grad_accum, r=a.r or r.lora.r)


def command(name: str, c: argparse.Namespace, mdir: Path, data: Path, rdir: Path,
            events: Path) -> list[str]:
    """The argv of one variant (c: shape_args, with steps)."""
    shape = ["--seq", str(c.seq), "--batch", str(c.batch), "--accum", str(c.accum),
             "--r", str(c.r), "--steps", str(c.steps)]
    common = ["--model", str(mdir), "--data", str(data), "--out", str(rdir / "out"),
              "--events", str(events), *shape]
    if name == "article":
        return [sys.executable, str(ROOT / "bench" / "article_port.py"), *common, "--lr", "2e-4",
                "--warmup", "0.03"]
    if name == "unsloth_script":
        return [sys.executable, str(ROOT / "bench" / "unsloth_script.py"), *common]
    sets = [f"model.name={mdir}", f"data.path={data}", "data.format=text",
            f"train.max_steps={c.steps}", "train.logging_steps=1", "train.save_steps=100000",
            f"train.max_seq_len={c.seq}", f"train.per_device_batch={c.batch}",
            f"train.grad_accum={c.accum}", f"lora.r={c.r}", f"lora.alpha={2 * c.r}"]
    if name in ("hf_varlen", "hf_sdpa"):
        sets += ["model.backend=hf", f"model.attn_implementation={name.removeprefix('hf_')}"]
    elif name != "auto":
        sets.append(f"model.backend={name}")
    return [sys.executable, "-m", "supervisor.runner.train", "--recipe",
            str(c.recipe), "--events", str(events),
            "--output-dir", str(rdir / "out")] + [x for kv in sets for x in ("--set", kv)]


def run_variant(name: str, i: int, a: argparse.Namespace, c: argparse.Namespace, mdir: Path,
                data: Path, params: float, peak_tflops: float | None, logf: Any,
                tag: str = "") -> dict[str, Any]:
    """Run one variant in a fresh process; its row."""
    row: dict[str, Any] = {"variant": name, "run": i}
    if name in ("unsloth", "unsloth_script") and (why := unsloth_skip()):
        row.update(skipped=why)
        return row
    rdir = a.work / "runs" / f"{tag}{i}-{name}"
    rdir.mkdir(parents=True, exist_ok=True)
    events = rdir / "events.jsonl"
    events.unlink(missing_ok=True)
    cmd = command(name, c, mdir, data, rdir, events)
    gpu = importlib.util.find_spec("pynvml") is not None and peak_tflops is not None
    mon = NvmlPeak(0) if gpu else None
    t = time.monotonic()
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=bench_env(), capture_output=True, text=True,
                           timeout=max(30, min(a.per_run_s, left(a.budget_s) - 10)))
        rc, out = p.returncode, (p.stdout + p.stderr)
    except subprocess.TimeoutExpired as e:
        rc, out = 124, f"timed out\n{(e.stderr or b'')[-3000:]!r}"
    wall = time.monotonic() - t
    nvml = mon.stop() if mon else None
    logf.write(f"\n===== {tag}{i}-{name} rc={rc} wall={wall:.1f}s\n{' '.join(cmd)}\n{out[-4000:]}\n")
    logf.flush()
    evs = read_events(events)
    steps = step_events(events)
    tps = tokens_per_s(steps)
    tps3 = tokens_per_s(steps, skip=1)
    notes = [e["message"] for e in evs if e.get("event") == "notice"]
    row.update(
        rc=rc, wall_s=round(wall, 1), steps=len(steps),
        tokens_per_s=round(tps, 1) if tps else None,
        tokens_per_s_from3=round(tps3, 1) if tps3 else None,
        mfu_pct=round(100 * 6 * params * tps / (peak_tflops * 1e12), 2) if tps and peak_tflops else None,
        tokens_per_step=[e.get("tokens") for e in steps],
        step_time_s=[e.get("step_time_s") for e in steps],
        loss=[e.get("loss") for e in steps],
        peak_alloc_mib=max((e.get("cuda_peak_alloc_mib") or 0 for e in steps), default=None) or None,
        peak_reserved_mib=max((e.get("cuda_peak_reserved_mib") or 0 for e in steps), default=None) or None,
        nvml_peak_mib=round(nvml, 1) if nvml is not None else None,
        backend=next((n.split(":")[0].removeprefix("backend ") for n in notes if n.startswith("backend ")), None),
        notices=notes[:12],
        padding_free="Padding-free batching auto-enabled" in out or None,
        error=out[-1500:] if rc else "",
    )
    return row


def parse_plan(a: argparse.Namespace, ap: argparse.ArgumentParser) -> list[tuple[str, list[str]]]:
    """[(shape, [variant or warmup:variant, ...]), ...] from --plan, else --shape/--order."""
    text = a.plan or f"{a.shape}={a.order}"
    plan = []
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        shape, _, order = part.partition("=")
        shape = shape.strip()
        if shape not in BUILTIN_SHAPES:
            ap.error(f"unknown shape {shape!r}; known: {', '.join(sorted(BUILTIN_SHAPES))}")
        names = [v.strip() for v in order.split(",") if v.strip()]
        if bad := [v for v in names if v.removeprefix("warmup:") not in VARIANTS]:
            ap.error(f"unknown variant(s) {bad}; known: {', '.join(VARIANTS)} (or warmup:VARIANT)")
        plan.append((shape, names))
    return plan


def model_home(a: argparse.Namespace, shape: ModelShape) -> tuple[Path | None, str]:
    """Where a full-depth bf16 build of `shape` fits: --work, else /dev/shm; (None, why) if neither."""
    import shutil

    need = 2 * shape.total_params * 1.05 + 2 * 2**30
    for root in (a.work, Path("/dev/shm")):
        try:
            free = shutil.disk_usage(root).free
        except OSError:
            continue
        if free > need:
            return root, ""
    return None, (f"no room for its {need / 2**30:.0f} GiB bf16 build (free: --work "
                  f"{shutil.disk_usage(a.work).free / 2**30:.0f} GiB)")


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per shape and variant: the mean of the timed rows, and its ratio to Unsloth's script."""
    out: dict[str, Any] = {}
    for shape in dict.fromkeys(r.get("shape") for r in rows):
        timed = [r for r in rows if r.get("shape") == shape and not r.get("warmup") and r.get("tokens_per_s")]
        per: dict[str, Any] = {}
        for name in dict.fromkeys(r["variant"] for r in timed):
            mine = [r for r in timed if r["variant"] == name]
            per[name] = {"n": len(mine),
                         "tok_s": round(sum(r["tokens_per_s"] for r in mine) / len(mine), 1),
                         "tok_s_from3": round(sum(r["tokens_per_s_from3"] or 0 for r in mine) / len(mine), 1)}
        ref = per.get("unsloth_script")
        for v in per.values():
            if ref:
                v["x_unsloth"] = round(v["tok_s"] / ref["tok_s"], 3)
                v["x_unsloth_from3"] = round(v["tok_s_from3"] / ref["tok_s_from3"], 3) if ref["tok_s_from3"] else None
        out[str(shape)] = per
    return out


def supervised_model(a: argparse.Namespace) -> Path:
    """A 2-layer build of the shape (the tiny one with --tiny) for the supervised run."""
    layers = None if a.tiny else 2
    return build(a.shape, layers, a.work / f"model-{a.shape}-{layers or 'full'}",
                 shape=TINY if a.tiny else None)


def supervised(a: argparse.Namespace, results: dict[str, Any], mdir: Path) -> None:
    """The Unsloth backend under the supervisor: injected OOM, ladder rung resuming, stop."""
    if (why := unsloth_skip()) and not a.tiny:
        results["supervised"] = {"skipped": why}
        return
    data = write_text_data(a.work / "sup.jsonl", 0, [60 if a.tiny else 900] * 64)
    home = a.work / "qlw-home"
    env = bench_env(home)
    backend = "auto" if a.tiny else "unsloth"
    seq = 256 if a.tiny else 1024
    sets = [f"model.name={mdir}", f"data.path={data}", "data.format=text", f"model.backend={backend}",
            f"train.max_seq_len={seq}", "train.per_device_batch=2", "train.grad_accum=1",
            "train.max_steps=40", "train.save_steps=2", "train.logging_steps=1",
            f"train.output_dir={a.work / 'sup-out'}", "lora.dropout=0.0",
            f"debug.raise_oom_above_seq_len={seq // 2}", "debug.step_sleep_s=1.0",
            "oom_ladder=[{\"train.max_seq_len\" = " + str(seq // 2) + "}]"]
    run_id, err = qlw_start(ROOT / "recipes" / "8b.toml", env, sets, timeout=120)
    log("supervised run", run_id, err[-400:])
    if not run_id:
        results["supervised"] = {"error": err[-1500:]}
        return
    run = home / "runs" / run_id
    deadline = time.monotonic() + min(150, left(a.budget_s) - 30)
    stopped = False
    while time.monotonic() < deadline:  # stop once attempt 2 has trained 2 steps past the resume
        steps2 = step_events(run / "attempts" / "2" / "events.jsonl")
        if len(steps2) >= 2 and not stopped:
            subprocess.run(QLW + ["stop", run_id], env=env, cwd=ROOT, capture_output=True, timeout=60)
            stopped = True
            break
        time.sleep(1.0)
    qlw_wait(run_id, env, 60, timeout=75)
    import sqlite3

    db = sqlite3.connect(run / "db.sqlite")
    evs = [dict(zip(("t", "kind", "level", "message"), r, strict=False)) for r in
           db.execute("SELECT t, kind, level, message FROM events ORDER BY id")]
    state = json.loads((run / "state.json").read_text())
    attempts = {}
    for att in sorted((run / "attempts").iterdir()):
        ev = read_events(att / "events.jsonl")
        attempts[att.name] = {
            "steps": [e.get("step") for e in ev if e.get("event") == "step"],
            "notices": [e["message"] for e in ev if e.get("event") == "notice"],
            "phases": [e.get("phase") for e in ev if e.get("event") == "phase"],
        }
    out = a.work / "sup-out"
    results["supervised"] = {
        "run_id": run_id, "stop_sent": stopped, "state": state.get("state"),
        "attempt": state.get("attempt"), "rung": state.get("rung"),
        "checkpoints": sorted(p.name for p in out.glob("checkpoint-*")),
        "last_checkpoint_files": sorted(p.name for p in max(out.glob("checkpoint-*"), default=out,
                                                            key=lambda p: p.stat().st_mtime).iterdir()),
        "events": [(round(e["t"] - evs[0]["t"], 2), e["kind"], e["level"], e["message"]) for e in evs],
        "attempts": attempts,
    }
    log("supervised", state.get("state"), "attempt", state.get("attempt"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("QLW_BENCH_WORK", "/tmp/qlw-peer")))
    ap.add_argument("--shape", default="llama-3.1-8b", choices=sorted(BUILTIN_SHAPES))
    ap.add_argument("--order", default=DEFAULT_ORDER, help="comma-separated variants, run in this order")
    ap.add_argument("--plan", default=None, help='"SHAPE=ORDER;SHAPE=ORDER": several shapes, in order')
    ap.add_argument("--budget-s", type=float, default=540)
    ap.add_argument("--per-run-s", type=float, default=240)
    ap.add_argument("--min-run-s", type=float, default=80, help="skip a variant with less budget left")
    ap.add_argument("--samples", type=int, default=400)
    ap.add_argument("--seq", type=int, default=None, help="default: the shape's recipe")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--accum", type=int, default=None)
    ap.add_argument("--r", type=int, default=None)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup-steps", type=int, default=2)
    ap.add_argument("--warmup-layers", type=int, default=None,
                    help="run the warm-up on an N-layer build, during the full build (default: full depth, after)")
    ap.add_argument("--supervised", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="CPU rehearsal on tiny models")
    a = ap.parse_args()
    plan = parse_plan(a, ap)
    a.out.mkdir(parents=True, exist_ok=True)
    a.work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(a).items()}, "rows": []}
    res_path = a.out / "peer_results.json"

    def save() -> None:
        results["summary"] = summarise(results["rows"])
        res_path.write_text(json.dumps(results, indent=1, default=str))

    def supervise(mdir: Path) -> None:
        try:
            supervised(a, results, mdir)
        except Exception as e:  # the speed rows still run
            results["supervised"] = {"error": repr(e)}

    a.shape = plan[0][0] if plan else a.shape
    peak = matmul_tflops() if any(names for _, names in plan) else None
    results["bf16_matmul_tflops"] = round(peak, 1) if peak else None
    # The supervised demo (a 2-layer model) runs while the full-depth model is built: nothing
    # is timed then; every speed row runs alone afterwards.
    sup = (threading.Thread(target=supervise, args=(supervised_model(a),), daemon=True)
           if a.supervised else None)  # built here: two builds at once race in transformers' imports
    if sup:
        sup.start()
    lengths = speed_lengths(a.samples, seed=17)
    if a.tiny:
        lengths = [max(8, n // 40) for n in lengths]
    data = write_text_data(a.work / "peer.jsonl", 0, lengths)
    n = 0
    with open(a.out / "peer_log.txt", "a") as logf:
        for k, (shape_key, names) in enumerate(plan):
            shape = TINY if a.tiny else BUILTIN_SHAPES[shape_key]
            c = shape_args(a, shape_key)
            if a.tiny:
                c.seq = a.seq or 128
            home, why = (a.work, "") if a.tiny else model_home(a, shape)
            timed = [v for v in names if not v.startswith("warmup:")]
            if home is None or left(a.budget_s) < a.min_run_s + 30:
                why = why or "out of device budget before the build"
                for v in timed:
                    results["rows"].append({"shape": shape_key, "variant": v, "skipped": why})
                log("skip shape", shape_key, why)
                continue
            early: dict[str, Any] = {}
            warm_thread = None
            if names and names[0].startswith("warmup:") and a.warmup_layers:
                # The warm-up on a shallow build of the same shape (same layer, head and loss
                # dimensions, so the same compiled kernels) runs while the full build is written.
                small = build(shape_key, a.warmup_layers, home / f"model-{shape_key}-{a.warmup_layers}l",
                              shape=TINY if a.tiny else None)
                n += 1
                cw = argparse.Namespace(**{**vars(c), "steps": a.warmup_steps})
                base, wrun = names[0].removeprefix("warmup:"), n

                def warm(early: dict[str, Any], args: tuple[Any, ...], key: str) -> None:
                    early["row"] = run_variant(*args, logf, tag=f"{key}-")
                    early["row"].update(shape=key, warmup=True, layers=a.warmup_layers)

                warm_thread = threading.Thread(target=warm, daemon=True, args=(
                    early, (base, wrun, a, cw, small, data, shape.total_params, peak), shape_key))
                warm_thread.start()
                names = names[1:]
            t = time.monotonic()
            mdir = build(shape_key, None, home / f"model-{shape_key}-full", shape=TINY if a.tiny else None)
            results.setdefault("build_s", {})[shape_key] = round(time.monotonic() - t, 1)
            if warm_thread:
                warm_thread.join()
                results["rows"].append(early.get("row") or {"shape": shape_key, "variant": "warmup",
                                                            "warmup": True, "error": "no row"})
                log(shape_key, "warm-up", {k: early.get("row", {}).get(k) for k in ("rc", "wall_s", "step_time_s")})
                save()
            if sup:
                sup.join()
                sup = None
                save()
            log("model", mdir, "built in", results["build_s"][shape_key], "s; data", data,
                "; matmul TFLOP/s", peak, "; seq/batch/accum/r", c.seq, c.batch, c.accum, c.r)
            for name in names:
                n += 1
                warm = name.startswith("warmup:")
                base = name.removeprefix("warmup:")
                if left(a.budget_s) < a.min_run_s:
                    results["rows"].append({"shape": shape_key, "variant": base, "run": n, "warmup": warm,
                                            "skipped": "out of device budget"})
                    log("skip", name, "(budget)")
                    continue
                cw = argparse.Namespace(**{**vars(c), "steps": a.warmup_steps if warm else c.steps})
                row = run_variant(base, n, a, cw, mdir, data, shape.total_params, peak, logf,
                                  tag=f"{shape_key}-")
                row.update(shape=shape_key, warmup=warm)
                results["rows"].append(row)
                save()
                log(shape_key, name, {k: row.get(k) for k in ("rc", "backend", "tokens_per_s",
                                                              "tokens_per_s_from3", "mfu_pct",
                                                              "peak_reserved_mib", "nvml_peak_mib",
                                                              "skipped")})
            if k + 1 < len(plan) and mdir.name.endswith("-full"):
                import shutil

                shutil.rmtree(mdir, ignore_errors=True)  # this call's own build: room for the next
    if sup:
        sup.join()
    save()
    print_table(results)
    return 0


def print_table(results: dict[str, Any]) -> None:
    print("\nrun shape           variant          backend  tok/s    from3    MFU%   alloc MiB  reserved  NVML MiB  losses")
    for r in results["rows"]:
        label = ("warmup:" if r.get("warmup") else "") + r["variant"]
        if r.get("skipped"):
            print(f"{r.get('run', '-')!s:>3} {r.get('shape', '')!s:<15} {label:<16} skipped: {r['skipped']}")
            continue
        losses = " ".join(f"{x:.4f}" for x in r.get("loss") or [] if isinstance(x, (int, float)))
        print(f"{r['run']:>3} {r.get('shape', '')!s:<15} {label:<16} {str(r.get('backend')):<8} "
              f"{r.get('tokens_per_s')!s:<8} {r.get('tokens_per_s_from3')!s:<8} "
              f"{r.get('mfu_pct')!s:<6} {r.get('peak_alloc_mib')!s:<10} {r.get('peak_reserved_mib')!s:<9} "
              f"{r.get('nvml_peak_mib')!s:<9} {losses}  rc={r.get('rc')}")
    for shape, per in (results.get("summary") or {}).items():
        for name, v in per.items():
            print(f"mean {shape} {name}: n={v['n']} {v['tok_s']} tok/s (x{v.get('x_unsloth')}), "
                  f"from step 3 {v['tok_s_from3']} (x{v.get('x_unsloth_from3')})")
    sup = results.get("supervised")
    if sup:
        print("supervised:", {k: sup.get(k) for k in ("state", "attempt", "rung", "stop_sent", "error")})


if __name__ == "__main__":
    raise SystemExit(main())

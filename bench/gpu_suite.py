"""The GPU proofs, in one call: matmul peak, estimator accuracy, the OOM ladder on an
emulated 24 GB card, supervisor overhead and telemetry truth. Results land in --out as JSON.

    python bench/gpu_suite.py --out $OUT --budget-s 560 [--phases peak,estimator,ladder,overhead]

Each phase checks the remaining budget first; what finished is always written.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.gpu_models import build, write_text_data  # noqa: E402
from supervisor.states import TERMINAL_VALUES  # noqa: E402

WORK = Path(os.environ.get("QLW_BENCH_WORK", "/tmp/qlw-bench"))
# The physical GPU this process measures: NVML and nvidia-smi ignore CUDA_VISIBLE_DEVICES, so a
# second suite running on another card of the same host passes --gpu (and CUDA_VISIBLE_DEVICES).
GPU = 0
T0 = time.monotonic()
RESULTS: dict[str, Any] = {}
QLW = [sys.executable, "-m", "supervisor"]


def left(budget: float) -> float:
    return budget - (time.monotonic() - T0)


def save(out: Path) -> None:
    (out / "gpu_results.json").write_text(json.dumps(RESULTS, indent=1, default=str))


def log(*a: Any) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s]", *a, flush=True)


class NvmlPeak:
    """Device memory used (NVML, MiB) sampled at 20 Hz in a thread: peak minus baseline."""

    def __init__(self, index: int | None = None) -> None:
        import pynvml

        pynvml.nvmlInit()
        self.nv = pynvml
        self.h = pynvml.nvmlDeviceGetHandleByIndex(GPU if index is None else index)
        self.base = self.used()
        self.peak = self.base
        self._stop = threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def used(self) -> float:
        return self.nv.nvmlDeviceGetMemoryInfo(self.h).used / 2**20

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.used())
            time.sleep(0.05)

    def stop(self) -> float:
        self._stop.set()
        self.t.join()
        return self.peak - self.base


def recipe_text(model_dir: Path, data: Path, out: Path, *, seq: int, batch: int, accum: int = 1,
                r: int = 16, targets: str = '"all-linear"', steps: int = 3, save_steps: int = 1000,
                extra: str = "", shuffle: bool = True) -> str:
    text = textwrap.dedent(f"""
        name = "bench"
        oom_ladder = [{{ "train.max_seq_len" = 768 }}, {{ "lora.r" = 8 }}, {{ "lora.target_modules" = ["q_proj", "v_proj"] }}]
        [model]
        name = "{model_dir}"
        attn_implementation = "sdpa"
        [lora]
        r = {r}
        alpha = {2 * r}
        dropout = 0.05
        target_modules = {targets}
        [data]
        path = "{data}"
        format = "text"
        [train]
        output_dir = "{out}"
        max_seq_len = {seq}
        per_device_batch = {batch}
        grad_accum = {accum}
        max_steps = {steps}
        save_steps = {save_steps}
        logging_steps = 1
        learning_rate = 1e-4
        [env]
        PYTORCH_CUDA_ALLOC_CONF = "expandable_segments:True"
    """)
    if not shuffle:  # the data in file order (the ladder's OOM lands on a known step)
        text = text.replace("[train]\n", "[train]\nshuffle = false\n", 1)
    return text + textwrap.dedent(extra)


def bench_env(home: Path | None = None) -> dict[str, str]:
    """This environment with the repository on PYTHONPATH (and QLORA_WATCH_HOME when given)."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    if home is not None:
        env["QLORA_WATCH_HOME"] = str(home)
    return env


def run_trainer(recipe: Path, events: Path, out: Path, timeout: float) -> tuple[int, float]:
    cmd = [sys.executable, "-m", "supervisor.runner.train", "--recipe", str(recipe),
           "--events", str(events), "--output-dir", str(out)]
    t = time.monotonic()
    p = subprocess.run(cmd, cwd=ROOT, env=bench_env(), timeout=timeout, capture_output=True, text=True)
    if p.returncode != 0:
        log("trainer failed:", p.stderr[-1500:])
    return p.returncode, time.monotonic() - t


def read_events(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def step_events(path: Path) -> list[dict]:
    """The step records of a trainer's events.jsonl."""
    return [e for e in read_events(path) if e.get("event") == "step"]


def tokens_per_s(steps: list[dict], skip: int = 0) -> float | None:
    """Tokens/s from the first to the last step record, after `skip` warm-up steps (None: too few)."""
    tail = steps[skip:]
    if len(tail) >= 2 and tail[-1].get("tokens") and tail[0].get("tokens"):
        return (tail[-1]["tokens"] - tail[0]["tokens"]) / (tail[-1]["t"] - tail[0]["t"])
    return None


def qlw_start(recipe: Path, env: dict[str, str], sets: list[str] | tuple[str, ...] = (),
              timeout: float = 60) -> tuple[str | None, str]:
    """`qlora-watch start RECIPE --detach --force [--set KEY=VALUE ...]`: (the run id it printed
    last, or None when it printed nothing; its stderr)."""
    res = subprocess.run(QLW + ["start", str(recipe), "--detach", "--force"]
                         + [x for kv in sets for x in ("--set", kv)],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    printed = res.stdout.strip()
    return (printed.splitlines()[-1] if printed else None), res.stderr


def qlw_wait(run_id: str, env: dict[str, str], wait_s: float, timeout: float | None = None) -> None:
    """`qlora-watch wait RUN --timeout wait_s`, killed after `timeout` seconds when given."""
    subprocess.run(QLW + ["wait", run_id, "--timeout", str(wait_s)], env=env, cwd=ROOT,
                   timeout=timeout)


# ---------------------------------------------------------------------------- phases


def phase_env() -> None:
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                            "gpu": torch.cuda.get_device_name(0)}
    for mod in ("transformers", "peft", "trl", "bitsandbytes", "accelerate", "pynvml"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001
            info[mod] = f"n/a ({e})"
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,power.limit",
                          "--format=csv,noheader"], capture_output=True, text=True)
    info["nvidia_smi"] = smi.stdout.strip()
    RESULTS["env"] = info
    log(info)


def phase_peak() -> None:
    import torch

    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    torch.cuda.synchronize()
    iters = 50
    t = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize()
    tflops = 2 * n**3 * iters / (time.perf_counter() - t) / 1e12
    RESULTS["bf16_matmul_tflops"] = round(tflops, 1)
    log("bf16 matmul", RESULTS["bf16_matmul_tflops"], "TFLOP/s")
    del a, b
    torch.cuda.empty_cache()


LADDER_LAYERS = 8
LADDER_BATCH = 16

ESTIMATOR_CONFIGS = [
    # (shape, layers, seq, batch, r, targets)
    ("llama-3.1-8b", 4, 1024, 1, 16, '"all-linear"'),
    ("llama-3.1-8b", 4, 4096, 1, 16, '"all-linear"'),
    ("llama-3.1-8b", 4, 4096, 4, 16, '"all-linear"'),
    ("llama-3.1-8b", 8, 4096, 4, 16, '"all-linear"'),
    ("qwen-2.5-32b", 4, 2048, 2, 32, '"all-linear"'),
    ("llama-3.1-70b", 1, 1024, 1, 16, '["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]'),
    ("llama-3.1-70b", 2, 1024, 1, 16, '["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]'),
]


def phase_estimator(budget: float, out: Path) -> None:
    from supervisor.preflight.check import estimate
    from supervisor.recipe import load_recipe

    rows = RESULTS.setdefault("estimator", [])
    for shape, layers, seq, batch, r, targets in ESTIMATOR_CONFIGS:
        if left(budget) < 60:
            log("estimator: out of budget")
            break
        mdir = build(shape, layers, WORK / f"{shape}-{layers}L")
        data = write_text_data(WORK / f"data-{seq}.jsonl", 64, seq + 64)
        name = f"{shape}-{layers}L-s{seq}-b{batch}-r{r}"
        rdir = WORK / "runs" / name
        rdir.mkdir(parents=True, exist_ok=True)
        recipe = rdir / "recipe.toml"
        recipe.write_text(recipe_text(mdir, data, rdir / "out", seq=seq, batch=batch, r=r,
                                      targets=targets, steps=3))
        mon = NvmlPeak()
        rc, wall = run_trainer(recipe, rdir / "events.jsonl", rdir / "out", timeout=max(30, left(budget) - 20))
        nvml_peak = mon.stop()
        steps = step_events(rdir / "events.jsonl")
        last = steps[-1] if steps else {}
        est = estimate(load_recipe(recipe), gpu_mem_gib=139).to_dict()
        row = {"name": name, "shape": shape, "layers": layers, "seq": seq, "batch": batch, "r": r,
               "rc": rc, "wall_s": round(wall, 1),
               "peak_alloc_mib": last.get("cuda_peak_alloc_mib"),
               "peak_reserved_mib": last.get("cuda_peak_reserved_mib"),
               "nvml_peak_mib": round(nvml_peak, 1), "tokens_per_s": last.get("tokens_per_s"),
               "estimate": est}
        rows.append(row)
        save(out)
        log(name, "rc", rc, "alloc", row["peak_alloc_mib"], "nvml", row["nvml_peak_mib"],
            "est GiB", est.get("gpu_needed_gib") or est.get("vram_needed_gib"))


def phase_ladder(budget: float, out: Path) -> None:
    """Full-depth 8B at the article's batch 8 on an emulated 24 GB card: OOM, then rung 768."""
    if left(budget) < 100:
        log("ladder: not enough budget")
        return
    mdir = build("llama-3.1-8b", LADDER_LAYERS, WORK / f"llama-3.1-8b-{LADDER_LAYERS}L")
    # 48 short samples first (3 steps of 16 fit), then full-length ones: step 4 OOMs at seq 4096.
    data = write_text_data(WORK / "ladder.jsonl", 0, [500] * 48 + [4200] * 80)
    home = WORK / "qlw-home"
    rdir = WORK / "ladder"
    rdir.mkdir(parents=True, exist_ok=True)
    recipe = rdir / "recipe.toml"
    recipe.write_text(recipe_text(
        mdir, data, rdir / "out", seq=4096, batch=LADDER_BATCH, accum=1, r=64, steps=6, save_steps=2,
        extra="""
        [hardware]
        emulate_vram_gib = 24
        [supervisor]
        sample_interval_s = 1.0
        """, shuffle=False))
    env = bench_env(home)
    run_id, err = qlw_start(recipe, env)
    log("ladder run", run_id, err[-500:])
    if not run_id:
        return
    qlw_wait(run_id, env, max(30, left(budget) - 60), timeout=max(60, left(budget)))
    run = home / "runs" / run_id
    import sqlite3

    db = sqlite3.connect(run / "db.sqlite")
    evs = [dict(zip(("t", "kind", "level", "message", "evidence"), r, strict=False)) for r in
           db.execute("SELECT t, kind, level, message, evidence FROM events ORDER BY id")]
    state = json.loads((run / "state.json").read_text())
    e1 = step_events(run / "attempts" / "1" / "events.jsonl")
    e2 = read_events(run / "attempts" / "2" / "events.jsonl")
    exit1 = json.loads((run / "attempts" / "1" / "exit.json").read_text()) if (run / "attempts/1/exit.json").exists() else {}
    timing: dict[str, Any] = {}
    try:
        oom_t = exit1["ended_at"]
        exited_ev = next(e for e in evs if e["kind"] == "trainer_exited")
        launch2 = [e for e in evs if e["kind"] == "launch"][1]
        load2 = next(e["t"] for e in e2 if e.get("phase") == "loading_model")
        train2 = next(e["t"] for e in e2 if e.get("event") == "step")
        timing = {"oom_to_first_step_s": train2 - oom_t,
                  "supervisor_detect_s": exited_ev["t"] - oom_t,
                  "supervisor_decide_spawn_s": launch2["t"] - exited_ev["t"],
                  "supervisor_part_s": launch2["t"] - oom_t,
                  "trainer_start_to_loading_s": load2 - launch2["t"],
                  "loading_to_first_step_s": train2 - load2}
    except (StopIteration, IndexError, KeyError) as e:
        timing = {"error": repr(e)}
    RESULTS["ladder"] = {"run_id": run_id, "state": state.get("state"), "attempt": state.get("attempt"),
                         "rung": state.get("rung"), "resume_from": state.get("resume_from"),
                         "exit1_tail": exit1.get("tail", [])[-3:], "timing": timing,
                         "events": [(round(e["t"] - evs[0]["t"], 2), e["kind"], e["message"]) for e in evs],
                         "steps_attempt1": [e.get("step") for e in e1],
                         "steps_attempt2": [e.get("step") for e in e2 if e.get("event") == "step"]}
    save(out)
    log("ladder", RESULTS["ladder"]["state"], timing)


def phase_overhead(budget: float, out: Path, pairs: int = 3) -> None:
    """Bare trainer vs supervised (1 Hz sampling + a client attached), interleaved."""
    mdir = build("llama-3.1-8b", 4, WORK / "llama-3.1-8b-4L")
    data = write_text_data(WORK / "data-2048.jsonl", 400, 2048 + 64)
    home = WORK / "qlw-home-oh"
    env = bench_env(home)
    rows = RESULTS.setdefault("overhead", [])
    for i in range(pairs):
        for mode in ("bare", "supervised"):
            if left(budget) < 70:
                log("overhead: out of budget")
                return
            rdir = WORK / "oh" / f"{mode}-{i}"
            rdir.mkdir(parents=True, exist_ok=True)
            recipe = rdir / "recipe.toml"
            recipe.write_text(recipe_text(mdir, data, rdir / "out", seq=2048, batch=4, steps=40,
                                          extra="[supervisor]\nsample_interval_s = 1.0\n"))
            if mode == "bare":
                rc, wall = run_trainer(recipe, rdir / "events.jsonl", rdir / "out", timeout=left(budget) - 10)
                steps = step_events(rdir / "events.jsonl")
            else:
                t = time.monotonic()
                run_id, err = qlw_start(recipe, env)
                if not run_id:
                    raise RuntimeError(f"qlora-watch start printed no run id: {err[-1500:]}")
                client = subprocess.Popen([sys.executable, str(ROOT / "bench" / "attach_client.py"),
                                           str(home), run_id], env=env, cwd=ROOT)
                smi = smi_logger(str(GPU), rdir / "smi.csv")
                qlw_wait(run_id, env, max(30, left(budget) - 20))
                smi.terminate()
                client.terminate()
                wall = time.monotonic() - t
                rc = 0
                steps = step_events(home / "runs" / run_id / "attempts" / "1" / "events.jsonl")
                if i == 0:
                    telemetry_truth(home / "runs" / run_id, rdir / "smi.csv")
            tps = tokens_per_s(steps, skip=10)  # skip warm-up steps
            rows.append({"mode": mode, "pair": i, "rc": rc, "wall_s": round(wall, 1),
                         "tokens_per_s": tps, "steps": len(steps)})
            save(out)
            log("overhead", mode, i, tps)


# The 8B recipe as shipped (recipes/8b.toml: seq 4096, batch 4 x accum 4, NF4, r 64 all-linear,
# paged_adamw_8bit), attention sdpa, then what raises tokens/s without changing the math.
SPEED_VARIANTS: list[tuple[str, list[str]]] = [
    ("article", []),
    ("ours", []),
    ("ours+liger", ["train.use_liger_kernel=true"]),
    ("ours+liger+packing", ["train.use_liger_kernel=true", "train.packing=true", "train.padding_free=true"]),
    # packed rows need a block-diagonal mask: SDPA takes its slow masked path, flex attention
    # (a compiled kernel that skips the masked blocks) is the varlen kernel torch ships
    ("ours+liger+packing+flex", ["train.use_liger_kernel=true", "train.packing=true",
                                 "train.padding_free=true", "model.attn_implementation=flex_attention"]),
]
SPEED_STEPS = 3  # step 1 is warm-up (allocator, kernels, Triton JIT); tokens/s over steps 2..3
LLAMA_8B_PARAMS = 8.03e9


def speed_lengths(n: int, seed: int = 1) -> list[int]:
    """Sample lengths like an instruction dataset: log-normal, median ~900, mean ~1.2k words,
    clipped to 64..6000 (the article's data averages 1.2k tokens)."""
    import random

    rng = random.Random(seed)
    return [max(64, min(6000, int(rng.lognormvariate(6.8, 0.75)))) for _ in range(n)]


def phase_speed(budget: float, out: Path, variants: str | None = None, short: bool = False) -> None:
    """tokens/s and MFU of the article's script (ported) against our trainer on the full-depth
    8B shape, then with liger-kernel and padding-free packing; the same data for all.
    short: samples of ~1.2k tokens on average (the article's data) instead of ~3k."""
    if left(budget) < 200:
        log("speed: not enough budget to build the 8B model and run")
        return
    peak = RESULTS.get("bf16_matmul_tflops") or 773.9
    mdir = build("llama-3.1-8b", None, WORK / "llama-3.1-8b-full")
    # the locally trained tokenizer splits a word into ~2.7 tokens (measured: 16 samples of
    # 1158 words on average gave 50.5k non-padding tokens)
    lengths = speed_lengths(1600 if short else 600)
    if short:
        lengths = [max(24, n * 10 // 27) for n in lengths]
    data = write_text_data(WORK / ("speed-short.jsonl" if short else "speed.jsonl"), 0, lengths)
    rows = RESULTS.setdefault("speed_short" if short else "speed", [])
    wanted = set(variants.split("/")) if variants else None
    env = bench_env()
    for name, sets in SPEED_VARIANTS:
        if wanted and name not in wanted:
            continue
        if left(budget) < 75:
            log("speed: out of budget before", name)
            break
        rdir = WORK / ("speed-short" if short else "speed") / name
        rdir.mkdir(parents=True, exist_ok=True)
        events = rdir / "events.jsonl"
        events.unlink(missing_ok=True)
        if name == "article":
            cmd = [sys.executable, str(ROOT / "bench" / "article_port.py"), "--model", str(mdir),
                   "--data", str(data), "--out", str(rdir / "out"), "--events", str(events),
                   "--seq", "4096", "--batch", "4", "--accum", "4", "--r", "64",
                   "--steps", str(SPEED_STEPS), "--lr", "2e-4", "--warmup", "0.03"]
        else:
            sets = ["model.attn_implementation=sdpa", f"model.name={mdir}", f"data.path={data}",
                    f"train.max_steps={SPEED_STEPS}", "train.logging_steps=1",
                    "train.save_steps=100000", *sets]
            cmd = [sys.executable, "-m", "supervisor.runner.train", "--recipe",
                   str(ROOT / "recipes" / "8b.toml"), "--events", str(events),
                   "--output-dir", str(rdir / "out")] + [x for kv in sets for x in ("--set", kv)]
        mon = NvmlPeak()
        t = time.monotonic()
        try:
            p = subprocess.run(cmd, cwd=ROOT, env=env, timeout=max(30, left(budget) - 15),
                               capture_output=True, text=True)
            rc, err = p.returncode, p.stderr[-2500:] if p.returncode else ""
        except subprocess.TimeoutExpired:
            rc, err = 124, "timed out"
        wall = time.monotonic() - t
        nvml_peak = mon.stop()
        steps = step_events(events)
        tps = tokens_per_s(steps)
        row = {"variant": name, "rc": rc, "wall_s": round(wall, 1), "steps": len(steps),
               "tokens_per_s": round(tps, 1) if tps else None,
               "mfu_pct": round(100 * 6 * LLAMA_8B_PARAMS * tps / (peak * 1e12), 2) if tps else None,
               "step_time_s": [e.get("step_time_s") for e in steps],
               "tokens_per_step": [e.get("tokens") for e in steps],
               "loss": [e.get("loss") for e in steps],
               "peak_alloc_mib": steps[-1].get("cuda_peak_alloc_mib") if steps else None,
               "nvml_peak_mib": round(nvml_peak, 1), "error": err}
        rows.append(row)
        save(out)
        log("speed", name, "rc", rc, "tok/s", row["tokens_per_s"], "MFU %", row["mfu_pct"],
            "nvml MiB", row["nvml_peak_mib"], err[-300:])


FSDP_DEPTHS = (4, 8)  # 70B shape at reduced depth: the per-layer slope extrapolates to 80


def phase_fsdp(budget: float, out: Path, depths: tuple[int, ...] = FSDP_DEPTHS,
               extra: tuple[str, ...] = (), key: str = "fsdp") -> None:
    """The 70B shape under the supervisor with FSDP-QLoRA across 2 emulated 24 GB cards (the
    article's 70B column: seq 1024, batch 1 x accum 8, r 16), at reduced depths; per-card NVML
    peaks give the per-layer cost, and the dashboard is shot while both cards train."""
    import sqlite3

    rows = RESULTS.setdefault(key, [])
    data = write_text_data(WORK / "data-1100.jsonl", 200, 1100)
    home = WORK / "qlw-home-fsdp"
    env = bench_env(home)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    for depth in depths:
        if left(budget) < 90:
            log("fsdp: out of budget before depth", depth)
            break
        mdir = build("llama-3.1-70b", depth, WORK / f"llama-3.1-70b-{depth}L")
        rdir = WORK / key / f"{depth}L"
        rdir.mkdir(parents=True, exist_ok=True)
        recipe = rdir / "recipe.toml"
        sets = [f"model.name={mdir}", "model.attn_implementation=sdpa", f"data.path={data}",
                f"train.output_dir={rdir / 'out'}", f"train.max_steps={10 if depth == depths[-1] else 6}",
                "train.logging_steps=1",
                "train.save_steps=3", "hardware.gpus=2", "hardware.emulate_vram_gib=24",
                "hardware.fsdp_cpu_offload=false", "supervisor.sample_interval_s=1.0", *extra]
        recipe.write_text((ROOT / "recipes" / "70b.toml").read_text())
        mons = [NvmlPeak(0), NvmlPeak(1)]
        t = time.monotonic()
        run_id, err = qlw_start(recipe, env, sets, timeout=90)
        if not run_id:
            rows.append({"depth": depth, "error": err[-1500:]})
            log("fsdp start failed", err[-800:])
            for m in mons:
                m.stop()
            continue
        shot = None
        ev = home / "runs" / run_id / "attempts" / "1" / "events.jsonl"
        smi = smi_logger("0,1", rdir / "smi.csv")
        shot_err = ""
        if depth == depths[-1]:  # wait for training, then attach the real dashboard
            while left(budget) > 40 and time.monotonic() - t < 300:
                if step_events(ev):
                    shot = out / f"fsdp_{depth}L_dashboard.svg"
                    try:
                        p = subprocess.run([sys.executable, str(ROOT / "bench" / "live_screenshot.py"),
                                            run_id, str(shot), "--seconds", "4"], env=env, cwd=ROOT,
                                           timeout=60, capture_output=True, text=True)
                        shot_err = p.stderr[-2000:] if p.returncode else ""
                    except subprocess.TimeoutExpired:
                        shot_err = "screenshot timed out"
                    break
                st = json.loads((home / "runs" / run_id / "state.json").read_text())
                if st.get("state") in TERMINAL_VALUES:
                    break
                time.sleep(1)
        qlw_wait(run_id, env, max(30, left(budget) - 30), timeout=max(60, left(budget)))
        peaks = [round(m.stop(), 1) for m in mons]
        smi.terminate()
        run = home / "runs" / run_id
        db = sqlite3.connect(run / "db.sqlite")
        samples = load_samples(db)
        try:
            telemetry_truth(run, rdir / "smi.csv", key=f"telemetry_truth_fsdp_{depth}L", samples=samples)
        except Exception as e:  # noqa: BLE001
            log("telemetry truth failed:", e)
        state = json.loads((run / "state.json").read_text())
        steps = step_events(ev)
        tps = tokens_per_s(steps, skip=1)
        seen = sorted({g.get("index") for s_ in samples for g in s_.get("gpus", [])
                       if (g.get("proc_mem_mib") or 0) > 0})
        evs = [(r[0], r[1]) for r in db.execute("SELECT kind, message FROM events ORDER BY id")]
        # per-card device memory (the supervisor's 1 Hz samples) while loading vs while training:
        # with a quantized model every rank loads the whole NF4 model before FSDP shards it
        first_step = steps[0]["t"] if steps else float("inf")
        split: dict[str, list[float]] = {"loading": [0.0, 0.0], "training": [0.0, 0.0]}
        for s_ in samples:
            part = "training" if s_["t"] >= first_step else "loading"
            for g in s_.get("gpus", []):
                if g.get("index") in (0, 1) and g.get("mem_used_mib") is not None:
                    split[part][g["index"]] = max(split[part][g["index"]], round(g["mem_used_mib"], 1))
        tail = []
        exit_file = run / "attempts" / "1" / "exit.json"
        if exit_file.exists():
            tail = json.loads(exit_file.read_text()).get("tail", [])[-25:]
        rows.append({"depth": depth, "run_id": run_id, "state": state.get("state"),
                     "attempts": state.get("attempt"), "wall_s": round(time.monotonic() - t, 1),
                     "steps": len(steps), "tokens_per_s": round(tps, 1) if tps else None,
                     "nvml_peak_mib_per_gpu": peaks, "gpus_with_trainer_memory": seen,
                     "device_mem_mib_loading_vs_training": split,
                     "loss": [e.get("loss") for e in steps], "events": evs[-30:],
                     "screenshot": str(shot) if shot and shot.exists() else None,
                     "screenshot_error": shot_err, "tail": tail,
                     "checkpoints": {c.name: sorted(x.name for x in c.iterdir())
                                     for c in sorted((rdir / "out").glob("checkpoint-*"))},
                     "adapter_files": sorted(x.name for x in (rdir / "out" / "adapter").glob("*"))
                     if (rdir / "out" / "adapter").is_dir() else None,
                     "step_events": steps,
                     "steps_by_attempt": {a.name: [e.get("step") for e in (
                         steps if a.name == "1" else step_events(a / "events.jsonl"))]
                                          for a in sorted((run / "attempts").iterdir())}})
        save(out)
        log("fsdp", depth, state.get("state"), "peaks", peaks, "tok/s", tps, "gpus seen", seen)
        if state.get("state") != "completed":
            break  # the deeper run would fail the same way: keep the budget


SMI_QUERY = ("--query-gpu=timestamp,index,utilization.gpu,memory.used,temperature.gpu,power.draw,"
             "clocks.sm,clocks_throttle_reasons.active")
SMI_FIELDS = ("util", "mem_mib", "temp_c", "power_w", "sm_mhz")
OURS_FIELDS = ("util_pct", "mem_used_mib", "temp_c", "power_w", "sm_clock_mhz")


def smi_logger(gpus: str, path: Path) -> subprocess.Popen:
    """nvidia-smi printing one CSV line per GPU per second (its own sampling, not ours)."""
    return subprocess.Popen(["nvidia-smi", "-i", gpus, SMI_QUERY, "--format=csv,noheader,nounits",
                             "-l", "1"], stdout=open(path, "w"))


def load_samples(db: Any) -> list[dict]:
    """The supervisor's telemetry samples from a run's db.sqlite connection, oldest first."""
    return [json.loads(r[0]) for r in db.execute("SELECT data FROM samples ORDER BY t")]


def telemetry_truth(run: Path, smi_csv: Path, key: str = "telemetry_truth",
                    samples: list[dict] | None = None) -> None:
    """The supervisor's NVML samples (`samples`, else read from the run's db.sqlite) against
    nvidia-smi lines taken in the same seconds: every pair within 0.6 s, and the largest
    difference among pairs within 0.1 s (same instant)."""
    import sqlite3
    from datetime import datetime

    ours = samples if samples is not None else load_samples(sqlite3.connect(run / "db.sqlite"))
    pairs = []
    for line in smi_csv.read_text().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 8:
            continue
        try:
            t = datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
            index = int(parts[1])
            values = [float(x) for x in parts[2:7]]
        except ValueError:
            continue
        near = min(ours, key=lambda s: abs(s["t"] - t), default=None)
        g = next((g for g in (near or {}).get("gpus", []) if g.get("index") == index), None)
        if near is None or abs(near["t"] - t) > 0.6 or g is None:
            continue
        pair: dict[str, Any] = {"dt": round(near["t"] - t, 3), "gpu": index}
        for name, ours_name, theirs in zip(SMI_FIELDS, OURS_FIELDS, values, strict=True):
            pair[name] = (g.get(ours_name), theirs)
        pair["throttle"] = (g.get("throttle_mask"), int(parts[7], 16) if parts[7].startswith("0x") else parts[7])
        pairs.append(pair)
    close = [p for p in pairs if abs(p["dt"]) <= 0.1]
    worst = {name: max((abs(p[name][0] - p[name][1]) for p in close if p[name][0] is not None), default=None)
             for name in SMI_FIELDS}
    worst["throttle_mismatches"] = sum(1 for p in close if p["throttle"][0] != p["throttle"][1])
    RESULTS[key] = {"n": len(pairs), "n_within_0.1s": len(close), "worst_within_0.1s": worst,
                    "busy_pairs": sum(1 for p in pairs if (p["util"][1] or 0) > 50),
                    "pairs": pairs[:400],
                    "hotspot": [g.get("hotspot_reason") for g in ours[-1]["gpus"]] if ours else None,
                    "sample_example": ours[len(ours) // 2] if ours else None}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--budget-s", type=float, default=560)
    ap.add_argument("--phases", default="env,peak,estimator,ladder,overhead")
    ap.add_argument("--gpu", type=int, default=0, help="physical GPU index to measure (NVML, nvidia-smi)")
    args = ap.parse_args()
    global GPU
    GPU = args.gpu
    args.out.mkdir(parents=True, exist_ok=True)
    WORK.mkdir(parents=True, exist_ok=True)
    known = ("env", "peak", "estimator", "ladder", "overhead", "speed", "speedshort", "fsdp", "fsdpresume")
    unknown = [ph for ph in args.phases.split(",") if ph.split(":")[0] not in known]
    if unknown:  # a typo must not spend device time on other phases
        ap.error(f"unknown phases {unknown}; known: {', '.join(known)}")
    for ph in args.phases.split(","):
        try:
            if ph == "env":
                phase_env()
            elif ph == "peak":
                phase_peak()
            elif ph == "estimator":
                phase_estimator(args.budget_s, args.out)
            elif ph == "ladder":
                phase_ladder(args.budget_s, args.out)
            elif ph == "overhead":
                phase_overhead(args.budget_s, args.out)
            elif ph.split(":")[0] in ("speed", "speedshort"):  # :ours/ours+liger picks variants
                phase_speed(args.budget_s, args.out, ph.partition(":")[2] or None,
                            short=ph.startswith("speedshort"))
            elif ph == "fsdpresume":  # OOM at step 4 on both ranks -> rung 768 resumes checkpoint-4
                phase_fsdp(args.budget_s, args.out, (4,), key="fsdp_resume", extra=(
                    "debug.raise_oom_above_seq_len=800", "train.save_steps=2", "train.max_steps=8"))
            elif ph == "fsdp" or ph.startswith("fsdp:"):  # fsdp, or fsdp:8 for one depth
                depths = tuple(int(x) for x in ph.partition(":")[2].split("/") if x) or FSDP_DEPTHS
                phase_fsdp(args.budget_s, args.out, depths)
        except Exception as e:  # noqa: BLE001 - keep what the other phases found
            import traceback

            RESULTS[f"{ph}_error"] = traceback.format_exc()[-3000:]
            log(ph, "failed:", e)
        save(args.out)
    log("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

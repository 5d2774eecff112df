"""Full-depth memory calibration at the decision edges, with the faithful 24/48 GB rehearsal.

    python bench/calibrate_full_depth.py --out $OUT --budget-s 540            # on the GPU box
    python bench/calibrate_full_depth.py --out /tmp/cal --plan tiny           # CPU dry run

The shipped recipes (recipes/8b.toml, recipes/14b.toml: seq 4096, NF4 + DQ, r 64 all-linear,
liger on, gradient checkpointing, paged_adamw_8bit) on random-weight full-depth builds
(bench/gpu_models.py), fixed-length samples (every row fills seq 4096). Groups run in order,
each only while the budget lasts:

- "free": several trainers at once on the whole card, each one's NVML per-process peak (context
  + allocator, what nvidia-smi lists for the PID) and torch's allocated/reserved peaks;
- "card": one run on a rehearsed card (hardware.emulate_vram_gib, ballast mode): does it fit,
  and what did the process take; `start` runs go through `qlora-watch start` (the supervisor's
  samples show the card's total; the OOM ladder acts on a real OOM).

Results: OUT/calibration.json (rows as they finish), OUT/calibrate_log.txt is the caller's tee.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.gpu_suite import (  # noqa: E402
    bench_env,
    load_samples,
    qlw_start,
    qlw_wait,
    read_events,
    step_events,
)

WORK = Path(os.environ.get("QLW_BENCH_WORK", "/tmp/qlw-cal"))
T0 = time.monotonic()
RESULTS: dict[str, Any] = {"rows": []}
SEQ = 4096
SHAPES = {"8b": "llama-3.1-8b", "14b": "qwen-2.5-14b"}
CARD_48_MIB = 49_140.0  # a 48 GB card's total (supervisor/preflight/emulation.py)


def log(*a: Any) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s]", *a, flush=True)


@dataclass
class Job:
    """One trainer run: which recipe, batch x accum, and on what card (None: the whole GPU)."""

    name: str
    recipe: str  # 8b | 14b | tiny
    batch: int
    accum: int = 1
    steps: int = 2
    card_gib: float | None = None  # rehearsed card (ballast); None: the whole GPU
    via_start: bool = False  # under `qlora-watch start` (the supervisor, its ladder and samples)
    sets: list[str] = field(default_factory=list)


@dataclass
class Group:
    kind: str  # free: jobs at once; card: one after another on a rehearsed card
    jobs: list[Job]
    need_s: float  # skip the group when less budget than this is left
    build: str | None = None  # model to build in the background while the group runs
    edge: tuple[str, float] | None = None  # (recipe, card MiB): pick the batches from the fit


def edge_batches(rows: list[dict[str, Any]], recipe: str, card_mib: float) -> tuple[int, int] | None:
    """(largest batch whose fitted peak fits card_mib, the next one) from the measured free
    runs of `recipe` (peak = a + s x batch, least squares); None with fewer than two points."""
    pts = [(r["batch"], r["proc_peak_mib"]) for r in rows if r.get("recipe") == recipe
           and r.get("card_gib") is None and r.get("rc") == 0 and r.get("proc_peak_mib")]
    if len({b for b, _ in pts}) < 2:
        return None
    n, sb, sp = len(pts), sum(b for b, _ in pts), sum(p for _, p in pts)
    sbb, sbp = sum(b * b for b, _ in pts), sum(b * p for b, p in pts)
    slope = (n * sbp - sb * sp) / (n * sbb - sb * sb)
    a = (sp - slope * sb) / n
    if slope <= 0:
        return None
    b = max(1, int((card_mib - a) // slope))
    return b, b + 1


def resolve_edge(group: Group, rows: list[dict[str, Any]]) -> Group:
    """An edge group's jobs, named by the batches the fit picked (its own batches without a fit)."""
    if group.edge is None:
        return group
    recipe, card = group.edge
    picked = edge_batches(rows, recipe, card)
    if picked is None:
        log("edge", recipe, card, ": no fit, keeping", [j.batch for j in group.jobs])
        return group
    jobs = [Job(f"{recipe}-b{b}", recipe, b, steps=group.jobs[0].steps) for b in picked]
    log("edge", recipe, card, "MiB: batches", picked)
    return Group(group.kind, jobs, group.need_s)


def plan_full() -> list[Group]:
    """8B and 14B at the 24 GB and 48 GB edges; the acceptance runs in between."""
    return [
        Group("free", [Job("8b-b4", "8b", 4), Job("8b-b8", "8b", 8), Job("8b-b9", "8b", 9)],
              90, build="14b"),
        Group("card", [Job("8b-b8x2-24gb-start", "8b", 8, 2, card_gib=24, via_start=True)], 80),
        Group("card", [Job("8b-b16-24gb-ladder", "8b", 16, 1, card_gib=24, via_start=True)], 110),
        Group("free", [Job("14b-b2", "14b", 2), Job("14b-b3", "14b", 3), Job("14b-b4", "14b", 4)], 90),
        Group("free", [Job("8b-b18", "8b", 18, steps=1), Job("8b-b19", "8b", 19, steps=1)], 75,
              edge=("8b", CARD_48_MIB)),
        Group("free", [Job("14b-b10", "14b", 10, steps=1), Job("14b-b11", "14b", 11, steps=1)], 75,
              edge=("14b", CARD_48_MIB)),
        Group("card", [Job("8b-b9-24gb", "8b", 9, card_gib=24)], 60),
    ]


def plan_tiny() -> list[Group]:
    """The same paths on the tiny model (CPU): the dry run before any device time is spent."""
    return [
        Group("free", [Job("tiny-b2", "tiny", 2), Job("tiny-b4", "tiny", 4)], 10),
        Group("card", [Job("tiny-b2x2-24gb-start", "tiny", 2, 2, card_gib=24, via_start=True)], 10),
        Group("card", [Job("tiny-b4-24gb", "tiny", 4, card_gib=24)], 10),
        Group("free", [Job("tiny-b6", "tiny", 6, steps=1)], 10, edge=("tiny", CARD_48_MIB)),
    ]


class ProcPeaks:
    """NVML per-process used memory, polled at 20 Hz: the peak of every PID seen, and its argv."""

    def __init__(self) -> None:
        self.peak: dict[int, float] = {}
        self.argv: dict[int, str] = {}
        self.line: dict[int, list[tuple[float, float]]] = {}  # pid -> (wall time, MiB)
        self._stop = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nv, self.h = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception as e:  # noqa: BLE001 - no driver (the CPU dry run): peaks stay empty
            log("NVML unavailable:", e)
            self.nv = None
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self) -> None:
        import psutil

        while self.nv is not None and not self._stop.is_set():
            try:
                for p in self.nv.nvmlDeviceGetComputeRunningProcesses(self.h):
                    mib = (p.usedGpuMemory or 0) / 2**20
                    self.line.setdefault(p.pid, []).append((time.time(), mib))
                    if mib > self.peak.get(p.pid, 0):
                        self.peak[p.pid] = mib
                    if p.pid not in self.argv:
                        try:
                            self.argv[p.pid] = " ".join(psutil.Process(p.pid).cmdline())[:300]
                        except psutil.Error:
                            self.argv[p.pid] = "?"
            except Exception:  # noqa: BLE001 - a failed poll loses one sample, not the run
                pass
            time.sleep(0.05)

    def until(self, pid: int, t: float | None) -> float | None:
        """The peak of `pid` up to wall time t (the end of step 1, say)."""
        got = [m for tt, m in self.line.get(pid, []) if t is None or tt <= t]
        return round(max(got), 1) if got else None

    def of(self, pids: set[int]) -> float | None:
        got = [self.peak[p] for p in pids if p in self.peak]
        return round(max(got), 1) if got else None

    def matching(self, text: str, since: set[int]) -> float | None:
        """The peak of processes whose argv contains `text`, first seen after `since`."""
        got = [v for p, v in self.peak.items() if p not in since and text in self.argv.get(p, "")]
        return round(max(got), 1) if got else None

    def stop(self) -> None:
        self._stop.set()
        self.t.join(timeout=2)


def left(budget: float) -> float:
    return budget - (time.monotonic() - T0)


def save(out: Path) -> None:
    (out / "calibration.json").write_text(json.dumps(RESULTS, indent=1, default=str))


def model_dir(recipe: str) -> Path:
    return WORK / f"{SHAPES[recipe]}-full"


def build_cmd(recipe: str) -> list[str]:
    code = ("import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
            "from bench.gpu_models import build; build(sys.argv[2], None, Path(sys.argv[3]))")
    return [sys.executable, "-c", code, str(ROOT), SHAPES[recipe], str(model_dir(recipe))]


def data_file() -> Path:
    from bench.gpu_models import write_text_data

    p = WORK / f"data-{SEQ}.jsonl"
    if not p.exists():  # every sample longer than seq: each row is truncated to exactly seq
        write_text_data(p, 96, SEQ + 100)
    return p


def job_sets(job: Job, out: Path) -> list[str]:
    """--set overrides on the shipped recipe: this job's batch, a short run, no checkpoints."""
    sets = [f"train.per_device_batch={job.batch}", f"train.grad_accum={job.accum}",
            f"train.max_steps={job.steps}", "train.logging_steps=1", "train.save_steps=100000",
            f"train.output_dir={out}", "supervisor.sample_interval_s=0.5"]
    if job.recipe != "tiny":
        sets += [f"model.name={model_dir(job.recipe)}", f"data.path={data_file()}",
                 "model.attn_implementation=sdpa", f"train.max_seq_len={SEQ}"]
    else:
        sets += [f"data.path={ROOT / 'recipes/data/tiny-chat.jsonl'}", "train.max_seq_len=64"]
    if job.card_gib is not None:
        sets.append(f"hardware.emulate_vram_gib={job.card_gib:g}")
    return sets + job.sets


def estimate_row(job: Job, sets: list[str]) -> dict[str, Any]:
    """What preflight says for this job, on the card it runs on (or a 24 GB one)."""
    from supervisor.preflight.check import estimate
    from supervisor.recipe import load_recipe

    r = load_recipe(ROOT / "recipes" / f"{job.recipe}.toml",
                    [s for s in sets if not s.startswith("hardware.")])
    rep = estimate(r, gpu_mem_gib=job.card_gib or 24, disk_free_gib=1000, host_ram_gib=1000)
    d = rep.to_dict()
    return {"gpu_needed_mib": round(d["gpu_needed_bytes"] / 2**20), "verdict": d["verdict"],
            "allocated_mib": round(d["peak_allocated_bytes"] / 2**20)}


def trainer_env() -> dict[str, str]:
    env = bench_env()
    env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"  # as the recipes' [env] sets it
    return env


def launch_direct(job: Job) -> tuple[subprocess.Popen, Path, Path, list[str]]:
    rdir = WORK / "runs" / job.name
    shutil.rmtree(rdir, ignore_errors=True)
    rdir.mkdir(parents=True)
    sets = job_sets(job, rdir / "out")
    cmd = [sys.executable, "-m", "supervisor.runner.train", "--recipe",
           str(ROOT / "recipes" / f"{job.recipe}.toml"), "--events", str(rdir / "events.jsonl"),
           "--output-dir", str(rdir / "out")] + [x for kv in sets for x in ("--set", kv)]
    p = subprocess.Popen(cmd, cwd=ROOT, env=trainer_env(), stdout=subprocess.DEVNULL,
                         stderr=open(rdir / "stderr.txt", "w"))
    return p, rdir, rdir / "events.jsonl", sets


def summarise(job: Job, rc: int | None, wall: float, events: Path, stderr: str,
              peak: float | None, sets: list[str]) -> dict[str, Any]:
    steps = step_events(events)
    last = steps[-1] if steps else {}
    notices = [e.get("message") for e in read_events(events) if e.get("event") == "notice"]
    card = next((n for n in notices if n and n.startswith("emulating")), None)
    row = {"name": job.name, "recipe": job.recipe, "batch": job.batch, "accum": job.accum,
           "seq": SEQ if job.recipe != "tiny" else 64, "steps_asked": job.steps,
           "card_gib": job.card_gib, "rc": rc, "wall_s": round(wall, 1), "steps": len(steps),
           "oom": "OutOfMemoryError" in stderr or "CUDA out of memory" in stderr,
           "proc_peak_mib": peak, "peak_alloc_mib": last.get("cuda_peak_alloc_mib"),
           "peak_reserved_mib": last.get("cuda_peak_reserved_mib"),
           "tokens_per_s": last.get("tokens_per_s"), "emulation_notice": card,
           "estimate": estimate_row(job, sets), "stderr_tail": stderr[-1200:] if rc else ""}
    log(job.name, "rc", rc, "steps", len(steps), "proc peak", peak, "alloc",
        row["peak_alloc_mib"], "est", row["estimate"]["gpu_needed_mib"], "oom" if row["oom"] else "")
    return row


def run_free(group: Group, peaks: ProcPeaks, budget: float) -> list[dict[str, Any]]:
    """All jobs of the group at once on the whole GPU (each one's peak is its own process's)."""
    started = [(job, launch_direct(job), time.monotonic()) for job in group.jobs]
    rows = []
    for job, launched, t in started:
        row = finish_direct(job, launched, t, peaks, budget)
        first = step_events(launched[2])[:1]
        row["proc_peak_step1_mib"] = peaks.until(launched[0].pid, first[0]["t"]) if first else None
        rows.append(row)
    return rows


def finish_direct(job: Job, launched: tuple[subprocess.Popen, Path, Path, list[str]], t: float,
                  peaks: ProcPeaks, budget: float) -> dict[str, Any]:
    """Wait for a directly launched trainer (killed at the budget) and summarise its run."""
    p, rdir, events, sets = launched
    try:
        rc = p.wait(timeout=max(10, left(budget) - 5))
    except subprocess.TimeoutExpired:
        p.kill()
        rc = p.wait()
    err = (rdir / "stderr.txt").read_text(errors="replace")
    row = summarise(job, rc, time.monotonic() - t, events, err, peaks.of({p.pid}), sets)
    shutil.rmtree(rdir / "out", ignore_errors=True)  # the adapter: disk is short there
    return row


def run_card(job: Job, peaks: ProcPeaks, budget: float) -> dict[str, Any]:
    """One run on a rehearsed card: direct (the trainer's own ballast) or under qlora-watch."""
    seen = set(peaks.peak)
    t = time.monotonic()
    if not job.via_start:
        row = finish_direct(job, launch_direct(job), t, peaks, budget)
        row["ballast_peak_mib"] = peaks.matching("supervisor.runner.ballast", seen)
        return row
    return run_started(job, peaks, budget, seen, t)


def run_started(job: Job, peaks: ProcPeaks, budget: float, seen: set[int], t: float) -> dict[str, Any]:
    """`qlora-watch start --detach`, wait; the run's state, attempts and the supervisor's samples."""
    import sqlite3

    home = WORK / "qlw-home"
    rdir = WORK / "runs" / job.name
    shutil.rmtree(rdir, ignore_errors=True)
    rdir.mkdir(parents=True)
    sets = job_sets(job, rdir / "out")
    env = bench_env(home)
    run_id, err = qlw_start(ROOT / "recipes" / f"{job.recipe}.toml", env, sets, timeout=120)
    if not run_id:
        log(job.name, "start printed no run id:", err[-800:])
        return {"name": job.name, "error": err[-1500:]}
    qlw_wait(run_id, env, max(20, left(budget) - 10), timeout=max(30, left(budget)))
    run = home / "runs" / run_id
    state = json.loads((run / "state.json").read_text())
    samples = load_samples(sqlite3.connect(run / "db.sqlite"))
    gpus = [g for s in samples for g in s.get("gpus", [])]
    attempts = sorted((run / "attempts").iterdir(), key=lambda a: int(a.name))
    by_attempt = {}
    for a in attempts:
        ev = a / "events.jsonl"
        tail = []
        if (a / "exit.json").exists():
            tail = json.loads((a / "exit.json").read_text()).get("tail", [])[-4:]
        by_attempt[a.name] = {"steps": [e.get("step") for e in step_events(ev)],
                              "peak_alloc_mib": (step_events(ev) or [{}])[-1].get("cuda_peak_alloc_mib"),
                              "notices": [e.get("message") for e in read_events(ev)
                                          if e.get("event") == "notice"][:6], "exit_tail": tail}
    db = sqlite3.connect(run / "db.sqlite")
    evs = [(r[0], r[1]) for r in db.execute("SELECT kind, message FROM events ORDER BY id")]
    trainer_peak = peaks.matching("supervisor.runner.train", seen)
    row = {"name": job.name, "recipe": job.recipe, "batch": job.batch, "accum": job.accum,
           "seq": SEQ if job.recipe != "tiny" else 64, "card_gib": job.card_gib, "via": "start",
           "run_id": run_id, "state": state.get("state"), "attempt": state.get("attempt"),
           "rung": state.get("rung"), "wall_s": round(time.monotonic() - t, 1),
           "proc_peak_mib": trainer_peak,
           "ballast_peak_mib": peaks.matching("supervisor.runner.ballast", seen),
           "samples": len(samples),
           "samples_max_proc_mem_mib": max((g.get("proc_mem_mib") or 0 for g in gpus), default=None),
           "samples_max_mem_used_mib": max((g.get("mem_used_mib") or 0 for g in gpus), default=None),
           "samples_mem_total_mib": sorted({g.get("mem_total_mib") for g in gpus if g.get("mem_total_mib")}),
           "attempts": by_attempt, "events": evs[-25:],
           "estimate": estimate_row(job, sets)}
    shutil.rmtree(rdir / "out", ignore_errors=True)
    log(job.name, row["state"], "attempts", row["attempt"], "proc peak", trainer_peak,
        "samples max proc", row["samples_max_proc_mem_mib"], "totals", row["samples_mem_total_mib"])
    return row


def env_info() -> dict[str, Any]:
    info: dict[str, Any] = {}
    for mod in ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "liger_kernel"):
        try:
            m = __import__(mod)
            info[mod] = getattr(m, "__version__", "?")
        except Exception as e:  # noqa: BLE001
            info[mod] = f"n/a ({type(e).__name__})"
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,memory.used",
                          "--format=csv,noheader"], capture_output=True, text=True) \
        if shutil.which("nvidia-smi") else None
    info["nvidia_smi"] = smi.stdout.strip() if smi else None
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        m = pynvml.nvmlDeviceGetMemoryInfo(h, pynvml.nvmlMemory_v2)
        info["nvml_v2_mib"] = {k: round(getattr(m, k) / 2**20, 1) for k in ("total", "reserved", "used", "free")}
    except Exception as e:  # noqa: BLE001
        info["nvml_v2_mib"] = f"n/a ({type(e).__name__})"
    return info


def table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'run':24} {'card':>5} {'result':>10} {'proc peak':>10} {'alloc':>8} {'estimate':>9} {'err':>7}"]
    for r in rows:
        est = (r.get("estimate") or {}).get("gpu_needed_mib")
        peak = r.get("proc_peak_mib")
        result = r.get("state") or ("OOM" if r.get("oom") else ("ok" if r.get("rc") == 0 else f"rc {r.get('rc')}"))
        err = f"{100 * (est - peak) / peak:+.1f}%" if est and peak else ""
        lines.append(f"{r['name']:24} {r.get('card_gib') or '-':>5} {result:>10} {peak or '-':>10} "
                     f"{r.get('peak_alloc_mib') or '-':>8} {est or '-':>9} {err:>7}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--budget-s", type=float, default=540)
    ap.add_argument("--plan", choices=("full", "tiny"), default="full")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    WORK.mkdir(parents=True, exist_ok=True)
    RESULTS["env"] = env_info()
    log(RESULTS["env"])
    save(args.out)
    groups = plan_full() if args.plan == "full" else plan_tiny()
    peaks = ProcPeaks()
    builder: subprocess.Popen | None = None
    built: set[str] = set()
    try:
        for gi, group in enumerate(groups):
            group = resolve_edge(group, RESULTS["rows"])
            if left(args.budget_s) < group.need_s:
                log(f"group {gi} skipped: {left(args.budget_s):.0f} s left, needs {group.need_s:.0f}")
                RESULTS.setdefault("skipped", []).append([j.name for j in group.jobs])
                continue
            needs = {j.recipe for j in group.jobs} - {"tiny"} - built
            for r in sorted(needs):  # a model this group needs: wait for (or do) its build
                if builder is not None and builder.args[-1] == str(model_dir(r)):
                    builder.wait()
                    builder = None
                else:
                    subprocess.run(build_cmd(r), check=True, cwd=ROOT)
                built.add(r)
                log("built", r)
            if group.build and group.build not in built and builder is None:
                builder = subprocess.Popen(build_cmd(group.build), cwd=ROOT)
            if group.kind == "free":
                RESULTS["rows"] += run_free(group, peaks, args.budget_s)
            else:
                RESULTS["rows"] += [run_card(j, peaks, args.budget_s) for j in group.jobs]
            save(args.out)
    except Exception:  # noqa: BLE001 - keep what finished
        import traceback

        RESULTS["error"] = traceback.format_exc()[-3000:]
        log("failed:", RESULTS["error"])
    finally:
        peaks.stop()
        if builder is not None:
            builder.kill()
        save(args.out)
    print(table(RESULTS["rows"]), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

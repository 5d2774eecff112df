"""A realistic synthetic run store for the report: an 8B run on a 24 GB card with an OOM relaunch
(OOM ladder rung 1, max_seq_len 4096 -> 768, resumed from checkpoint-200) and a thermal
throttle period. Shared by tests/unit/test_report.py and the docs/report.png screenshot:

    python -m tests.support.report_run /tmp/qlw-demo   # writes /tmp/qlw-demo/report/report.html
    chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1200,1600 \
        --screenshot=docs/report.png file:///tmp/qlw-demo/report/report.html
"""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path
from typing import Any

from supervisor.recipe import apply_rung, load_recipe, recipe_to_json
from supervisor.records import Event, GpuSample, HostSample, Sample, Step
from supervisor.store import atomic_write, create_run
from tests.support import ROOT

T0 = 1767258000.0  # 2026-01-01 09:00 UTC
MIB_PER_GIB = 1024


def _lr(step: int, max_steps: int, peak: float = 2e-4, warmup: float = 0.03) -> float:
    w = max(1, int(max_steps * warmup))
    if step < w:
        return peak * step / w
    return 0.5 * peak * (1 + math.cos(math.pi * (step - w) / max(1, max_steps - w)))


def _loss(rng: random.Random, step: int) -> float:
    return 0.95 + 1.15 * math.exp(-step / 180) + rng.gauss(0, 0.06)


class _Builder:
    """Accumulates samples, steps, events and trainer lines along a simulated clock."""

    def __init__(self, seed: int, gpu: bool, sample_s: float):
        self.rng = random.Random(seed)
        self.gpu, self.sample_s = gpu, sample_s
        self.samples: list[Sample] = []
        self.steps: list[Step] = []
        self.events: list[Event] = []
        self.trainer_lines: dict[int, list[dict[str, Any]]] = {}
        self.next_sample = T0

    def event(self, t: float, kind: str, message: str, level: str = "info", attempt: int | None = None,
              **kw: Any) -> None:
        self.events.append(Event(t=t, kind=kind, level=level, message=message, attempt=attempt, **kw))

    def sample_until(self, t_end: float, mode: str, vram_gib: float = 0.5, hot: bool = False) -> None:
        """1 sample per sample_s up to t_end; mode is idle, loading or training."""
        r = self.rng
        while self.next_sample < t_end:
            t = self.next_sample
            self.next_sample += self.sample_s
            host = HostSample(mem_total_mib=64 * MIB_PER_GIB, swap_used_mib=0.0, disk_free_gib=612.0,
                              disk_total_gib=1863.0, cpu_pct=9.0 + r.gauss(0, 1))
            busy = mode == "training"
            host.trainer_rss_mib = (14.2 if busy else 6.0 if mode == "loading" else 0.0) * MIB_PER_GIB
            host.mem_available_mib = (64 - 11.5 - host.trainer_rss_mib / MIB_PER_GIB + r.gauss(0, 0.2)) * MIB_PER_GIB
            gpus = []
            if self.gpu:
                g = GpuSample(index=0, name="NVIDIA GeForce RTX 4090", mem_total_mib=24564.0,
                              power_limit_w=450.0, sm_clock_max_mhz=2790.0, slowdown_c=90.0,
                              shutdown_c=95.0, throttle_mask=0, throttle_reasons=[])
                g.util_pct = min(100.0, 97 + r.gauss(0, 2)) if busy else (25.0 if mode == "loading" else 0.0)
                g.mem_used_mib = (vram_gib + (r.gauss(0, 0.15) if busy else 0)) * MIB_PER_GIB
                g.power_w = 432 + r.gauss(0, 8) if busy else (120.0 if mode == "loading" else 28.0)
                g.temp_c = 74 + r.gauss(0, 0.7) if busy else 45.0
                g.sm_clock_mhz = 2520 + r.gauss(0, 15) if busy else 210.0
                if hot:
                    g.temp_c, g.sm_clock_mhz, g.power_w = 84 + r.gauss(0, 0.5), 2130 + r.gauss(0, 25), 405.0
                    g.throttle_mask, g.throttle_reasons = 0x60, ["sw thermal slowdown", "hw thermal slowdown"]
                g.hotspot_c = g.temp_c + (15.5 if hot else 11.0)
                g.mem_temp_c = g.temp_c + (10.0 if hot else 6.0)
                g.margin_c = 90.0 - g.temp_c
                gpus.append(g)
            self.samples.append(Sample(t=t, gpus=gpus, host=host,
                                       nvml="ok" if self.gpu else "unavailable: NVML Shared Library Not Found"))

    def train(self, attempt: int, t: float, first: int, last: int, max_steps: int, step_s: float,
              tokens_per_step: int, vram_gib: float, tokens0: int, nan_at: set[int],
              hot: tuple[float, float] | None = None) -> tuple[float, int]:
        """Steps first..last logged every 5 (and step 1); returns (time, tokens) after the last."""
        r = self.rng
        tokens = tokens0
        lines = self.trainer_lines.setdefault(attempt, [])
        for step in range(first, last + 1):
            throttled = hot is not None and hot[0] <= t < hot[1]
            dt = step_s * (1.22 if throttled else 1.0) * (1 + r.gauss(0, 0.02))
            self.sample_until(t + dt, "training", vram_gib, hot=throttled)
            t += dt
            tokens += tokens_per_step
            if step % 5 and step != 1 and step != last:
                continue
            loss = float("nan") if step in nan_at else _loss(r, step)
            st = Step(t=t, step=step, attempt=attempt, loss=loss,
                      grad_norm=abs(0.35 + r.gauss(0, 0.05)) * (3.0 if step < 15 else 1.0),
                      lr=_lr(step, max_steps), epoch=2.0 * step / max_steps, tokens=tokens,
                      tokens_per_s=tokens_per_step / dt, step_time_s=dt, max_steps=max_steps)
            self.steps.append(st)
            lines.append({"t": t, "event": "step", **{k: v for k, v in st.__dict__.items() if k not in ("t", "attempt")}})
            if step % 100 == 0:
                self.event(t + 4, "checkpoint_saved", f"checkpoint-{step} saved (672.4 MB)", attempt=attempt,
                           evidence={"step": step, "bytes": 672_400_000})
        return t, tokens


def build_run(runs_dir: Path, *, oom: bool = True, throttle: bool = True, gpu: bool = True,
              max_steps: int = 1200, nan_at: set[int] | None = None, seed: int = 7,
              sample_s: float = 10.0, output_dir: Path | None = None, overrides: tuple[str, ...] = ()) -> Path:
    """Write a finished run into runs_dir through the RunStore API; returns its folder."""
    base = load_recipe(ROOT / "recipes" / "8b.toml", [f"train.max_steps={max_steps}", *overrides])
    out = output_dir or runs_dir.parent / "outputs" / "8b"
    store = create_run(runs_dir, {"recipe": base.name, "model": base.model.name, "output_dir": str(out),
                                  "recipe_path": str(ROOT / "recipes" / "8b.toml"), "cwd": str(ROOT)})
    info = json.loads((store.path / "run.json").read_text())
    info["created_at"] = T0
    atomic_write(store.path / "run.json", json.dumps(info, indent=1))
    (store.path / "recipe.json").write_text(recipe_to_json(base))
    b = _Builder(seed, gpu, sample_s)
    nan_at = nan_at or set()
    recipes = [base] + ([apply_rung(base, base.oom_ladder[0])] if oom else [])
    t, tokens, step = T0 + 2, 0, 0
    exits: list[tuple[float, float, int]] = []
    for i, recipe in enumerate(recipes, start=1):
        launched = t
        resume = "checkpoint-200" if i > 1 else None
        b.event(t, "launch", f"attempt {i} started" + (f" from {resume}" if resume else "") + " (pid 41233)",
                attempt=i, evidence={"resume": f"{out}/{resume}" if resume else None, "rung": 1 if i > 1 else None,
                                     "rung_label": "rung 1" if i > 1 else "base"})
        b.event(t + 1, "phase", "trainer phase: loading_model", attempt=i)
        b.sample_until(t + 150, "loading")
        t += 150
        b.event(t, "phase", "trainer phase: training", attempt=i)
        seq = recipe.train.max_seq_len
        tps_step = 16 * int(seq * (0.71 if seq > 1024 else 0.97))
        step_s = tps_step / 2600.0
        vram = 22.1 if seq > 1024 else 17.3
        last = min(230, max_steps) if (oom and i == 1) else max_steps
        hot = (t + 1500, t + 2700) if (throttle and i == len(recipes)) else None
        if hot:
            b.event(hot[0] + 60, "guard", "GPU 0 is thermally throttled (sw thermal slowdown, hw thermal "
                    "slowdown; SM 2130/2790 MHz); tokens/s fell 18 % (2,600 -> 2,130) while throttled",
                    level="warning", attempt=i, guard="thermal")
        first = 201 if i > 1 else 1
        t, tokens = b.train(i, t, first, last, max_steps, step_s, tps_step, vram,
                            tokens if i == 1 else 200 * 16 * int(4096 * 0.71), nan_at, hot)
        step = last
        if oom and i == 1:
            t += 6
            b.event(t, "trainer_exited", "attempt 1 exited: cuda_oom: CUDA out of memory (torch.OutOfMemoryError)",
                    level="error", attempt=1, evidence={"returncode": 1, "signal": None, "class": "cuda_oom"})
            b.event(t + 0.1, "relaunch", "CUDA OOM at base settings; relaunching at rung 1 (max_seq_len "
                    "4096 -> 768), resuming from checkpoint-200", level="warning", attempt=1, guard="relaunch")
            exits.append((launched, t, 1))
            b.sample_until(t + 20, "idle")
            t += 20
        else:
            b.event(t + 2, "phase", "trainer phase: saving", attempt=i)
            b.event(t + 30, "finished", f"adapter saved to {out}/adapter", attempt=i)
            t += 32
            b.event(t, "trainer_exited", f"attempt {i} exited: completed", attempt=i,
                    evidence={"returncode": 0, "signal": None, "class": "completed"})
            exits.append((launched, t, 0))
            b.sample_until(t + 30, "idle")
    for i, recipe in enumerate(recipes, start=1):
        adir = store.attempt_dir(i)
        adir.mkdir(parents=True, exist_ok=True)
        (adir / "recipe.json").write_text(recipe_to_json(recipe))
        started, ended, rc = exits[i - 1]
        (adir / "exit.json").write_text(json.dumps({"returncode": rc, "signal": None, "started_at": started,
                                                    "ended_at": ended, "tail": []}))
        (adir / "events.jsonl").write_text("".join(json.dumps(x) + "\n" for x in b.trainer_lines.get(i, [])))
    store.add_samples(b.samples)
    for i in range(1, len(recipes) + 1):  # attempt 2's rows replace attempt 1's redone steps
        store.add_steps([s for s in b.steps if s.attempt == i], lineage=1)
    for ev in sorted(b.events, key=lambda e: e.t):
        store.add_event(ev)
    last_loss = next((s.loss for s in reversed(b.steps) if s.loss == s.loss), None)
    store.write_state({"state": "completed", "message": "training finished", "run_id": store.run_id,
                       "attempt": len(recipes), "lineage": 1, "rung": 1 if oom else None,
                       "output_dir": str(out), "adapter_path": f"{out}/adapter", "step": step,
                       "max_steps": max_steps, "last_loss": last_loss, "started_at": T0, "ended_at": t})
    store.close()
    return store.path


def main(argv: list[str]) -> int:
    from supervisor.report.html import generate_report

    out = Path(argv[0] if argv else "report-demo").resolve()
    run = build_run(out / "runs")
    other = build_run(out / "runs", oom=False, throttle=False, seed=11, output_dir=out / "outputs" / "8b-768",
                      overrides=("train.max_seq_len=768",))
    print(generate_report(run, out / "report"))
    print(generate_report(run, out / "report-compare", other))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

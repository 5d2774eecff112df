"""Deterministic recorded runs for tests, screenshots and the benchmark.

    python -m tests.fakes.tui_scenarios tests/fixtures     # writes recorded_run_<scenario>.json

A recording is {"run", "state", "samples", "steps", "events", "log", "live"}: what
AsyncRunClient.connect() returns plus the live messages that follow. Fixed timestamps and a
seeded generator: the same call gives the same bytes.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

from supervisor.records import Event, to_dict
from tests.fakes.tui_synth import LOAD_S, T0, Plan, sample_at, step_history, step_record

SCENARIOS = ("training", "throttling", "oom_relaunch", "completed", "no_gpu")
RUNG_DESC = "max_seq_len 1024 -> 768 after OOM"

__all__ = ["SCENARIOS", "Plan", "build", "plan_for", "write_all"]


def _event(
    t: float,
    kind: str,
    message: str,
    level: str = "info",
    acked: bool = False,
    guard: str | None = None,
    attempt: int = 1,
    **evidence: Any,
) -> dict[str, Any]:
    return to_dict(
        Event(
            t=t,
            kind=kind,
            level=level,
            message=message,
            guard=guard,
            evidence=evidence,
            attempt=attempt,
            acked=acked,
        )
    )


def _events(plan: Plan, now: float, out_dir: str) -> list[dict[str, Any]]:
    """The events so far for the scenario."""
    ev = [
        _event(T0 + 2, "phase", "loading_model"),
        _event(T0 + 9, "notice", "flash-attn not installed; using sdpa"),
        _event(T0 + LOAD_S, "phase", "training"),
    ]
    if plan.scenario == "oom_relaunch":
        t_oom = T0 + LOAD_S + 437 * plan.step_time_s
        ev += [
            _event(
                T0 + LOAD_S + 400 * plan.step_time_s,
                "checkpoint_saved",
                "checkpoint-400 saved (0.5 GiB)",
                step=400,
            ),
            _event(
                t_oom,
                "trainer_exited",
                "CUDA out of memory at step 437 (tried to allocate 2.00 GiB)",
                level="error",
                exit_code=1,
                step=437,
                classified="cuda_oom",
            ),
            _event(
                t_oom + 5,
                "relaunch",
                f"relaunching attempt 2 from checkpoint-400: {RUNG_DESC}",
                level="warning",
                attempt=2,
                rung=1,
                resume=f"{out_dir}/checkpoint-400",
            ),
        ]
        return _numbered(ev)
    for n in range(1000, plan.step + 1, 1000):
        t = (
            T0 + LOAD_S + n * plan.step_time_s + 20 if n < plan.step else now - 95
        )  # the last: before "finished"
        ev.append(_event(t, "checkpoint_saved", f"checkpoint-{n} saved (0.5 GiB)", step=n))
    if plan.scenario == "throttling":
        ev.append(
            _event(
                now - 30,
                "guard",
                "GPU 0 thermal throttling for 120 s: SM 1410/1980 MHz, tokens/s -27%",
                level="warning",
                guard="thermal",
                gpu=0,
                temp_c=87,
                margin_c=2.0,
                throttle_s=120,
                tokens_per_s_drop_pct=27,
            )
        )
    if plan.scenario == "completed":
        ev.append(
            _event(
                T0 + 3 * 3600,
                "guard",
                "host RAM headroom below 10% for 60 s",
                level="warning",
                acked=True,
                guard="host_ram",
                available_mib=24_100,
                needed_mib=6_144,
            )
        )
        ev.append(
            _event(
                now - 90,
                "finished",
                f"training finished: adapter at {out_dir}/adapter",
                step=plan.step,
            )
        )
        ev.append(_event(now - 88, "phase", "finished"))
    return _numbered(ev)


def _numbered(ev: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The store numbers events as they happen: ids 1..n in time order."""
    ev.sort(key=lambda e: e["t"])
    for i, e in enumerate(ev, 1):
        e["id"] = i
    return ev


def _log(plan: Plan, steps: list[dict[str, Any]]) -> list[str]:
    """The trainer log tail: HF-style metric dicts, a tqdm bar, and hostile escapes."""
    lines = [
        "Loading checkpoint shards: 100%|##########| 4/4 [00:41<00:00, 10.3s/it]",
        "flash-attn not installed; using sdpa",
        "\x1b]0;pwned-title\x07\x1b[2J\x1b]52;c;ZWNobyBoaQ==\x07trainer: escapes above were stripped",
    ]
    for s in steps[-40:]:
        lines.append(
            f"{{'loss': {s['loss']}, 'grad_norm': {s['grad_norm']}, 'learning_rate': {s['lr']:.3e}, "
            f"'epoch': {s['epoch']}}}"
        )
        lines.append(
            f" {100 * s['step'] // plan.max_steps:3d}%|####      | {s['step']}/{plan.max_steps}\r"
        )
    if plan.scenario == "oom_relaunch":
        lines += [
            "Traceback (most recent call last):",
            "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 139.80 GiB",
            "[qlora-watch] attempt 2: resuming from checkpoint-400 with train.max_seq_len=768",
        ] + lines[-6:]
    if plan.scenario == "completed":
        lines += [
            "{'train_runtime': 64150.2, 'train_samples_per_second': 2.49, 'train_loss': 1.021}",
            "adapter saved",
        ]
    return lines


def build(plan: Plan) -> dict[str, Any]:
    """The recorded run for `plan`."""
    rng = random.Random(plan.seed)
    slowdown = 1.3 if plan.scenario == "oom_relaunch" else 1.0
    now = T0 + LOAD_S + plan.step * plan.step_time_s * slowdown
    if plan.scenario == "oom_relaunch":
        now += 437 * plan.step_time_s + 2 * LOAD_S - 400 * plan.step_time_s * slowdown
    if plan.scenario == "completed":
        now += 90
    run_id = {
        "training": "amber-falcon",
        "throttling": "copper-heron",
        "oom_relaunch": "quiet-otter",
        "completed": "silver-lynx",
        "no_gpu": "tiny-wren",
    }.get(plan.scenario, "amber-falcon")
    out_dir = f"/data/runs/{run_id}/output"
    steps = step_history(rng, plan)
    samples = [
        sample_at(rng, plan, now - plan.history_s + 1 + i, now, 14_600 + i * 0.01)
        for i in range(plan.history_s)
    ]
    last = steps[-1] if steps else {}
    state_name = "completed" if plan.scenario == "completed" else "training"
    attempt = 2 if plan.scenario == "oom_relaunch" else 1
    tps = last.get("tokens_per_s")
    left = plan.max_steps - plan.step
    state = {
        "run_id": run_id,
        "state": state_name,
        "attempt": attempt,
        "rung": 1 if attempt == 2 else None,  # rung 1: the first ladder change
        "rung_desc": RUNG_DESC if attempt == 2 else None,
        "started_at": T0,
        "updated_at": now,
        "step": plan.step,
        "max_steps": plan.max_steps,
        "last_loss": last.get("loss"),
        "tokens_per_s": tps,
        "eta_s": None
        if state_name == "completed"
        else round(left * plan.tokens_per_step / tps)
        if tps
        else None,
        "message": "training finished" if state_name == "completed" else "",
        "trainer_pid": None if state_name == "completed" else 41_872,
        "exit_code": 0 if state_name == "completed" else None,
        "host_ram_needed_mib": 6_144,
        "next_checkpoint_bytes": 536_870_912,
    }
    model = "meta-llama/Llama-3.1-8B-Instruct"
    recipe = "llama-3.1-8b"
    if plan.scenario == "no_gpu":
        model, recipe = "qlw/tiny-llama-2m", "tiny-cpu"
    run = {
        "run_id": run_id,
        "recipe": recipe,
        "recipe_name": recipe,
        "recipe_path": f"/home/ml/recipes/{recipe}.toml",
        "model": model,
        "created_at": T0 - 5,
        "output_dir": out_dir,
        "max_steps": plan.max_steps,
    }
    rec = {
        "run": run,
        "state": state,
        "samples": samples,
        "steps": steps,
        "events": _events(plan, now, out_dir),
        "log": _log(plan, steps),
    }
    rec["live"] = [] if state_name == "completed" else _live(rng, plan, now, state, attempt)
    return rec


def _live(
    rng: random.Random, plan: Plan, now: float, state: dict[str, Any], attempt: int
) -> list[dict[str, Any]]:
    """What follows the snapshot: samples at sample_hz, a step (and its log line) every log_every steps."""
    out: list[dict[str, Any]] = []
    n_samples = int(plan.live_s * plan.sample_hz)
    step, next_step_t = (
        plan.step,
        now + 4.0,
    )  # the first step record lands 4 s in: tests wait little
    slow = 0.73 if plan.scenario == "throttling" else 1.0
    for i in range(1, n_samples + 1):
        t = now + i / plan.sample_hz
        out.append({"type": "sample", "sample": sample_at(rng, plan, t, now + plan.live_s, 14_600)})
        if t >= next_step_t:
            step += plan.log_every
            s = step_record(rng, plan, step, t, attempt, slow)
            out.append({"type": "step", "step": s})
            out.append(
                {
                    "type": "log",
                    "lines": [f"{{'loss': {s['loss']}, 'grad_norm': {s['grad_norm']}}}"],
                }
            )
            next_step_t = t + plan.log_every * plan.step_time_s
        if i % int(30 * plan.sample_hz) == 0:
            out.append({"type": "state", "state": {**state, "step": step, "updated_at": t}})
    return out


def plan_for(scenario: str) -> Plan:
    """The plan behind the committed recording of `scenario`."""
    step = {"completed": 10_000, "oom_relaunch": 612}.get(scenario, 2500)
    return Plan(scenario=scenario, step=step)


def write_all(folder: str | Path) -> list[Path]:
    """Write recorded_run_<scenario>.json for every scenario into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in SCENARIOS:
        plan = plan_for(name)
        path = folder / f"recorded_run_{name}.json"
        path.write_text(json.dumps(build(plan), separators=(",", ":")) + "\n")
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in write_all(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures"):
        print(p, p.stat().st_size)

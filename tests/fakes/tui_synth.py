"""Synthetic readings for recorded runs: an H200's telemetry, a QLoRA loss curve, step records.

Seeded and clock-free: the same plan and generator state give the same numbers.
"""

from __future__ import annotations

import dataclasses
import math
import random
from typing import Any

from supervisor.records import GpuSample, HostSample, Sample, Step, to_dict

T0 = 1767225600.0  # 2026-01-01 00:00:00 UTC: the run starts here
LOAD_S = 150.0  # model loading and tokenising before step 1


@dataclasses.dataclass
class Plan:
    """The shape of one recorded run."""

    scenario: str
    step: int = 2500  # steps done at the snapshot
    max_steps: int = 10_000
    step_time_s: float = 6.4
    tokens_per_step: int = 16_384
    log_every: int = 10  # a step record every this many steps
    history_s: int = 180  # seconds of 1 Hz samples in the snapshot
    live_s: int = 70  # seconds of live messages after it
    sample_hz: float = 1.0  # live sample rate
    seed: int = 7


def gpu_reading(rng: random.Random, plan: Plan, t: float, now: float) -> dict[str, Any]:
    """One H200's readings for the plan's scenario at time t."""
    g = GpuSample(
        index=0,
        name="NVIDIA H200",
        uuid="GPU-5f1c2a9e-0000-4000-8000-000000000000",
        util_pct=round(min(100.0, 96 + rng.gauss(0, 2)), 1),
        mem_util_pct=round(61 + rng.gauss(0, 3), 1),
        mem_used_mib=round(101_240 + rng.gauss(0, 300)),
        mem_total_mib=143_771,
        temp_c=round(68 + rng.gauss(0, 0.8)),
        hotspot_c=None,
        hotspot_reason="driver 580 does not report it",
        margin_c=None,
        slowdown_c=89,
        shutdown_c=95,
        mem_temp_c=round(61 + rng.gauss(0, 0.5)),
        power_w=round(640 + rng.gauss(0, 15), 1),
        power_limit_w=700,
        sm_clock_mhz=1980,
        sm_clock_max_mhz=1980,
        throttle_mask=0,
        pcie_tx_kbs=round(210_000 + rng.gauss(0, 5000)),
        pcie_rx_kbs=round(95_000 + rng.gauss(0, 3000)),
        proc_mem_mib=97_312,
    )
    if plan.scenario == "throttling" and t > now - 150:
        # The last 150 s: hot and clocked down by both thermal slowdowns.
        g.temp_c, g.mem_temp_c = round(87 + rng.gauss(0, 0.4)), 79
        g.sm_clock_mhz, g.power_w = round(1410 + rng.gauss(0, 20)), round(520 + rng.gauss(0, 10), 1)
        g.util_pct = round(min(100.0, 98 + rng.gauss(0, 1)), 1)
        g.throttle_mask = 0x20 | 0x40
        g.throttle_reasons = ["SwThermalSlowdown", "HwThermalSlowdown"]
        g.throttle_counters = {"HwThermalSlowdown": int((t - now + 150) * 1e9)}
    elif plan.scenario == "completed" and t > now - 90:
        # Training finished 90 s before the snapshot: the GPU idles with its memory freed.
        g.util_pct, g.mem_util_pct, g.mem_used_mib, g.proc_mem_mib = 0.0, 0.0, 512, None
        g.temp_c, g.power_w, g.sm_clock_mhz = 41, 92.0, 345
        g.throttle_mask, g.throttle_reasons = 0x1, ["GpuIdle"]
    g.margin_c = round(89 - (g.temp_c or 0), 1)
    return to_dict(g)


def sample_at(rng: random.Random, plan: Plan, t: float, now: float, rss: float) -> dict[str, Any]:
    """One telemetry sample (GPU and host) at time t."""
    host = HostSample(
        mem_total_mib=257_580,
        mem_available_mib=round(182_400 + rng.gauss(0, 400)),
        swap_used_mib=0,
        trainer_rss_mib=round(rss),
        trainer_uvm_mib=1_124,
        cpu_pct=round(11 + rng.gauss(0, 1.5), 1),
        disk_free_gib=812.4,
        disk_total_gib=1862.0,
        oom_kill_count=0,
    )
    if plan.scenario == "no_gpu":
        s = Sample(t=t, gpus=[], host=host, nvml="unavailable: NVML library not found")
        host.trainer_uvm_mib = None
        return to_dict(s)
    return {"t": t, "gpus": [gpu_reading(rng, plan, t, now)], "host": to_dict(host), "nvml": "ok"}


def loss_at(rng: random.Random, step: int) -> float:
    """A QLoRA-looking loss curve: fast drop, slow tail, noise, a rare spike."""
    base = 0.92 + 1.55 * math.exp(-step / 380) + 0.25 * math.exp(-step / 4000)
    spike = 0.6 if rng.random() < 0.004 else 0.0
    return round(base + rng.gauss(0, 0.06) + spike, 4)


def lr_at(step: int, max_steps: int) -> float:
    """Linear warmup for 100 steps, then cosine to zero."""
    if step < 100:
        return 2e-4 * step / 100
    return 2e-4 * 0.5 * (1 + math.cos(math.pi * (step - 100) / max(1, max_steps - 100)))


def step_record(
    rng: random.Random, plan: Plan, n: int, t: float, attempt: int, slow: float
) -> dict[str, Any]:
    """One step record."""
    tps = plan.tokens_per_step / plan.step_time_s * slow * (1 + rng.gauss(0, 0.01))
    return to_dict(
        Step(
            t=t,
            step=n,
            attempt=attempt,
            loss=loss_at(rng, n),
            grad_norm=round(0.28 + 0.6 * math.exp(-n / 600) + abs(rng.gauss(0, 0.05)), 4),
            lr=lr_at(n, plan.max_steps),
            epoch=round(n / 3125, 4),
            tokens=n * plan.tokens_per_step,
            tokens_per_s=round(tps, 1),
            step_time_s=round(plan.step_time_s / slow, 3),
            max_steps=plan.max_steps,
        )
    )


def step_history(rng: random.Random, plan: Plan) -> list[dict[str, Any]]:
    """The step history; the OOM scenario has attempt 1 to step 437, then attempt 2 from 400."""
    out = []
    now = T0 + LOAD_S + plan.step * plan.step_time_s
    if plan.scenario == "oom_relaunch":
        for n in range(plan.log_every, 438, plan.log_every):
            out.append(step_record(rng, plan, n, T0 + LOAD_S + n * plan.step_time_s, 1, 1.0))
        resumed = T0 + LOAD_S + 437 * plan.step_time_s + 2 * LOAD_S
        for n in range(400 + plan.log_every, plan.step + 1, plan.log_every):
            out.append(
                step_record(rng, plan, n, resumed + (n - 400) * plan.step_time_s * 1.3, 2, 1 / 1.3)
            )
        return out
    for n in range(plan.log_every, plan.step + 1, plan.log_every):
        t = T0 + LOAD_S + n * plan.step_time_s
        slow = 0.73 if plan.scenario == "throttling" and t > now - 150 else 1.0
        out.append(step_record(rng, plan, n, t, 1, slow))
    return out

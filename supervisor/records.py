"""The data that flows through qlora-watch: samples and steps (facts), events, actions.

Plain dataclasses with no dependencies, shared by telemetry, the core, the guards, the run
store and the socket protocol. Every field that a sensor may fail to read is Optional:
None means "not available" (the TUI says "n/a").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# ------------------------------------------------------------------------------ telemetry


@dataclass
class GpuSample:
    index: int
    name: str | None = None
    uuid: str | None = None
    util_pct: float | None = None
    mem_util_pct: float | None = None
    mem_used_mib: float | None = None
    mem_total_mib: float | None = None
    temp_c: float | None = None
    hotspot_c: float | None = None
    hotspot_reason: str | None = None  # why hotspot is n/a ("driver 580 does not report it")
    margin_c: float | None = None  # degrees to the nearest slowdown threshold (T.Limit)
    slowdown_c: float | None = None
    shutdown_c: float | None = None
    mem_temp_c: float | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    sm_clock_mhz: float | None = None
    sm_clock_max_mhz: float | None = None
    throttle_mask: int | None = None
    throttle_reasons: list[str] = field(default_factory=list)
    # cumulative throttle time counters (ns), keyed by reason name
    throttle_counters: dict[str, int] = field(default_factory=dict)
    pcie_tx_kbs: float | None = None
    pcie_rx_kbs: float | None = None
    proc_mem_mib: float | None = None  # the trainer's processes on this GPU
    others_mem_mib: float | None = None  # other processes on this GPU (another job, another user)
    this_run: bool = True  # in the trainer's CUDA_VISIBLE_DEVICES (telemetry/visible.py)
    lost: bool = False


@dataclass
class HostSample:
    mem_total_mib: float | None = None
    mem_available_mib: float | None = None
    cgroup_limit_mib: float | None = None
    cgroup_used_mib: float | None = None
    swap_used_mib: float | None = None
    trainer_rss_mib: float | None = None
    trainer_uvm_mib: float | None = None  # /dev/nvidia-uvm mapping: paged optimiser state
    trainer_partial: bool = False  # some processes could not be read
    cpu_pct: float | None = None
    disk_free_gib: float | None = None
    disk_total_gib: float | None = None
    oom_kill_count: int | None = None  # host-wide, /proc/vmstat
    cgroup_oom_kill_count: int | None = None  # the trainer's cgroup (memory.events / oom_control)


@dataclass
class Sample:
    t: float  # wall clock (seconds since the epoch) when taken
    gpus: list[GpuSample] = field(default_factory=list)
    host: HostSample = field(default_factory=HostSample)
    nvml: str = "ok"  # "ok" | "unavailable: <reason>" | "lost"


# ------------------------------------------------------------------------------ training


@dataclass
class Step:
    """One logged training step, from the trainer's JSON-lines event stream."""

    t: float
    step: int
    attempt: int = 1
    loss: float | None = None
    grad_norm: float | None = None
    lr: float | None = None
    epoch: float | None = None
    tokens: int | None = None  # tokens seen so far
    tokens_per_s: float | None = None
    step_time_s: float | None = None
    max_steps: int | None = None


@dataclass
class Event:
    """Something that happened, for the events panel, `status` and notifications.

    kind examples: phase, checkpoint_saved, checkpoint_pruned, trainer_exited, relaunch,
    guard (with guard=name), state, notify_failed.
    """

    t: float
    kind: str
    level: str = "info"  # info | warning | error
    message: str = ""
    guard: str | None = None
    evidence: dict[str, Any] = field(default_factory=dict)
    attempt: int | None = None
    id: int | None = None  # assigned by the run store
    acked: bool = False


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def step_from_dict(d: dict[str, Any]) -> Step:
    known = {f.name for f in dataclasses.fields(Step)}
    return Step(**{k: v for k, v in d.items() if k in known})

"""The data that flows through qlora-watch: samples and steps (facts), events, actions.

Plain dataclasses with no dependencies, shared by telemetry, the core, the guards, the run
store and the socket protocol. Every field that a sensor may fail to read is Optional:
None means "not available" (the TUI says "n/a").
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from supervisor.numbers import num

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

    @classmethod
    def from_trainer(cls, obj: dict[str, Any], attempt: int) -> Step | None:
        """The one translator of a trainer's step record (events.jsonl line, HF log dict,
        log_history entry) into a Step: garbage values become None, never exceptions; None
        when it has no step number. t defaults to now."""
        try:
            step = int(obj["step"])
        except (KeyError, TypeError, ValueError, OverflowError):
            return None
        floats = {k: num(obj.get(k)) for k in ("loss", "grad_norm", "lr", "epoch", "tokens_per_s", "step_time_s")}
        ints = {}
        for k in ("tokens", "max_steps"):
            v = num(obj.get(k))
            ints[k] = int(v) if v is not None and v == v and abs(v) < 1e18 else None
        return cls(t=num(obj.get("t")) or time.time(), step=step, attempt=attempt, **floats, **ints)


class EventKind(StrEnum):
    """What an event says happened: past facts, one tense. The values are what the run store,
    the socket protocol and the notifications carry (unchanged from the string kinds of stored
    runs); a StrEnum member *is* its string, so either compares equal."""

    # the trainer and its attempts
    LAUNCHED = "launch"  # an attempt started
    ADOPTED = "adopted"  # a new supervisor took over a running (or ended) attempt
    TRAINER_LOST = "lost"  # the trainer cannot be verified: gone or its pid reused
    STRAYS_STOPPED = "stray"  # trainer groups nobody tracked were killed
    CONFIG_REWRITTEN = "config_rewritten"  # the attempt runs with a copy of its config
    PHASE_CHANGED = "phase"  # the trainer said which phase it is in
    TRAINER_NOTED = "notice"  # the trainer sent a notice
    TRAINING_FINISHED = "finished"  # the trainer saved the adapter
    TRAINER_EXITED = "trainer_exited"  # an attempt ended (classified)
    RELAUNCH_SCHEDULED = "relaunch"  # a guard decided on the next attempt
    RESUME_REQUESTED = "resume"  # `qlora-watch resume` asked for the next attempt
    STOP_SENT = "stop"  # a stop signal went to the trainer's group
    RUN_FAILED = "failed"  # the run ended in FAILED
    CONFIG_REJECTED = "config_error"  # the recipe, data or command cannot run: not retried
    STATE_CHANGED = "state"  # the run reached a terminal state (notifications only)
    STANDBY_NOTED = "standby"  # the warm standby trainer is off, or could not be used (why)
    PREEMPTION_RECEIVED = "preempt"  # SIGUSR1/SIGTERM said the machine is being taken away
    SLURM_JOB_SEEN = "slurm"  # a Slurm job of the run started, was requeued or was refused (node, job id)
    # the model download (while loading)
    DOWNLOAD_SEEN = "download"  # the model download was seen starting or finishing in the HF cache
    DOWNLOAD_DISK_LOW = "download_disk"  # the download will not fit the disk
    # guards
    GUARD_FIRED = "guard"  # a guard warned or stopped the run
    STACKS_CAPTURED = "stacks"  # the trainer's Python stacks were dumped (or could not be)
    GPU_RELEASE_UNCONFIRMED = "gpu_release"  # NVML could not confirm the old trainer's memory freed
    # checkpoints
    CHECKPOINT_SAVED = "checkpoint_saved"
    CHECKPOINT_INCOMPLETE = "checkpoint_incomplete"
    CHECKPOINT_UNMARKED = "checkpoint_unmarked"  # complete, but the run marker could not be written
    CHECKPOINT_WITHOUT_ADAPTER = "checkpoint_no_adapter"
    CHECKPOINT_QUARANTINED = "checkpoint_quarantined"  # a cut-short save set aside
    CHECKPOINT_PRUNED = "checkpoint_pruned"
    PRUNE_FAILED = "prune_failed"


@dataclass
class Event:
    """Something that happened, for the events panel, `status` and notifications.

    kind: an EventKind value (stored and sent as its plain string); guard: the guard's name
    when kind is "guard".
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

    def __post_init__(self) -> None:
        self.kind = str(self.kind)  # an EventKind member becomes its plain string value


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)

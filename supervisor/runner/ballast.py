"""The ballast helper: hold all of a GPU but one card's capacity, until the trainer is gone.

    python -m supervisor.runner.ballast --device 0 --leave-bytes N --parent PID

The trainer starts it before touching CUDA. It allocates with plain cudaMalloc (torch's caching
allocator, expandable segments off), prints one JSON line when the GPU's free memory is the
card's total, and then waits. It dies with the trainer: SIGKILL when its parent exits
(PR_SET_PDEATHSIG), a poll of the parent as a second net, and it sits in the trainer's process
group, so the supervisor's killpg takes it too. --no-cuda skips the allocation (CPU tests of the
lifecycle; the CUDA part is checked on the GPU machine).
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import os
import signal
import sys
import time
from typing import Any

from supervisor.preflight.emulation import BALLAST_GRANULE, MIB, ballast_bytes

PR_SET_PDEATHSIG = 1
POLL_S = 0.5


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent exits (a no-op elsewhere)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


@functools.cache
def _nvml_handle(device: int) -> Any:
    """NVML's handle for this CUDA device (initialised once; CUDA_VISIBLE_DEVICES honoured)."""
    import pynvml
    import torch

    pynvml.nvmlInit()
    return pynvml.nvmlDeviceGetHandleByIndex(torch.cuda._get_nvml_device_index(device))


def held_by(pid: int, device: int) -> int:
    """Bytes NVML attributes to `pid` on `device` (0 when it cannot tell)."""
    try:
        import pynvml

        procs = pynvml.nvmlDeviceGetComputeRunningProcesses(_nvml_handle(device))
        return sum(p.usedGpuMemory or 0 for p in procs if p.pid == pid)
    except Exception:  # noqa: BLE001 - no NVML: the trainer has no context yet by design
        return 0


def top_up_bytes(free: int, trainer_used: int, card: int, granule: int = BALLAST_GRANULE) -> int:
    """Bytes to add so that the trainer's memory plus what is free stays within the card: memory
    another process gives back after the start must not become the trainer's (the first H200
    run saw 48 MiB more than the card that way)."""
    excess = free + trainer_used - card
    return max(0, excess // granule * granule)


def keep_topped_up(held: list[Any], device: int, card: int, parent: int, seen: list[int]) -> None:
    """One check of the card's invariant (never raises). The trainer allocating between the two
    reads would look like an excess, so a reading counts only when the trainer's figure did not
    move across it, and the ballast acts only on an excess seen twice in a row (`seen`)."""
    try:
        import torch

        before = held_by(parent, device)
        free, _ = torch.cuda.mem_get_info(device)
        if held_by(parent, device) != before:
            seen.clear()
            return
        seen.append(top_up_bytes(free, before, card))
        del seen[:-2]
        n = min(seen) if len(seen) == 2 else 0
        if n:
            held.append(torch.empty(n, dtype=torch.uint8, device=device))
            seen.clear()
    except Exception:  # noqa: BLE001 - the trainer took it first (OOM here): try next time
        seen.clear()


def hold(device: int, leave: int, parent: int) -> tuple[list[Any], dict[str, int]]:
    """Allocate until `leave` bytes (within 2 MiB), less what the trainer already holds, are free
    on `device`; (tensors, what it found)."""
    import torch

    torch.cuda.set_device(device)
    torch.cuda.init()
    early = held_by(parent, device)  # a context the trainer made before us counts in the card
    leave -= early
    free0, total = torch.cuda.mem_get_info(device)  # after this process's own context
    held = []
    for _ in range(4):  # the first block takes nearly all; the rest trims the allocator's rounding
        free, _ = torch.cuda.mem_get_info(device)
        n = ballast_bytes(free, leave)
        if n == 0:
            break
        held.append(torch.empty(n, dtype=torch.uint8, device=device))
        torch.cuda.synchronize(device)
    free, _ = torch.cuda.mem_get_info(device)
    return held, {"device_total": total, "free_before": free0, "free_after": free,
                  "trainer_held_before": early, "ballast_bytes": sum(t.numel() for t in held),
                  "driver_reserve": driver_reserve(device)}


def driver_reserve(device: int) -> int | None:
    """The driver's reserved memory on this GPU (NVML v2; nvidia-smi's "Reserved"), or None."""
    try:
        import pynvml

        return int(pynvml.nvmlDeviceGetMemoryInfo(_nvml_handle(device), pynvml.nvmlMemory_v2).reserved)
    except Exception:  # noqa: BLE001 - a driver without the v2 struct
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="supervisor.runner.ballast")
    ap.add_argument("--device", type=int, default=0)
    ap.add_argument("--leave-bytes", type=int, required=True)
    ap.add_argument("--parent", type=int, required=True)
    ap.add_argument("--no-cuda", action="store_true")
    ns = ap.parse_args(argv)
    die_with_parent()
    if os.getppid() != ns.parent:  # the parent died before prctl took effect
        return 0
    try:
        held, info = ([], {"ballast_bytes": 0}) if ns.no_cuda else hold(ns.device, ns.leave_bytes, ns.parent)
    except Exception as e:  # noqa: BLE001 - the trainer reads the reason from this line
        print(json.dumps({"ready": False, "error": f"{type(e).__name__}: {e}"}), flush=True)
        return 1
    print(json.dumps({"ready": True, "pid": os.getpid(), **info}), flush=True)
    seen: list[int] = []
    while os.getppid() == ns.parent:
        time.sleep(POLL_S)
        if not ns.no_cuda:
            keep_topped_up(held, ns.device, ns.leave_bytes, ns.parent, seen)
    del held
    return 0


def describe(info: dict[str, Any], leave: int) -> str:
    """'ballast pid 12 holds 117.4 GiB; 24,564 MiB free (card 24,564 MiB)' for the notice."""
    free = info.get("free_after")
    seen = f"{free / MIB:,.0f} MiB free" if free is not None else "free memory not read"
    text = (f"ballast pid {info.get('pid')} holds {info.get('ballast_bytes', 0) / 2**30:.1f} GiB; "
            f"{seen} (card {leave / MIB:,.0f} MiB)")
    if info.get("driver_reserve") is not None:  # a real card keeps its own: not emulated
        text += f"; this GPU's driver reserve {info['driver_reserve'] / MIB:,.0f} MiB is outside it"
    return text


if __name__ == "__main__":
    sys.exit(main())

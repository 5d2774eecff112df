"""[hardware] emulate_vram_gib in the trainer: rehearse a smaller card on a bigger one.

ballast (default): before this process touches CUDA, a helper (`supervisor.runner.ballast`)
holds all of the GPU but the card's total, so cudaMemGetInfo, the CUDA context and the
allocator see what the real card would. fraction: this process's allocator is capped at the
card minus its CUDA context, measured here (the context sits outside the cap).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from typing import Any

from supervisor.preflight.emulation import MIB, EmulationError, card_total_bytes, fraction_for
from supervisor.recipe import Recipe

READY_TIMEOUT_S = 120.0  # a cold driver can take a while to create the helper's context


def device_index(env: Any = os.environ) -> int:
    """This process's CUDA device without touching CUDA: LOCAL_RANK under accelerate, else 0."""
    return int(env.get("LOCAL_RANK", "0") or 0)


def start_ballast(device: int, leave: int, timeout: float = READY_TIMEOUT_S,
                  no_cuda: bool = False) -> tuple[subprocess.Popen, dict[str, Any]]:
    """Start the helper and wait for its ready line; raises EmulationError with its reason."""
    env = {**os.environ, "PYTORCH_CUDA_ALLOC_CONF": ""}  # one plain cudaMalloc, no segments
    argv = [sys.executable, "-m", "supervisor.runner.ballast", "--device", str(device),
            "--leave-bytes", str(leave), "--parent", str(os.getpid())]
    proc = subprocess.Popen(argv + (["--no-cuda"] if no_cuda else []), stdout=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, env=env, text=True)
    box: list[str] = []
    reader = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    reader.join(timeout)
    line = box[0] if box else ""
    try:
        info = json.loads(line) if line.strip() else {}
    except json.JSONDecodeError:
        info = {"error": f"unreadable ready line {line[:200]!r}"}
    if not info.get("ready"):
        proc.kill()
        proc.wait()
        why = info.get("error") or ("no answer within %.0f s" % timeout if not line else "exited")
        raise EmulationError(f"ballast helper failed: {why}")
    return proc, info


def context_bytes(device: int) -> int:
    """This process's CUDA context + cuBLAS workspace, measured: NVML's per-process figure."""
    import pynvml
    import torch

    torch.ones(8, 8, device=device) @ torch.ones(8, 8, device=device)  # creates the cuBLAS handle
    torch.cuda.synchronize(device)
    pynvml.nvmlInit()
    try:
        index = torch.cuda._get_nvml_device_index(device)  # honours CUDA_VISIBLE_DEVICES
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        procs = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
        used = sum(p.usedGpuMemory or 0 for p in procs if p.pid == os.getpid())
    finally:
        pynvml.nvmlShutdown()
    return max(0, used - torch.cuda.memory_reserved(device))


def usable_after_context(device: int, card: int) -> str:
    """What this process's allocator has of the card once its CUDA context exists, measured."""
    import torch

    try:
        torch.ones(8, 8, device=device) @ torch.ones(8, 8, device=device)  # context + cuBLAS
        torch.cuda.synchronize(device)
        free, _ = torch.cuda.mem_get_info(device)
    except Exception as e:  # noqa: BLE001 - the notice says so; training goes on
        return f"the context was not measured ({type(e).__name__})"
    return (f"after this process's CUDA context ({(card - free) / MIB:,.0f} MiB, measured) the "
            f"allocator has {free / MIB:,.0f} MiB, as on the real card")


def emulate_card(recipe: Recipe, writer: Any, select_device: Any) -> subprocess.Popen | None:
    """Apply hardware.emulate_vram_gib (then select the device); the ballast helper or None."""
    gib = recipe.hardware.emulate_vram_gib
    if gib is None:
        select_device()
        return None
    import torch

    if not torch.cuda.is_available():  # cudaGetDeviceCount: no context, no device memory
        writer.notice(f"emulate_vram_gib={gib:g}: no CUDA device; nothing to emulate")
        return None
    card, device = card_total_bytes(gib), device_index()
    what = f"emulating a {gib:g} GB card ({card / MIB:,.0f} MiB as nvidia-smi shows it)"
    if recipe.hardware.emulate_mode == "ballast":
        proc, info = start_ballast(device, card)
        select_device()
        from supervisor.runner.ballast import describe

        writer.notice(f"{what}: {describe(info, card)}; {usable_after_context(device, card)}")
        return proc
    select_device()
    total = torch.cuda.get_device_properties(device).total_memory
    ctx = context_bytes(device)
    fraction = fraction_for(card, ctx, total)
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    writer.notice(f"{what}: allocator capped at {(card - ctx) / MIB:,.0f} MiB = the card minus "
                  f"this process's CUDA context ({ctx / MIB:,.0f} MiB, measured) "
                  f"(per_process_memory_fraction {fraction:.4g})")
    return None

"""The warm standby's own process (trainer side): the training stack imported, CUDA untouched,
waiting for the supervisor to hand it an attempt. The supervisor's half, and how the hand-over
works: supervisor/daemon/standby.py.

    python -m supervisor.runner.standby --dir STANDBY_DIR --parent PID:START --backend hf
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from supervisor.daemon.standby import (
    PARENT_CHECK_S,
    POLL_S,
    _write_json,
    is_our_trainer,
)
from supervisor.store import read_json


def libcuda_loaded() -> bool:
    """Is the CUDA driver library mapped into this process (cuInit has been or may be called)?"""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            return any("libcuda.so" in line for line in f)
    except OSError:
        return False


class _NvmlAnswers:
    """Read-only torch.cuda queries answered from NVML while the stack imports, so that a
    library asking for the GPU's capability or name at import does not initialise CUDA.
    Homogeneous hosts only: every answer is the first visible GPU's (CUDA_VISIBLE_DEVICES
    may still change which one that is)."""

    def __init__(self) -> None:
        import pynvml

        pynvml.nvmlInit()
        self.nvml = pynvml
        self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        self.caps = [tuple(pynvml.nvmlDeviceGetCudaComputeCapability(h)) for h in self.handles]
        name = pynvml.nvmlDeviceGetName(self.handles[0]) if self.handles else "GPU"
        self.name = name.decode() if isinstance(name, bytes) else str(name)
        self.total = int(pynvml.nvmlDeviceGetMemoryInfo(self.handles[0]).total) if self.handles else 0

    def _index(self, device: Any) -> int:
        index = getattr(device, "idx", getattr(device, "index", device))
        return index if isinstance(index, int) and 0 <= index < len(self.caps) else 0

    def capability(self, device: Any = None) -> tuple[int, int]:
        return self.caps[self._index(device)]  # type: ignore[return-value]

    def properties(self, device: Any = None) -> Any:
        import types

        major, minor = self.capability(device)
        return types.SimpleNamespace(name=self.name, major=major, minor=minor,
                                     total_memory=self.total, multi_processor_count=0,
                                     gcnArchName="")

    def install(self, cuda: Any) -> dict[str, Any]:
        saved = {n: getattr(cuda, n) for n in ("get_device_capability", "get_device_properties",
                                                "get_device_name", "current_device",
                                                "is_bf16_supported")}
        cuda.get_device_capability = self.capability
        cuda.get_device_properties = self.properties
        cuda.get_device_name = lambda device=None: self.name
        cuda.current_device = lambda: 0
        cuda.is_bf16_supported = lambda *a, **k: self.caps[0] >= (8, 0)
        return saved

    def pid_mib(self, pid: int) -> float:
        total = 0.0
        for h in self.handles:
            try:
                procs = self.nvml.nvmlDeviceGetComputeRunningProcesses(h)
            except Exception:  # noqa: BLE001
                continue
            total += sum((p.usedGpuMemory or 0) for p in procs if p.pid == pid) / 2**20
        return total

    def close(self) -> None:
        try:
            self.nvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass


def warm_imports(backend: str) -> dict[str, Any]:
    """Import the training stack without initialising CUDA; returns what was found (and, if an
    import initialised CUDA anyway, its Python stack and the GPU memory this process holds)."""
    import importlib
    import traceback

    from supervisor.runner.backends import stack_modules

    t0 = time.perf_counter()
    had_check = os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK")
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
    nvml = None
    init_by: list[str] = []
    try:
        import torch

        if torch.version.cuda and torch.cuda.is_available():  # NVML-based: no cuInit
            try:
                nvml = _NvmlAnswers()
            except Exception:  # noqa: BLE001 - no NVML: an import may initialise CUDA
                nvml = None
        cuda = torch.cuda
        saved = nvml.install(cuda) if nvml is not None else {}
        lazy = cuda._lazy_init

        def recording_lazy_init() -> Any:
            if not init_by and not cuda.is_initialized():
                init_by.append("".join(traceback.format_stack(limit=14)[:-1])[-3000:])
            return lazy()

        cuda._lazy_init = recording_lazy_init
        try:
            for name in stack_modules(backend):
                importlib.import_module(name)
        finally:
            cuda._lazy_init = lazy
            for n, f in saved.items():
                setattr(cuda, n, f)
    finally:
        if had_check is None:
            os.environ.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)
        else:
            os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = had_check
    extras = warm_cpu_work()
    initialised = bool(torch.cuda.is_initialized())
    held = nvml.pid_mib(os.getpid()) if nvml is not None else 0.0
    if nvml is not None:
        nvml.close()
    return {"imports_s": round(time.perf_counter() - t0, 3),
            "cuda_env": {k: v for k, v in os.environ.items() if k.startswith(("CUDA_", "PYTORCH_NVML"))},
            "cuda_initialized": initialised, "cuda_init_by": init_by[0] if init_by else None,
            "gpu_mib_held": round(held, 1), "libcuda_loaded": libcuda_loaded(),
            "modules": list(stack_modules(backend)), "extras": extras}


def warm_cpu_work() -> dict[str, float]:
    """CPU-only work that an attempt would otherwise do on its first step, done while idle:
    Triton's cache key (a sha256 over Triton's own source files, computed once per process
    before the first kernel launch finds its compiled kernel: 0.35 s on the H200 box). Never
    CUDA; a failure only means the attempt does it itself."""
    out: dict[str, float] = {}
    t0 = time.perf_counter()
    try:
        from triton.runtime.cache import triton_key

        triton_key()  # functools.lru_cache: the attempt's launches reuse it
        out["triton_key_s"] = round(time.perf_counter() - t0, 3)
    except Exception:  # noqa: BLE001 - no triton (CPU torch), or another layout
        pass
    return out


def _parent_alive(spec: str | None) -> bool:
    """PID:START (psutil create_time) of the supervisor: False once it is gone or reused."""
    if not spec:
        return True
    try:
        import psutil

        pid_s, _, start_s = spec.partition(":")
        p = psutil.Process(int(pid_s))
        return not start_s or abs(p.create_time() - float(start_s)) < 0.05
    except Exception:  # noqa: BLE001 - NoSuchProcess, bad spec
        return False


class _HeldOutput:
    """fds 1 and 2 into a temp file while importing: import-time warnings belong to the attempt
    that uses this process (replayed at hand-over), not to the trainer running meanwhile."""

    def __init__(self) -> None:
        self.saved = (os.dup(1), os.dup(2))
        self.tmp = tempfile.TemporaryFile()
        os.dup2(self.tmp.fileno(), 1)
        os.dup2(self.tmp.fileno(), 2)

    def release(self) -> bytes:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(self.saved[0], 1)
        os.dup2(self.saved[1], 2)
        for fd in self.saved:
            os.close(fd)
        self.tmp.seek(0)
        data = self.tmp.read(1 << 20)
        self.tmp.close()
        return data


def wait_for_attempt(folder: Path, parent: str | None) -> dict[str, Any] | None:
    go = folder / "go.json"
    next_check = time.monotonic() + PARENT_CHECK_S
    while True:
        if go.exists():
            data = read_json(go)
            if data is not None:
                return data
        if time.monotonic() >= next_check:
            next_check = time.monotonic() + PARENT_CHECK_S
            if not _parent_alive(parent):
                return None
        time.sleep(POLL_S)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m supervisor.runner.standby")
    ap.add_argument("--dir", required=True, help="where go.json arrives and ready.json is written")
    ap.add_argument("--parent", default=None, help="PID:START of the supervisor; exit when it is gone")
    ap.add_argument("--backend", default="hf", choices=["hf", "unsloth"])
    args = ap.parse_args(argv)
    folder = Path(args.dir)
    t_start = time.time()
    held = _HeldOutput()
    try:
        info = warm_imports(args.backend)
    except Exception as e:  # noqa: BLE001 - a standby that cannot import is simply not used
        held.release()
        _write_json(folder / "ready.json", {"pid": os.getpid(), "usable": False,
                                            "why": f"imports failed: {type(e).__name__}: {e}"[:300]})
        return 3
    # CUDA initialised by an import (cuInit, no context): usable only pinned, i.e. for an attempt
    # whose CUDA_VISIBLE_DEVICES is the one this process started with; never if it holds memory.
    why = None
    if info["gpu_mib_held"] > 0:
        why = f"it holds {info['gpu_mib_held']:.0f} MiB of GPU memory after its imports"
    usable = why is None
    pinned = info["cuda_initialized"] and usable
    _write_json(folder / "ready.json", {"pid": os.getpid(), "usable": usable, "ready_at": time.time(),
                                        "why": why, "pinned": pinned,
                                        "visible": os.environ.get("CUDA_VISIBLE_DEVICES"), **info})
    if not usable:
        held.release()
        return 3
    job = wait_for_attempt(folder, args.parent)
    if job is None:
        held.release()
        return 3
    handed = time.time()
    if pinned and job.get("visible") != os.environ.get("CUDA_VISIBLE_DEVICES"):
        _write_json(folder / "refused.json", {"why": "CUDA initialised here with CUDA_VISIBLE_DEVICES="
                                              f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}, the attempt "
                                              f"wants {job.get('visible')!r}"})
        held.release()
        return 3
    _write_json(folder / "taken.json", {"pid": os.getpid(), "t": handed})
    noise = held.release()
    cmd = list(job.get("argv") or [])
    if not is_our_trainer(cmd):
        print(f"qlora-watch standby: refusing {cmd[:3]!r}: not the built-in trainer", file=sys.stderr)
        return 3
    os.environ.clear()
    os.environ.update({str(k): str(v) for k, v in (job.get("env") or {}).items()})
    os.chdir(job.get("cwd") or os.getcwd())
    if noise:
        sys.stderr.buffer.write(noise)
        sys.stderr.flush()
    import supervisor.runner.train as train

    train.WARM.update(warm=True, started_at=handed, standby_started_at=t_start,
                      standby_imports_s=info["imports_s"])
    sys.argv = [train.__file__, *cmd[3:]]
    return train.main(cmd[3:])


if __name__ == "__main__":
    sys.exit(main())

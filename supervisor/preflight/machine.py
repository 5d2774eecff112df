"""Preflight's view of this machine: the run's first GPU (NVML), host RAM (cgroup-aware), and the
folder whose disk the output lands on. The memory model (preflight/memory.py) never probes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def nearest_existing(path: Path) -> Path:
    """The path itself or its closest existing parent (output_dir need not exist yet)."""
    p = path.expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def host_available() -> tuple[float, str]:
    """MemAvailable, capped by the cgroup's memory.max - memory.current inside a container."""
    import psutil

    avail, src = float(psutil.virtual_memory().available), "psutil MemAvailable"
    try:
        mx = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if mx != "max":
            left = int(mx) - int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            if left < avail:
                avail, src = float(left), "cgroup memory.max - memory.current"
    except (OSError, ValueError):
        pass
    return avail, src


def detect_gpu(lib: Any = None) -> tuple[float | None, str]:
    """(total bytes of the run's first GPU, description) from NVML; (None, why) without a
    usable GPU. The run's first GPU is CUDA's device 0: the first of CUDA_VISIBLE_DEVICES
    (telemetry/visible.py), not NVML's device 0 on a box of several cards."""
    try:
        if lib is None:
            from supervisor.telemetry.nvml import nvml_library

            lib = nvml_library()
        lib.nvmlInit()
    except Exception as e:  # NVMLError_LibraryNotFound without a driver; ImportError; OSError
        return None, f"no GPU detected ({type(e).__name__}: {e})"
    try:
        count = lib.nvmlDeviceGetCount()
        if count < 1:
            return None, "no GPU detected (NVML sees no device)"
        index, where = _first_visible(lib, count)
        if index is None:
            return None, (f"no GPU visible (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r} "
                          f"names none of the {count} NVML sees)")
        h = lib.nvmlDeviceGetHandleByIndex(index)
        total = float(lib.nvmlDeviceGetMemoryInfo(h).total)
        try:
            name = lib.nvmlDeviceGetName(h)
            name = name.decode() if isinstance(name, bytes) else str(name)
        except Exception:  # NotSupported and friends: the size is what matters
            name = "GPU"
        return total, f"NVML: {name}, device {index}{where}"
    except Exception as e:
        return None, f"no GPU detected ({type(e).__name__}: {e})"
    finally:
        try:
            lib.nvmlShutdown()
        except Exception:
            pass


def _first_visible(lib: Any, count: int) -> tuple[int | None, str]:
    """(NVML index of CUDA's device 0, how it was chosen) under CUDA_VISIBLE_DEVICES."""
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is None:
        return 0, ""
    from supervisor.telemetry.visible import Device, resolve_ordered

    devices = []
    for i in range(count):
        try:
            u = lib.nvmlDeviceGetUUID(lib.nvmlDeviceGetHandleByIndex(i))
            devices.append(Device(i, u.decode() if isinstance(u, bytes) else str(u)))
        except Exception:  # noqa: BLE001 - an index still maps without the UUID
            devices.append(Device(i, None))
    order = resolve_ordered(cvd, devices) or []
    return (order[0] if order else None), f" (CUDA_VISIBLE_DEVICES={cvd})"

"""tests/gpu/: tests of the real hardware; skipped (not failed) where NVML sees no NVIDIA GPU."""

from __future__ import annotations

import pytest

from supervisor.telemetry.nvml import Nvml


@pytest.fixture(autouse=True, scope="session")
def _needs_a_gpu() -> None:
    nv = Nvml()
    try:
        status = nv.open()
        count = nv.device_count()
    finally:
        nv.close()
    if status != "ok" or not count:
        pytest.skip(f"needs an NVIDIA GPU (NVML: {status})")

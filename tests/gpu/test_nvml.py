"""The NVML wrapper on a real GPU: it opens, every device is sampled, the numbers are a card's.
(Without a driver: tests/unit/test_telemetry.py; every NVML error path: FakeNVML there.)"""

from __future__ import annotations

import os

from supervisor.telemetry.nvml import Nvml
from supervisor.telemetry.sampler import Sampler


def test_real_gpus_are_opened_and_sampled() -> None:
    nv = Nvml()
    try:
        assert nv.open() == "ok" and nv.device_count() >= 1
        gpus = nv.sample_gpus({os.getpid()})
        assert [g.index for g in gpus] == list(range(nv.device_count()))
        for g in gpus:
            assert not g.lost and g.name and g.uuid, g
            assert g.mem_total_mib and g.mem_total_mib > 1024, g  # MiB: any CUDA card has > 1 GiB
            assert g.mem_used_mib is not None and 0 <= g.mem_used_mib <= g.mem_total_mib, g
        assert nv.device_memory_used_mib(0) is not None
        # this process has no CUDA context: NVML attributes nothing to it (or cannot tell)
        assert nv.gpu_memory_held_by([os.getpid()]) in (0.0, None)
        s = Sampler(nv).sample(os.getpid(), "/tmp")
        assert s.nvml == "ok" and len(s.gpus) == nv.device_count()
        assert s.host.mem_total_mib and s.host.trainer_rss_mib
    finally:
        nv.close()

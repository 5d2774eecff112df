"""GPU and host telemetry that never raises: NVML wrapper, host sampler, FakeNVML for tests."""

from __future__ import annotations

from supervisor.telemetry.host import HostState, sample_host
from supervisor.telemetry.nvml import REASONS, Nvml, decode_reasons, query
from supervisor.telemetry.sampler import Sampler, ThreadedSampler, make_sampler

__all__ = [
    "REASONS",
    "HostState",
    "Nvml",
    "Sampler",
    "ThreadedSampler",
    "decode_reasons",
    "make_sampler",
    "query",
    "sample_host",
]

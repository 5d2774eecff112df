"""FakeNVML: a scriptable stand-in for the pynvml module, for tests and the CPU-only benchmark.

It is a fake *lib* (pynvml's function names, raising real `pynvml.NVMLError` codes), so the
real `Nvml` wrapper runs against it; it also exposes the wrapper's own interface (`open`,
`sample_gpus`, ...) by delegating to an `Nvml` built over itself, so it can stand wherever an
`Nvml` is expected. Faults: per-call errors, a lost GPU, hangs, throttling, and memory that
stays held while any of a list of live PIDs is alive (read from the real /proc via psutil).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import psutil

from supervisor.telemetry.nvml import (
    ERROR_GPU_IS_LOST,
    ERROR_INVALID_ARGUMENT,
    ERROR_NOT_SUPPORTED,
    MIB,
    TEMPERATURE_GPU_MAX,
    THRESHOLD_SHUTDOWN,
    THRESHOLD_SLOWDOWN,
    Nvml,
)

try:
    import pynvml

    def _error(code: int) -> Exception:
        return pynvml.NVMLError(code)  # maps to the NVMLError_<Name> subclass
except ImportError:  # pragma: no cover
    from supervisor.telemetry.nvml import NVMLError

    def _error(code: int) -> Exception:
        e = NVMLError(code)
        e.value = code  # type: ignore[attr-defined]
        return e


def alive(pid: int) -> bool:
    """True while pid exists and is not a zombie (a zombie has released its GPU memory)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


@dataclass
class FakeDevice:
    """One fake GPU; the defaults look like an idle H200 on driver 580."""

    name: str = "NVIDIA H200"
    uuid: str = "GPU-00000000-fake-0000-0000-000000000000"
    mem_total_mib: float = 143771.0
    mem_used_mib: float = 512.0  # baseline: the driver's own reservation
    mem_reserved_mib: float = 0.0  # counted as used by the v1 call only (the H200: ~615 MiB)
    util_pct: int = 0
    mem_util_pct: int = 0
    temp_c: int = 34
    hotspot_c: int | None = None  # None: InvalidArgument, as driver 580 answers
    slowdown_c: int = 89
    tlimit_c: int = 87  # what the H200 margin is measured to (its GPU_MAX threshold)
    shutdown_c: int = 95
    mem_temp_c: int | None = 38
    power_mw: int = 118_000
    power_limit_mw: int = 700_000
    sm_clock_mhz: int = 1980
    sm_clock_max_mhz: int = 1980
    reasons: int = 0
    counters_ns: dict[int, int] = field(
        default_factory=lambda: dict.fromkeys((74, 76, 269, 270, 271), 0)
    )
    pcie_tx_kbs: int = 1200
    pcie_rx_kbs: int = 3400
    processes: dict[int, float] = field(default_factory=dict)  # pid -> MiB, always listed
    held: list[tuple[list[int], int, float]] = field(default_factory=list)  # (pids, owner, MiB)
    lost_at: float | None = None
    throttle_since: float | None = None
    throttle_rate: dict[int, float] = field(default_factory=dict)  # field id -> ns per ns


class FakeNVML:
    """Fake pynvml module with fault injection; also usable directly as an `Nvml`."""

    def __init__(
        self,
        devices: int | list[FakeDevice] = 1,
        *,
        driver: str = "580.95.05",
        init_error: int | None = None,
        has_temperature_v: bool = True,
        clock: Callable[[], float] = time.monotonic,
        slow_interval_s: float = 0.0,
    ) -> None:
        self.devices = (
            [FakeDevice(uuid=f"GPU-fake-{i}") for i in range(devices)]
            if isinstance(devices, int)
            else list(devices)
        )
        self.driver = driver
        self.init_error = init_error
        self.clock = clock
        self.calls = 0
        self._fail: dict[tuple[str | int, int | None], int] = {}
        self._hang: dict[str, float] = {}
        self._release = threading.Event()
        if not has_temperature_v:  # an older pynvml: the wrapper must fall back
            self.nvmlDeviceGetTemperatureV = None  # type: ignore[assignment]
        self.wrapper = Nvml(lib=self, slow_interval_s=slow_interval_s)

    # ------------------------------------------------------------------ fault injection

    def fail(
        self, name: str | int, code: int = ERROR_NOT_SUPPORTED, device: int | None = None
    ) -> None:
        """Make a call (pynvml function name) or a field id fail with an NVML error code."""
        self._fail[(name, device)] = code

    def clear(self, name: str | int, device: int | None = None) -> None:
        self._fail.pop((name, device), None)

    def lose(self, device: int = 0, at: float | None = None) -> None:
        """GPU_IS_LOST from clock time `at` on (now when None), for every call on that GPU."""
        self.devices[device].lost_at = self.clock() if at is None else at

    def hang(self, name: str = "*", seconds: float = 3600.0) -> None:
        """Block in a call (or every call: "*") for `seconds` or until `release()`."""
        self._release.clear()
        self._hang[name] = seconds

    def release(self) -> None:
        """End every hang, now and later."""
        self._hang.clear()
        self._release.set()

    def throttle(self, mask: int, device: int = 0, rates: dict[int, float] | None = None) -> None:
        """Set clock-event reason bits; the given counters (field id -> ns/ns) grow from now."""
        d = self.devices[device]
        d.reasons = mask
        d.throttle_since = self.clock()
        d.throttle_rate = dict(rates or {})

    def hold(
        self, pids: Iterable[int], mib: float, device: int = 0, owner: int | None = None
    ) -> None:
        """Report `mib` used by `owner` (default: the first PID) while any PID in `pids` lives.

        This is what an H200 did after SIGKILL to a trainer with forked workers alive: the
        memory stayed and NVML kept naming the dead trainer PID (FIELD_NOTES 4).
        """
        pids = list(pids)
        self.devices[device].held.append((pids, pids[0] if owner is None else owner, mib))

    # ------------------------------------------------------------------ plumbing

    def _failure(self, name: str | int, device: int | None, default: int | None = None) -> int | None:
        """The error code injected for this call (or field id) on this device, else on every one."""
        return self._fail.get((name, device), self._fail.get((name, None), default))

    def _enter(self, name: str, handle: Any = None, index: int | None = None) -> FakeDevice | None:
        self.calls += 1
        seconds = self._hang.get(name, self._hang.get("*"))
        if seconds is not None:
            self._release.wait(seconds)
        dev_index = handle.index if handle is not None else index
        d = self.devices[dev_index] if dev_index is not None else None
        if d is not None and d.lost_at is not None and self.clock() >= d.lost_at:
            raise _error(ERROR_GPU_IS_LOST)
        code = self._failure(name, dev_index)
        if code is not None:
            raise _error(code)
        return d

    def _in_use(self, d: FakeDevice) -> list[tuple[int, float]]:
        procs = list(d.processes.items())
        procs += [(owner, mib) for pids, owner, mib in d.held if any(alive(p) for p in pids)]
        return procs

    def _counter(self, d: FakeDevice, fid: int) -> int:
        grown = 0.0
        if d.throttle_since is not None and fid in d.throttle_rate:
            grown = (self.clock() - d.throttle_since) * 1e9 * d.throttle_rate[fid]
        return int(d.counters_ns.get(fid, 0) + grown)

    # ------------------------------------------------------------------ the pynvml surface

    def nvmlInit(self) -> None:
        self._enter("nvmlInit")
        if self.init_error is not None:
            raise _error(self.init_error)

    def nvmlShutdown(self) -> None:
        self._enter("nvmlShutdown")

    def nvmlSystemGetDriverVersion(self) -> str:
        self._enter("nvmlSystemGetDriverVersion")
        return self.driver

    def nvmlDeviceGetCount(self) -> int:
        self._enter("nvmlDeviceGetCount")
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> SimpleNamespace:
        self._enter("nvmlDeviceGetHandleByIndex", index=index)
        return SimpleNamespace(index=index)

    def nvmlDeviceGetName(self, h: Any) -> str:
        return self._enter("nvmlDeviceGetName", h).name  # type: ignore[union-attr]

    def nvmlDeviceGetUUID(self, h: Any) -> str:
        return self._enter("nvmlDeviceGetUUID", h).uuid  # type: ignore[union-attr]

    def nvmlDeviceGetUtilizationRates(self, h: Any) -> SimpleNamespace:
        d = self._enter("nvmlDeviceGetUtilizationRates", h)
        return SimpleNamespace(gpu=d.util_pct, memory=d.mem_util_pct)  # type: ignore[union-attr]

    def nvmlDeviceGetMemoryInfo(self, h: Any, version: int | None = None) -> SimpleNamespace:
        """pynvml's call: without `version` the v1 struct (reserved memory counted as used),
        with nvmlMemory_v2 the v2 struct (reserved apart), as nvidia-smi shows it."""
        if version:  # fail("nvmlDeviceGetMemoryInfo_v2"): a driver without the v2 struct
            code = self._failure("nvmlDeviceGetMemoryInfo_v2", h.index)
            if code is not None:
                raise _error(code)
        d = self._enter("nvmlDeviceGetMemoryInfo", h)
        assert d is not None
        used = d.mem_used_mib + sum(mib for _, mib in self._in_use(d))
        total = d.mem_total_mib * MIB
        if version:
            reserved = d.mem_reserved_mib * MIB
            return SimpleNamespace(version=version, used=int(used * MIB), reserved=int(reserved),
                                   total=int(total), free=int(total - used * MIB - reserved))
        used += d.mem_reserved_mib
        return SimpleNamespace(used=int(used * MIB), total=int(total), free=int(total - used * MIB))

    def _temp(self, name: str, h: Any, sensor: int) -> int:
        d = self._enter(name, h)
        assert d is not None
        if sensor == TEMPERATURE_GPU_MAX:
            if d.hotspot_c is None:
                raise _error(ERROR_INVALID_ARGUMENT)
            return d.hotspot_c
        return d.temp_c

    def nvmlDeviceGetTemperatureV(self, h: Any, sensor: int) -> int:
        return self._temp("nvmlDeviceGetTemperatureV", h, sensor)

    def nvmlDeviceGetTemperature(self, h: Any, sensor: int) -> int:
        return self._temp("nvmlDeviceGetTemperature", h, sensor)

    def nvmlDeviceGetMarginTemperature(self, h: Any) -> int:
        d = self._enter("nvmlDeviceGetMarginTemperature", h)
        return d.tlimit_c - d.temp_c  # type: ignore[union-attr]

    def nvmlDeviceGetTemperatureThreshold(self, h: Any, kind: int) -> int:
        d = self._enter("nvmlDeviceGetTemperatureThreshold", h)
        assert d is not None
        if kind == THRESHOLD_SLOWDOWN:
            return d.slowdown_c
        if kind == THRESHOLD_SHUTDOWN:
            return d.shutdown_c
        raise _error(ERROR_NOT_SUPPORTED)

    def nvmlDeviceGetFieldValues(self, h: Any, field_ids: list[int]) -> list[SimpleNamespace]:
        d = self._enter("nvmlDeviceGetFieldValues", h)
        assert d is not None
        out = []
        for fid in field_ids:
            ret = self._failure(fid, h.index, 0)
            if fid == 82:
                v, vt = d.mem_temp_c, 1  # unsigned int
                ret = ret or (ERROR_NOT_SUPPORTED if v is None else 0)
            elif fid in d.counters_ns:
                v, vt = self._counter(d, fid), 3  # unsigned long long
            else:
                v, vt, ret = 0, 1, ret or ERROR_NOT_SUPPORTED
            value = SimpleNamespace(uiVal=v or 0, ullVal=v or 0)
            out.append(SimpleNamespace(fieldId=fid, nvmlReturn=ret, valueType=vt, value=value))
        return out

    def nvmlDeviceGetPowerUsage(self, h: Any) -> int:
        return self._enter("nvmlDeviceGetPowerUsage", h).power_mw  # type: ignore[union-attr]

    def nvmlDeviceGetEnforcedPowerLimit(self, h: Any) -> int:
        return self._enter("nvmlDeviceGetEnforcedPowerLimit", h).power_limit_mw  # type: ignore[union-attr]

    def nvmlDeviceGetClockInfo(self, h: Any, clock: int) -> int:
        return self._enter("nvmlDeviceGetClockInfo", h).sm_clock_mhz  # type: ignore[union-attr]

    def nvmlDeviceGetMaxClockInfo(self, h: Any, clock: int) -> int:
        return self._enter("nvmlDeviceGetMaxClockInfo", h).sm_clock_max_mhz  # type: ignore[union-attr]

    def nvmlDeviceGetCurrentClocksEventReasons(self, h: Any) -> int:
        return self._enter("nvmlDeviceGetCurrentClocksEventReasons", h).reasons  # type: ignore[union-attr]

    def nvmlDeviceGetPcieThroughput(self, h: Any, counter: int) -> int:
        d = self._enter("nvmlDeviceGetPcieThroughput", h)
        return d.pcie_tx_kbs if counter == 0 else d.pcie_rx_kbs  # type: ignore[union-attr]

    def nvmlDeviceGetComputeRunningProcesses(self, h: Any) -> list[SimpleNamespace]:
        d = self._enter("nvmlDeviceGetComputeRunningProcesses", h)
        assert d is not None
        return [
            SimpleNamespace(pid=pid, usedGpuMemory=int(mib * MIB)) for pid, mib in self._in_use(d)
        ]

    # ------------------------------------------------------------------ the Nvml surface

    @property
    def status(self) -> str:
        return self.wrapper.status

    @property
    def retryable(self) -> bool:
        return self.wrapper.retryable

    def open(self) -> str:
        return self.wrapper.open()

    def close(self) -> None:
        self.wrapper.close()

    def device_count(self) -> int:
        return self.wrapper.device_count()

    def sample_gpus(self, trainer_pids: Iterable[int] = (), hidden_pids: Iterable[int] = (),
                    emulated_total_mib: float | None = None) -> list[Any]:
        return self.wrapper.sample_gpus(trainer_pids, hidden_pids, emulated_total_mib)

    def pids_on_gpus(self) -> set[int] | None:
        return self.wrapper.pids_on_gpus()

    def nvml_devices(self) -> list[Any]:
        return self.wrapper.nvml_devices()

    def gpu_memory_held_by(self, pids: Iterable[int]) -> float | None:
        return self.wrapper.gpu_memory_held_by(pids)

    def device_memory_used_mib(self, index: int) -> float | None:
        return self.wrapper.device_memory_used_mib(index)

"""NVML wrapper that never raises: every call goes through `query`, one handle per GPU.

The wrapper talks to a *lib* object with pynvml's function names (the `pynvml` module by
default; `FakeNVML` in tests), so the same code runs against the real driver and the fake.
Measured on an H200, driver 580 (bench/telemetry_cost.py): most calls cost 2-9 us of CPU, but
MarginTemperature ~0.96 ms, FieldValues ~0.79 ms and PcieThroughput ~0.94 ms CPU + 20 ms wall
(it integrates a byte counter over 20 ms). Those three are read every `slow_interval_s` only:
the throttle counters are cumulative, so nothing is missed; between reads the margin follows
the core temperature (T.Limit is a threshold, it does not move with load).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from supervisor.records import GpuSample

try:  # a dependency; were it missing, telemetry must say "unavailable", not crash the import
    import pynvml

    NVMLError: type[Exception] = pynvml.NVMLError
except ImportError:  # pragma: no cover
    pynvml, NVMLError = None, Exception  # type: ignore[assignment]

log = logging.getLogger(__name__)


def nvml_library() -> Any:
    """The pynvml module itself, for one-shot probes (doctor, preflight) that call it directly;
    ModuleNotFoundError where nvidia-ml-py is not installed. This module is the only supervisor
    module that imports pynvml (pyproject.toml's import-linter contract)."""
    if pynvml is None:
        raise ModuleNotFoundError("No module named 'pynvml'")
    return pynvml

# NVML ABI constants, defined here so the wrapper works with an older nvidia-ml-py and a fake lib.
ERROR_INVALID_ARGUMENT = 2
ERROR_NOT_SUPPORTED = 3
ERROR_LIBRARY_NOT_FOUND = 12
ERROR_FUNCTION_NOT_FOUND = 13
ERROR_GPU_IS_LOST = 15
ERROR_RESET_REQUIRED = 16
# a GPU fallen off the bus, or one that needs a reset: either way a reboot-class fault
LOST_CODES = frozenset({ERROR_GPU_IS_LOST, ERROR_RESET_REQUIRED})
# answers that do not change while the driver is loaded: stop asking (saves calls per sample)
PERMANENT_CODES = frozenset({ERROR_INVALID_ARGUMENT, ERROR_NOT_SUPPORTED, ERROR_FUNCTION_NOT_FOUND})

TEMPERATURE_GPU = 0
TEMPERATURE_GPU_MAX = 1  # hotspot, NVML 615+; driver 580 answers InvalidArgument
THRESHOLD_SHUTDOWN = 0
THRESHOLD_SLOWDOWN = 1
CLOCK_SM = 1
PCIE_TX = 0
PCIE_RX = 1
TEMPERATURE = (
    "nvmlDeviceGetTemperatureV",
    "nvmlDeviceGetTemperature",
)  # V first; old is deprecated
REASON_FNS = ("nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons")

FI_MEMORY_TEMP = 82
# cumulative clock-event (throttle) time in ns, keyed as the reason words below
THROTTLE_COUNTER_FIELDS: dict[int, str] = {
    74: "sw power cap",  # NVML_FI_DEV_CLOCKS_EVENT_REASON_SW_POWER_CAP (= PERF_POLICY_POWER)
    76: "sync boost",  # NVML_FI_DEV_CLOCKS_EVENT_REASON_SYNC_BOOST (= PERF_POLICY_SYNC_BOOST)
    269: "sw thermal slowdown",  # NVML_FI_DEV_CLOCKS_EVENT_REASON_SW_THERM_SLOWDOWN
    270: "hw thermal slowdown",  # NVML_FI_DEV_CLOCKS_EVENT_REASON_HW_THERM_SLOWDOWN
    271: "hw power brake slowdown",  # NVML_FI_DEV_CLOCKS_EVENT_REASON_HW_POWER_BRAKE_SLOWDOWN
}
FIELD_IDS = [FI_MEMORY_TEMP, *THROTTLE_COUNTER_FIELDS]

# nvmlClocksEventReason* bits; 0x200 and 0x400 are new in NVML 615 and absent from older pynvml
REASONS: dict[int, str] = {
    0x1: "gpu idle",
    0x2: "applications clocks setting",
    0x4: "sw power cap",
    0x8: "hw slowdown",
    0x10: "sync boost",
    0x20: "sw thermal slowdown",
    0x40: "hw thermal slowdown",
    0x80: "hw power brake slowdown",
    0x100: "display clock setting",
    0x200: "board limit",  # nvmlClocksEventReasonBoardLimit
    0x400: "reliability",  # nvmlClocksEventReasonReliability
}
MIB = 1024 * 1024


def decode_reasons(mask: int, include_idle: bool = False) -> list[str]:
    """Clock-event bitmask -> words, lowest bit first; "gpu idle" is not a throttle, so dropped."""
    words = []
    for bit in range(mask.bit_length()):
        b = 1 << bit
        if not mask & b or (b == 0x1 and not include_idle):
            continue
        words.append(REASONS.get(b, f"unknown {b:#x}"))
    return words


class GpuLost(Exception):
    """Raised inside the wrapper when a call answers GPU_IS_LOST; turned into lost=True."""


def _code(err: BaseException) -> int | None:
    return getattr(err, "value", None)


def call(fn: Callable[..., Any] | None, *args: Any) -> tuple[Any, BaseException | None]:
    """(value, None) or (None, error); GPU_IS_LOST raises GpuLost. A missing fn is an error."""
    if fn is None:
        return None, NVMLError(ERROR_FUNCTION_NOT_FOUND)
    try:
        return fn(*args), None
    except NVMLError as e:
        if _code(e) in LOST_CODES:
            raise GpuLost(str(e)) from e
        return None, e


def query(fn: Callable[..., Any] | None, *args: Any, default: Any = None) -> Any:
    """The value of fn(*args), or default on any NVMLError except GPU_IS_LOST (raises GpuLost)."""
    value, err = call(fn, *args)
    return default if err is not None else value


@dataclass
class _Device:
    """One GPU's handle and what does not change while it is open."""

    index: int
    handle: Any
    static: dict[str, Any] = field(default_factory=dict)  # GpuSample fields read once at open
    lost: bool = False
    slow_at: float = float("-inf")  # when the expensive calls were last made
    pcie: tuple[float | None, float | None] = (None, None)
    margin: tuple[float | None, float | None] = (None, None)  # (margin, core temp) when read
    mem_temp: float | None = None
    counters: dict[str, int] = field(default_factory=dict)
    mig_uuids: tuple[str, ...] = ()  # MIG instances, for CUDA_VISIBLE_DEVICES=MIG-…


def _text(v: Any) -> str | None:
    return v.decode(errors="replace") if isinstance(v, bytes) else (None if v is None else str(v))


def _num(v: Any, scale: float = 1.0) -> float | None:
    return None if v is None else float(v) / scale


def _held_mib(procs: list[Any] | None, pids: set[int]) -> float | None:
    """MiB that NVML attributes to `pids` among `procs`; None when the process list is unknown."""
    if procs is None:
        return None
    # usedGpuMemory is None where the driver cannot attribute it (WDDM, some MIG setups)
    return sum(p.usedGpuMemory or 0 for p in procs if p.pid in pids) / MIB


def _field_value(fv: Any) -> int | float | None:
    """The number in an nvmlFieldValue_t, by its valueType; None when its own return failed."""
    ret = getattr(fv, "nvmlReturn", 0)
    if ret in LOST_CODES:
        raise GpuLost(f"field {getattr(fv, 'fieldId', '?')}: error {ret}")
    if ret != 0:
        return None
    attr = ("dVal", "uiVal", "ulVal", "ullVal", "sllVal", "siVal", "usVal")
    vt = getattr(fv, "valueType", 1)
    return getattr(fv.value, attr[vt]) if 0 <= vt < len(attr) else None


class Nvml:
    """NVML for the supervisor: `open()` once, then `sample_gpus()` each tick; never raises."""

    def __init__(
        self,
        lib: Any = None,
        *,
        slow_interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.lib = lib if lib is not None else pynvml
        self._mem_v2 = getattr(self.lib, "nvmlMemory_v2", 0x02000028)  # nvmlMemory_v2_t's version
        self.slow_interval_s = slow_interval_s  # 0: every sample (~3.6 ms CPU per GPU, 40 ms wall)
        self.clock = clock
        self.status = "unavailable: not opened"
        self.retryable = True  # False once the library itself is missing
        self.driver: str | None = None
        self._devices: list[_Device] = []
        self._unsupported: set[tuple[int, str]] = set()
        self._logged: set[str] = set()

    # ------------------------------------------------------------------ lifecycle

    def _log_once(self, key: str, msg: str, *args: Any) -> None:
        if key not in self._logged:
            self._logged.add(key)
            log.warning(msg, *args)

    def _fn(self, name: str) -> Callable[..., Any] | None:
        return getattr(self.lib, name, None)

    def open(self) -> str:
        """Initialise NVML and cache static per-GPU values; returns "ok" or "unavailable: why"."""
        if self.status == "ok":
            return self.status
        try:
            self.status = self._open()
        except Exception as e:  # noqa: BLE001 - telemetry never raises; NVMLLibraryMismatchError etc.
            self.status = f"unavailable: {type(e).__name__}: {e}"
        if self.status != "ok":
            self._log_once("open:" + self.status, "GPU telemetry %s", self.status)
        return self.status

    def _open(self) -> str:
        if self.lib is None:
            self.retryable = False
            return "unavailable: nvidia-ml-py (pynvml) is not installed"
        try:
            self.lib.nvmlInit()
        except NVMLError as e:
            self.retryable = _code(e) != ERROR_LIBRARY_NOT_FOUND
            return f"unavailable: {e}"
        self.driver = _text(query(self._fn("nvmlSystemGetDriverVersion")))
        count = query(self._fn("nvmlDeviceGetCount"), default=0) or 0
        devices = []
        for i in range(count):
            try:
                devices.append(self._open_device(i))
            except GpuLost:
                devices.append(_Device(index=i, handle=None, lost=True))
        self._devices = devices
        return "ok" if devices else "unavailable: no NVIDIA GPU found"

    def _open_device(self, i: int) -> _Device:
        h, err = call(self._fn("nvmlDeviceGetHandleByIndex"), i)
        if err is not None:
            self._log_once(f"handle:{i}", "GPU %d: no handle (%s)", i, err)
        d = _Device(index=i, handle=h)
        if h is None:
            return d
        thr = self._fn("nvmlDeviceGetTemperatureThreshold")
        d.static = {
            "name": _text(query(self._fn("nvmlDeviceGetName"), h)),
            "uuid": _text(query(self._fn("nvmlDeviceGetUUID"), h)),
            "sm_clock_max_mhz": _num(query(self._fn("nvmlDeviceGetMaxClockInfo"), h, CLOCK_SM)),
            "slowdown_c": _num(query(thr, h, THRESHOLD_SLOWDOWN)),
            "shutdown_c": _num(query(thr, h, THRESHOLD_SHUTDOWN)),
        }
        d.mig_uuids = self._mig_uuids(h)
        return d

    def _mig_uuids(self, h: Any) -> tuple[str, ...]:
        """The UUIDs of this GPU's MIG instances (none when MIG is off or unsupported)."""
        mode = query(self._fn("nvmlDeviceGetMigMode"), h)
        if not mode or not (mode[0] if isinstance(mode, (tuple, list)) else mode):
            return ()
        out = []
        for i in range(query(self._fn("nvmlDeviceGetMaxMigDeviceCount"), h, default=0) or 0):
            mh = query(self._fn("nvmlDeviceGetMigDeviceHandleByIndex"), h, i)
            u = _text(query(self._fn("nvmlDeviceGetUUID"), mh)) if mh is not None else None
            if u:
                out.append(u)
        return tuple(out)

    def nvml_devices(self) -> list[Any]:
        """The opened GPUs as visible.Device (index, UUID, MIG UUIDs)."""
        from supervisor.telemetry.visible import Device

        return [Device(d.index, d.static.get("uuid"), d.mig_uuids) for d in self._devices]

    def close(self) -> None:
        """Release NVML; a later `open()` starts over."""
        if self.status == "ok":
            query(self._fn("nvmlShutdown"))
        self._devices = []
        self.status = "unavailable: closed"

    def device_count(self) -> int:
        """Number of GPUs opened (0 when NVML is unavailable)."""
        return len(self._devices)

    # ------------------------------------------------------------------ sampling

    def _qe(self, d: _Device, key: str, names: tuple[str, ...], *args: Any) -> tuple[Any, Any]:
        """(value, error) of the first of `names` this lib has; remembers permanent refusals."""
        if (d.index, key) in self._unsupported:
            return None, NVMLError(ERROR_NOT_SUPPORTED)
        value, err = None, None
        for name in names:  # e.g. nvmlDeviceGetTemperatureV, then the deprecated form
            value, err = call(self._fn(name), d.handle, *args)
            if err is None or _code(err) != ERROR_FUNCTION_NOT_FOUND:
                break
        if err is not None and _code(err) in PERMANENT_CODES:
            self._unsupported.add((d.index, key))
        return value, err

    def _q(self, d: _Device, key: str, name: str | tuple[str, ...], *args: Any) -> Any:
        return self._qe(d, key, (name,) if isinstance(name, str) else name, *args)[0]

    def _memory(self, d: _Device) -> Any:
        """Memory info as nvidia-smi reports it. The v1 call counts the driver's reserved memory
        as used (on the H200, 1276 MiB "used" on an idle card where nvidia-smi says 661 MiB);
        the v2 call separates it. v1 where the driver or library lacks v2."""
        try:
            value, err = self._qe(d, "mem_v2", ("nvmlDeviceGetMemoryInfo",), self._mem_v2)
        except TypeError:  # a binding whose call takes no version argument
            value, err = None, None
        if err is None:
            if value is not None:
                return value
            self._unsupported.add((d.index, "mem_v2"))  # no v2 here: v1 from now on
        return self._q(d, "mem", "nvmlDeviceGetMemoryInfo")

    def sample_gpus(self, trainer_pids: Iterable[int] = (), hidden_pids: Iterable[int] = (),
                    emulated_total_mib: float | None = None) -> list[GpuSample]:
        """One GpuSample per GPU; a failing field is None, a lost GPU has lost=True.

        While a smaller card is rehearsed: the ballast's memory (`hidden_pids`) is not "used",
        and a GPU the run holds memory on shows the emulated card's total.
        """
        pids, hidden = set(trainer_pids), set(hidden_pids)
        out = []
        for d in self._devices:
            g = GpuSample(index=d.index, lost=d.lost, **d.static)
            if not d.lost and d.handle is not None:
                try:
                    self._fill(d, g, pids)
                    if emulated_total_mib is not None:
                        self._emulate(d, g, hidden, emulated_total_mib)
                except GpuLost as e:
                    d.lost = g.lost = True  # sticky: a lost GPU needs a reboot, stop calling it
                    self._log_once(f"lost:{d.index}", "GPU %d is lost: %s", d.index, e)
                except Exception as e:  # noqa: BLE001 - a bug here must not stop sampling
                    self._log_once(
                        f"bug:{type(e).__name__}", "GPU %d sample failed: %r", d.index, e
                    )
            out.append(g)
        return out

    def _fill(self, d: _Device, g: GpuSample, pids: set[int]) -> None:
        util = self._q(d, "util", "nvmlDeviceGetUtilizationRates")
        if util is not None:
            g.util_pct, g.mem_util_pct = float(util.gpu), float(util.memory)
        mem = self._memory(d)
        if mem is not None:
            g.mem_used_mib, g.mem_total_mib = mem.used / MIB, mem.total / MIB
        g.temp_c = _num(self._q(d, "temp", TEMPERATURE, TEMPERATURE_GPU))
        g.hotspot_c, g.hotspot_reason = self._hotspot(d)
        g.power_w = _num(self._q(d, "power", "nvmlDeviceGetPowerUsage"), 1000.0)  # mW
        g.power_limit_w = _num(self._q(d, "plimit", "nvmlDeviceGetEnforcedPowerLimit"), 1000.0)
        g.sm_clock_mhz = _num(self._q(d, "sm", "nvmlDeviceGetClockInfo", CLOCK_SM))
        mask = self._q(d, "reasons", REASON_FNS)
        if mask is not None:
            g.throttle_mask, g.throttle_reasons = int(mask), decode_reasons(int(mask))
        self._slow(d, g.temp_c)
        g.pcie_tx_kbs, g.pcie_rx_kbs = d.pcie
        g.mem_temp_c, g.throttle_counters = d.mem_temp, dict(d.counters)
        margin, at_temp = d.margin
        if margin is not None and at_temp is not None and g.temp_c is not None:
            margin -= g.temp_c - at_temp  # every degree warmer is a degree less margin
        g.margin_c = margin
        procs = self._processes(d) if pids else None  # while a trainer runs: one call for both
        g.proc_mem_mib = _held_mib(procs, pids)
        if procs is not None:  # another job or user on the same card: its memory, told apart
            g.others_mem_mib = sum(p.usedGpuMemory or 0 for p in procs if p.pid not in pids) / MIB

    def _emulate(self, d: _Device, g: GpuSample, hidden: set[int], total_mib: float) -> None:
        ballast = _held_mib(self._processes(d), hidden) if hidden else 0.0
        if ballast and g.mem_used_mib is not None:
            g.mem_used_mib = max(0.0, g.mem_used_mib - ballast)
        if ballast or g.proc_mem_mib or len(self._devices) == 1:  # one GPU: it is the run's
            g.mem_total_mib = total_mib

    def _hotspot(self, d: _Device) -> tuple[float | None, str | None]:
        v, err = self._qe(d, "hotspot", TEMPERATURE, TEMPERATURE_GPU_MAX)
        if err is None:
            return _num(v), None
        if (d.index, "hotspot") in self._unsupported:  # InvalidArgument on driver 580
            return None, f"not reported by driver {self.driver or '?'}"
        return None, f"n/a: {err}"

    def _slow(self, d: _Device, temp_c: float | None) -> None:
        """Margin, field values and PCIe: the calls that cost ~1 ms of CPU each, every slow_interval_s."""
        now = self.clock()
        if now - d.slow_at < self.slow_interval_s:
            return
        d.slow_at = now
        d.margin = (_num(self._q(d, "margin", "nvmlDeviceGetMarginTemperature")), temp_c)
        d.pcie = (
            _num(self._q(d, "pcie_tx", "nvmlDeviceGetPcieThroughput", PCIE_TX)),
            _num(self._q(d, "pcie_rx", "nvmlDeviceGetPcieThroughput", PCIE_RX)),
        )
        d.mem_temp, d.counters = None, {}
        values = self._q(d, "fields", "nvmlDeviceGetFieldValues", FIELD_IDS)
        for fid, fv in zip(FIELD_IDS, values or (), strict=False):
            v = _field_value(fv)
            if v is None:
                continue
            if fid == FI_MEMORY_TEMP:
                d.mem_temp = float(v)
            else:
                d.counters[THROTTLE_COUNTER_FIELDS[fid]] = int(v)

    def _processes(self, d: _Device) -> list[Any] | None:
        return self._q(d, "procs", "nvmlDeviceGetComputeRunningProcesses")

    def _proc_mem(self, d: _Device, pids: set[int]) -> float | None:
        return _held_mib(self._processes(d), pids)

    # ------------------------------------------------------------------ relaunch checks

    def _all_processes(self) -> list[Any] | None:
        """Compute processes on every GPU, or None when any GPU cannot tell."""
        if self.status != "ok":
            return None
        found: list[Any] = []
        for d in self._devices:
            if d.lost:
                return None
            try:
                procs = self._processes(d)
            except GpuLost:
                d.lost = True
                return None
            if procs is None:
                return None
            found.extend(procs)
        return found

    def pids_on_gpus(self) -> set[int] | None:
        """PIDs NVML names as compute processes on any GPU; None when it cannot tell."""
        procs = self._all_processes()
        return None if procs is None else {p.pid for p in procs}

    def gpu_memory_held_by(self, pids: Iterable[int]) -> float | None:
        """MiB that NVML attributes to these PIDs on all GPUs; None when it cannot tell.

        Managed (paged) memory is never attributed to a process (FIELD_NOTES 5): also check
        `device_memory_used_mib` against a baseline before a relaunch.
        """
        return _held_mib(self._all_processes(), set(pids))

    def device_memory_used_mib(self, index: int) -> float | None:
        """Device-level used memory of GPU `index` (counts managed memory); None if unknown."""
        if self.status != "ok" or not 0 <= index < len(self._devices):
            return None
        d = self._devices[index]
        if d.lost:
            return None
        try:
            mem = query(self._fn("nvmlDeviceGetMemoryInfo"), d.handle)
        except GpuLost:
            d.lost = True
            return None
        return None if mem is None else mem.used / MIB

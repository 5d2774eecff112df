"""Sampler: one `Sample` per tick from NVML and the host; never raises, never hangs the caller.

Why a worker thread with a timeout and not a sampler subprocess (RELIABILITY_PLAN F3):
- pynvml calls go through ctypes, which releases the GIL, so a driver call stuck in the
  kernel blocks only its own thread; the asyncio loop and the socket stay responsive.
- In-process sampling keeps one NVML init and one handle per GPU (FIELD_NOTES 5: 1,000
  samples of five calls in 15 ms). A subprocess would add a second Python (~30 MB RSS), a
  pipe protocol, and its own restart/back-off logic, to guard against the rarer fault.
- What a thread cannot do is survive libnvidia-ml crashing the process (abort/segfault).
  That takes the supervisor down, not the trainer: the trainer runs in its own session and
  the daemon re-adopts it on restart (RELIABILITY_PLAN design conclusion 5).
A stuck thread cannot be killed, so `ThreadedSampler` keeps at most one call in flight per
part (host, GPU): while one is stuck, later ticks answer at once with nvml="unavailable:
timeout" and start nothing new. Host and GPU run in separate workers, so RAM headroom keeps
flowing while NVML hangs, and a hung /proc or NFS read does not blank the GPU panel.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from supervisor.records import GpuSample, HostSample, Sample
from supervisor.telemetry.host import HostState, sample_host
from supervisor.telemetry.nvml import Nvml

log = logging.getLogger(__name__)

TIMEOUT = "unavailable: timeout"
BALLAST_MODULE = b"supervisor.runner.ballast"


class Sampler:
    """Host + GPU sampling in the caller's thread; `nvml` is an Nvml, a FakeNVML, or None (real)."""

    def __init__(
        self,
        nvml: Any = None,
        clock: Callable[[], float] = time.time,
        *,
        host_state: HostState | None = None,
        reopen_s: float = 60.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.nvml = nvml if nvml is not None else Nvml()
        self.clock = clock
        self.monotonic = monotonic
        self.host_state = host_state if host_state is not None else HostState()
        self.reopen_s = reopen_s  # driver not loaded yet at boot: try again this often
        self._opened_at: float | None = None
        self._logged: set[str] = set()
        self.emulated_total_mib: float | None = None  # hardware.emulate_vram_gib's card, in MiB
        self.visible: str | None = None  # the trainer's CUDA_VISIBLE_DEVICES (None: unset, all)

    def set_visible(self, cvd: str | None) -> None:
        """The run's GPUs: those in the trainer's CUDA_VISIBLE_DEVICES (visible.py)."""
        self.visible = cvd

    def emulate(self, total_mib: float | None) -> None:
        """Report the trainer's GPU as a card of `total_mib`, the ballast helper's memory hidden."""
        self.emulated_total_mib = total_mib

    def _log_once(self, key: str, msg: str, *args: Any) -> None:
        if key not in self._logged:
            self._logged.add(key)
            log.warning(msg, *args)

    def sample_host(
        self, trainer_root_pid: int | None, disk_path: str | None
    ) -> tuple[HostSample, list[int]]:
        """(HostSample, the trainer tree's PIDs); an empty HostSample if it failed."""
        try:
            return sample_host(trainer_root_pid, disk_path, self.host_state), list(
                self.host_state.tree_pids
            )
        except Exception as e:  # noqa: BLE001 - sample_host guards its parts; this is a bug net
            self._log_once("host", "host sampling failed: %r", e)
            return HostSample(trainer_partial=trainer_root_pid is not None), []

    def sample_gpus(self, trainer_pids: list[int]) -> tuple[list[GpuSample], str]:
        """(GpuSamples, nvml status) where status is "ok", "unavailable: why" or "lost"."""
        try:
            status = self._ensure_open()
            if status != "ok":
                return [], status
            pids, hidden = set(trainer_pids), set()
            if self.emulated_total_mib is not None:
                hidden = ballast_pids(pids)
                gpus = self.nvml.sample_gpus(pids - hidden, hidden, self.emulated_total_mib)
            else:
                gpus = self.nvml.sample_gpus(pids)
            self._mark_run_gpus(gpus)
            return gpus, "lost" if any(g.lost for g in gpus) else "ok"
        except Exception as e:  # noqa: BLE001 - Nvml never raises; this is a bug net
            self._log_once("gpu", "GPU sampling failed: %r", e)
            return [], f"unavailable: {type(e).__name__}"

    def _mark_run_gpus(self, gpus: list[GpuSample]) -> None:
        if self.visible is None or not hasattr(self.nvml, "nvml_devices"):
            return
        from supervisor.telemetry.visible import resolve

        mine = resolve(self.visible, self.nvml.nvml_devices())
        if mine is None:
            return
        for g in gpus:
            g.this_run = g.index in mine

    def _ensure_open(self) -> str:
        status = self.nvml.status
        if status == "ok":
            return status
        now = self.monotonic()
        first = self._opened_at is None
        if first or (self.nvml.retryable and now - self._opened_at >= self.reopen_s):  # type: ignore[operator]
            self._opened_at = now
            status = self.nvml.open()
        return status

    def sample(self, trainer_root_pid: int | None, disk_path: str | None) -> Sample:
        """One Sample, taken now in this thread (a hung NVML call hangs it: see ThreadedSampler)."""
        t = self.clock()
        host, pids = self.sample_host(trainer_root_pid, disk_path)
        gpus, status = self.sample_gpus(pids)
        return Sample(t=t, gpus=gpus, host=host, nvml=status)

    def close(self) -> None:
        try:
            self.nvml.close()
        except Exception:  # noqa: BLE001
            pass


def ballast_pids(pids: set[int], proc_root: str = "/proc") -> set[int]:
    """The ballast helpers (`supervisor.runner.ballast`) among the trainer tree's PIDs."""
    found = set()
    for pid in pids:
        try:
            with open(f"{proc_root}/{pid}/cmdline", "rb") as f:
                if BALLAST_MODULE in f.read():
                    found.add(pid)
        except OSError:  # gone since the tree was read
            continue
    return found


class _Job:
    __slots__ = ("fn", "done", "result")

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn, self.done, self.result = fn, threading.Event(), None


class _Worker:
    """One persistent daemon thread running one job at a time; refuses a job while busy."""

    def __init__(self, name: str) -> None:
        self._q: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._busy = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (job := self._q.get()) is not None:
            try:
                job.result = job.fn()
            except BaseException as e:  # noqa: BLE001 - never let the worker die
                log.warning("%s: job failed: %r", self._thread.name, e)
            finally:
                self._busy.release()
                job.done.set()

    def submit(self, fn: Callable[[], Any]) -> _Job | None:
        """The queued job, or None when the previous one is still running (stuck)."""
        if not self._busy.acquire(blocking=False):
            return None
        job = _Job(fn)
        self._q.put(job)
        return job

    @property
    def busy(self) -> bool:
        return self._busy.locked()

    def stop(self) -> None:
        self._q.put(None)  # a stuck thread stays stuck; it is a daemon, so exit is not blocked


class ThreadedSampler:
    """A Sampler whose host and GPU parts run in worker threads, bounded by `timeout_s` per tick."""

    def __init__(self, sampler: Sampler | None = None, timeout_s: float = 2.0) -> None:
        self.sampler = sampler if sampler is not None else Sampler()
        self.timeout_s = timeout_s
        self._host = _Worker("qlw-sample-host")
        self._gpu = _Worker("qlw-sample-gpu")
        self._last_pids: list[int] = []
        self._logged: set[str] = set()

    @property
    def nvml(self) -> Any:
        return self.sampler.nvml

    def emulate(self, total_mib: float | None) -> None:
        self.sampler.emulate(total_mib)

    def set_visible(self, cvd: str | None) -> None:
        self.sampler.set_visible(cvd)

    @property
    def tree_pids(self) -> list[int]:
        """The trainer tree's PIDs at the last host sample: what NVML may name after a crash."""
        return list(self._last_pids)

    def _note_timeout(self, part: str) -> None:
        if part not in self._logged:  # one warning per part, not one per tick
            self._logged.add(part)
            log.warning(
                "telemetry: %s sampling took longer than %.1fs; skipping until it returns",
                part,
                self.timeout_s,
            )

    def sample(self, trainer_root_pid: int | None, disk_path: str | None) -> Sample:
        """A Sample within about timeout_s; parts that did not finish are empty / "unavailable: timeout"."""
        t = self.sampler.clock()
        deadline = time.monotonic() + self.timeout_s
        host_job = self._host.submit(lambda: self.sampler.sample_host(trainer_root_pid, disk_path))
        # Both parts run at once; the GPU part waits for this tick's PIDs only while it can
        # still finish in time (NVML needs ms; PCIe reads 40 ms per GPU), else uses the last.
        pid_deadline = deadline - self.timeout_s / 2

        def gpu_part() -> tuple[list[GpuSample], str]:
            pids = self._last_pids
            if host_job is not None and host_job.done.wait(
                max(0.0, pid_deadline - time.monotonic())
            ):
                pids = host_job.result[1] if host_job.result else pids
            return self.sampler.sample_gpus(pids)

        gpu_job = self._gpu.submit(gpu_part)
        host, status = HostSample(), TIMEOUT
        gpus: list[GpuSample] = []
        if host_job is not None and host_job.done.wait(max(0.0, deadline - time.monotonic())):
            if host_job.result is not None:
                host, self._last_pids = host_job.result
        else:
            self._note_timeout("host")
        if gpu_job is not None and gpu_job.done.wait(max(0.0, deadline - time.monotonic())):
            if gpu_job.result is not None:
                gpus, status = gpu_job.result
        else:
            self._note_timeout("gpu")
        return Sample(t=t, gpus=gpus, host=host, nvml=status)

    def close(self) -> None:
        """Stop the workers; NVML is shut down only if its worker is not stuck inside it."""
        self._host.stop()
        self._gpu.stop()
        if not self._gpu.busy:
            self.sampler.close()


def make_sampler(timeout_s: float = 2.0, nvml: Any = None) -> ThreadedSampler:
    """The sampler the daemon uses: real NVML (or `nvml`), host and GPU parts bounded by timeout_s."""
    return ThreadedSampler(Sampler(nvml), timeout_s=timeout_s)

"""Telemetry: the NVML wrapper against FakeNVML and the real (driverless) machine, host sampling
of real process trees, cgroup parsing on fake /sys trees, and the threaded sampler's timeout."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from supervisor.telemetry import host as hostmod
from supervisor.telemetry.host import (
    HostState,
    cgroup_memory,
    cpu_percent,
    disk_usage,
    meminfo,
    oom_kills,
    sample_host,
    tree_pids,
    tree_rss,
    uvm_rss_kib,
)
from supervisor.telemetry.nvml import (
    ERROR_GPU_IS_LOST,
    ERROR_NOT_SUPPORTED,
    GpuLost,
    Nvml,
    decode_reasons,
    query,
)
from supervisor.telemetry.sampler import Sampler, ThreadedSampler, make_sampler
from tests.fakes.nvml import FakeDevice, FakeNVML

pynvml = pytest.importorskip("pynvml")
ERROR_NO_PERMISSION, ERROR_TIMEOUT = pynvml.NVML_ERROR_NO_PERMISSION, pynvml.NVML_ERROR_TIMEOUT
pytestmark = pytest.mark.timeout(60)


class Clock:
    """A settable monotonic clock."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def procs():
    """Spawn helpers in their own group; kill the groups at teardown."""
    started: list[subprocess.Popen] = []

    def spawn(code: str) -> subprocess.Popen:
        p = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code)],
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        started.append(p)
        return p

    yield spawn
    for p in started:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait(timeout=10)


# ------------------------------------------------------------------------------ NVML wrapper


def test_query_default_on_error_and_lost_raises():
    def boom(code):
        raise pynvml.NVMLError(code)

    assert query(lambda: 7) == 7
    for code in (ERROR_NOT_SUPPORTED, ERROR_NO_PERMISSION, ERROR_TIMEOUT):
        assert query(boom, code, default="n/a") == "n/a"
    assert query(None, default=0) == 0  # a function this pynvml does not have
    with pytest.raises(GpuLost):
        query(boom, ERROR_GPU_IS_LOST)


def test_real_machine_without_a_driver_warns_once_and_host_data_flows(caplog):
    """This machine's real NVML: no driver on the CI box, one warning, no GPUs, host data still
    flows. (On a GPU host the real device is sampled: tests/gpu/test_nvml.py.)"""
    nv = Nvml()
    with caplog.at_level(logging.WARNING):
        status = nv.open()
        nv.open()
    if status == "ok":
        nv.close()
        pytest.skip("NVML works on this machine: tests/gpu/test_nvml.py samples it")
    assert status.startswith("unavailable: ")
    assert len([r for r in caplog.records if "GPU telemetry" in r.message]) == 1
    assert nv.device_count() == 0 and nv.sample_gpus({1}) == []
    assert nv.gpu_memory_held_by([os.getpid()]) is None
    assert nv.device_memory_used_mib(0) is None
    s = Sampler(nv).sample(os.getpid(), "/tmp")
    assert s.nvml.startswith("unavailable: ") and s.gpus == []
    assert s.host.mem_total_mib and s.host.trainer_rss_mib and s.host.disk_free_gib is not None


def test_make_sampler_for_the_daemon():
    ts = make_sampler(timeout_s=1.0, nvml=FakeNVML())
    try:
        s = ts.sample(os.getpid(), "/tmp")
        assert s.nvml == "ok" and s.gpus and s.host.trainer_rss_mib
        assert ts.tree_pids[0] == os.getpid() and ts.nvml.gpu_memory_held_by(ts.tree_pids) == 0.0
    finally:
        ts.close()


def test_no_driver_is_not_retried_but_a_late_driver_is():
    mono = Clock()
    gone = FakeNVML(init_error=12)  # LIBRARY_NOT_FOUND
    s = Sampler(gone, monotonic=mono, reopen_s=10)
    assert s.sample(None, None).nvml.startswith("unavailable: ")
    calls = gone.calls
    mono.t += 100
    s.sample(None, None)
    assert gone.calls == calls

    late = FakeNVML(init_error=9)  # DRIVER_NOT_LOADED: the module may load later
    s = Sampler(late, monotonic=mono, reopen_s=10)
    assert s.sample(None, None).nvml.startswith("unavailable: ")
    late.init_error = None
    assert s.sample(None, None).nvml.startswith("unavailable: ")  # not before reopen_s
    mono.t += 11
    assert s.sample(None, None).nvml == "ok"


def test_fake_h200_sample():
    fake = FakeNVML()
    assert fake.open() == "ok" and fake.device_count() == 1
    (g,) = fake.sample_gpus(set())
    assert g.name == "NVIDIA H200" and g.mem_total_mib == 143771
    assert (g.slowdown_c, g.shutdown_c, g.margin_c, g.temp_c) == (89, 95, 53, 34)
    assert g.hotspot_c is None and g.hotspot_reason == "not reported by driver 580.95.05"
    assert g.mem_temp_c == 38 and g.power_w == 118 and g.power_limit_w == 700
    assert g.sm_clock_mhz == g.sm_clock_max_mhz == 1980
    assert g.throttle_mask == 0 and g.throttle_reasons == []
    assert set(g.throttle_counters) == {
        "sw power cap",
        "sync boost",
        "sw thermal slowdown",
        "hw thermal slowdown",
        "hw power brake slowdown",
    }
    assert (g.pcie_tx_kbs, g.pcie_rx_kbs) == (1200, 3400)
    assert g.proc_mem_mib is None and not g.lost  # no trainer PIDs given


def test_memory_used_as_nvidia_smi_shows_it():
    """The v1 call counts the driver's reserved memory as used (H200: 1276 vs 661 MiB idle)."""
    fake = FakeNVML([FakeDevice(mem_used_mib=661, mem_reserved_mib=615)])
    fake.open()
    (g,) = fake.sample_gpus()
    assert g.mem_used_mib == 661
    fake.fail("nvmlDeviceGetMemoryInfo_v2", ERROR_NOT_SUPPORTED)  # an older driver: v1, once
    (g,) = fake.sample_gpus()
    assert g.mem_used_mib == 661 + 615
    fake.clear("nvmlDeviceGetMemoryInfo_v2")
    (g,) = fake.sample_gpus()
    assert g.mem_used_mib == 661 + 615  # not asked again while the driver is loaded


def test_hotspot_where_reported_and_old_pynvml_fallback():
    fake = FakeNVML([FakeDevice(hotspot_c=71)], has_temperature_v=False)
    fake.open()
    (g,) = fake.sample_gpus()
    assert (g.temp_c, g.hotspot_c, g.hotspot_reason) == (34, 71, None)


FIELDS = [
    ("nvmlDeviceGetUtilizationRates", ["util_pct", "mem_util_pct"]),
    ("nvmlDeviceGetMemoryInfo", ["mem_used_mib", "mem_total_mib"]),
    ("nvmlDeviceGetTemperatureV", ["temp_c", "hotspot_c"]),
    ("nvmlDeviceGetMarginTemperature", ["margin_c"]),
    ("nvmlDeviceGetPowerUsage", ["power_w"]),
    ("nvmlDeviceGetEnforcedPowerLimit", ["power_limit_w"]),
    ("nvmlDeviceGetClockInfo", ["sm_clock_mhz"]),
    ("nvmlDeviceGetCurrentClocksEventReasons", ["throttle_mask"]),
    ("nvmlDeviceGetFieldValues", ["mem_temp_c", "throttle_counters"]),
    ("nvmlDeviceGetPcieThroughput", ["pcie_tx_kbs", "pcie_rx_kbs"]),
    ("nvmlDeviceGetComputeRunningProcesses", ["proc_mem_mib", "others_mem_mib"]),
]


@pytest.mark.parametrize("code", [ERROR_NOT_SUPPORTED, ERROR_NO_PERMISSION, ERROR_TIMEOUT])
@pytest.mark.parametrize("fn,attrs", FIELDS, ids=[f for f, _ in FIELDS])
def test_one_failing_call_blanks_only_its_fields(fn, attrs, code):
    fake = FakeNVML([FakeDevice(hotspot_c=70)])
    fake.open()
    (good,) = fake.sample_gpus({os.getpid()})
    fake.fail(fn, code)
    (bad,) = fake.sample_gpus({os.getpid()})
    for name, value in vars(good).items():
        if name in attrs:
            assert getattr(bad, name) in (None, {}, []), name
        elif name != "hotspot_reason":
            assert getattr(bad, name) == value, name
    assert not bad.lost


def test_one_failing_field_id():
    fake = FakeNVML()
    fake.open()
    fake.fail(82, ERROR_NOT_SUPPORTED)
    (g,) = fake.sample_gpus()
    assert g.mem_temp_c is None and len(g.throttle_counters) == 5


def test_gpu_lost_marks_that_gpu_and_the_sample():
    clock = Clock()
    fake = FakeNVML(2, clock=clock)
    s = Sampler(fake)
    fake.lose(device=1, at=clock.t + 5)
    first = s.sample(None, None)
    assert first.nvml == "ok" and not any(g.lost for g in first.gpus)
    clock.t += 5
    lost = s.sample(None, None)
    assert lost.nvml == "lost"
    assert [g.lost for g in lost.gpus] == [False, True]
    assert lost.gpus[1].name == "NVIDIA H200" and lost.gpus[1].temp_c is None
    assert lost.gpus[0].temp_c == 34
    calls = fake.calls
    assert s.sample(None, None).nvml == "lost"  # sticky, and the lost GPU is not called again
    assert fake.calls - calls < calls
    assert fake.gpu_memory_held_by([1]) is None  # cannot confirm a release on a lost GPU
    assert fake.device_memory_used_mib(0) is not None and fake.device_memory_used_mib(1) is None


def test_throttle_reasons_decode():
    assert decode_reasons(0x1) == []
    assert decode_reasons(0x1, include_idle=True) == ["gpu idle"]
    assert decode_reasons(0x4 | 0x40 | 0x200 | 0x400 | 0x800) == [
        "sw power cap",
        "hw thermal slowdown",
        "board limit",
        "reliability",
        "unknown 0x800",
    ]
    clock = Clock()
    fake = FakeNVML(clock=clock)
    fake.open()
    fake.throttle(0x1 | 0x20 | 0x40, rates={270: 0.5, 269: 0.25})
    clock.t += 2
    (g,) = fake.sample_gpus()
    assert g.throttle_mask == 0x61
    assert g.throttle_reasons == ["sw thermal slowdown", "hw thermal slowdown"]
    assert g.throttle_counters["hw thermal slowdown"] == 1_000_000_000
    assert g.throttle_counters["sw thermal slowdown"] == 500_000_000
    assert g.throttle_counters["sw power cap"] == 0


def test_expensive_calls_are_read_every_slow_interval_only():
    clock = Clock()
    fake = FakeNVML()
    nv = Nvml(fake, slow_interval_s=10, clock=clock)
    nv.open()
    first = nv.sample_gpus()[0]
    d = fake.devices[0]
    d.pcie_tx_kbs, d.mem_temp_c, d.temp_c = 9, 50, 40
    d.counters_ns[270] = 123
    calls = fake.calls
    g = nv.sample_gpus()[0]
    assert fake.calls - calls == 7  # util, mem, temp, power, limit, clock, reasons (hotspot: n/a)
    assert (g.pcie_tx_kbs, g.mem_temp_c) == (first.pcie_tx_kbs, first.mem_temp_c)
    assert g.throttle_counters == first.throttle_counters
    assert (g.temp_c, g.margin_c) == (40, 47)  # margin follows the core temperature
    clock.t += 10
    g = nv.sample_gpus()[0]
    assert (g.pcie_tx_kbs, g.mem_temp_c, g.margin_c) == (9, 50, 47)
    assert g.throttle_counters["hw thermal slowdown"] == 123


def test_memory_held_while_a_real_pid_lives(procs):
    worker = procs("import time; time.sleep(60)")
    trainer = os.getpid() + 10_000_000  # a "dead trainer" PID no process has
    fake = FakeNVML()
    fake.devices[0].processes[os.getpid()] = 100.0
    fake.hold([trainer, worker.pid], mib=8700.0)
    fake.open()
    assert fake.gpu_memory_held_by([trainer]) == 8700.0  # NVML names the dead PID
    assert fake.pids_on_gpus() == {os.getpid(), trainer}
    assert fake.device_memory_used_mib(0) == 512 + 100 + 8700
    (g,) = fake.sample_gpus({os.getpid(), worker.pid})
    assert g.proc_mem_mib == 100.0
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()
    assert fake.gpu_memory_held_by([trainer]) == 0.0
    assert fake.device_memory_used_mib(0) == 512 + 100


def test_sampler_survives_a_broken_nvml_object():
    class Broken:
        status, retryable = "ok", True

        def sample_gpus(self, pids):
            raise RuntimeError("bug")

    s = Sampler(Broken()).sample(os.getpid(), None)
    assert s.nvml.startswith("unavailable: ") and s.host.trainer_rss_mib


# ------------------------------------------------------------------------------ hangs


def test_threaded_sampler_times_out_on_a_hung_call_without_piling_up():
    fake = FakeNVML()
    ts = ThreadedSampler(Sampler(fake), timeout_s=0.5)
    try:
        assert ts.sample(os.getpid(), "/tmp").nvml == "ok"
        fake.hang("nvmlDeviceGetPowerUsage", seconds=30)
        threads = threading.active_count()
        t0 = time.monotonic()
        s = ts.sample(os.getpid(), "/tmp")
        assert time.monotonic() - t0 < 1.0
        assert s.nvml == "unavailable: timeout" and s.gpus == []
        assert s.host.trainer_rss_mib  # host data still flows while NVML hangs
        calls = fake.calls
        for _ in range(5):
            t0 = time.monotonic()
            assert ts.sample(os.getpid(), "/tmp").nvml == "unavailable: timeout"
            assert time.monotonic() - t0 < 0.3  # the stuck call is not waited for again
        assert fake.calls == calls  # and no new call was started behind it
        assert threading.active_count() == threads
        fake.release()
        deadline = time.monotonic() + 5
        while ts.sample(os.getpid(), "/tmp").nvml != "ok":
            assert time.monotonic() < deadline
    finally:
        fake.release()
        ts.close()


def test_threaded_sampler_host_hang_keeps_gpu(monkeypatch):
    fake = FakeNVML()
    gate = threading.Event()
    monkeypatch.setattr("supervisor.telemetry.sampler.sample_host", lambda *a: gate.wait(30))
    ts = ThreadedSampler(Sampler(fake), timeout_s=0.6)
    try:
        s = ts.sample(os.getpid(), "/tmp")
        assert s.nvml == "ok" and len(s.gpus) == 1 and s.host.mem_total_mib is None
    finally:
        gate.set()
        ts.close()


# ------------------------------------------------------------------------------ host


ALLOC = """
import os, subprocess, sys, time
b = bytearray({mib} << 20)
for i in range(0, len(b), 4096): b[i] = 1
{spawn}
print("ready", flush=True)
time.sleep(60)
"""


def test_host_sample_of_a_real_process_tree(procs):
    child = ALLOC.format(mib=40, spawn="")
    parent = ALLOC.format(
        mib=30,
        spawn=f"c = subprocess.Popen([sys.executable, '-c', {child!r}], stdout=subprocess.PIPE); c.stdout.readline()",
    )
    p = procs(parent)
    assert p.stdout.readline().strip() == b"ready"
    st = HostState()
    h = sample_host(p.pid, "/tmp/does/not/exist", st)
    assert len(st.tree_pids) == 2 and st.tree_pids[0] == p.pid
    assert h.trainer_rss_mib > 70 and not h.trainer_partial
    assert h.trainer_uvm_mib == 0.0  # no /dev/nvidia-uvm mapping on a CPU box
    assert h.mem_total_mib > h.mem_available_mib > 0
    assert h.disk_free_gib is not None and h.disk_total_gib >= h.disk_free_gib
    assert h.oom_kill_count is not None and h.swap_used_mib is not None
    assert h.cpu_pct is None  # the first sample has nothing to compare with
    time.sleep(0.05)
    assert sample_host(p.pid, None, st).cpu_pct is not None


def test_children_exiting_mid_sample_do_not_raise(procs):
    p = procs("""
        import subprocess, time
        end = time.time() + 1.5
        while time.time() < end:  # short-lived children: some exit between listing and reading
            subprocess.Popen(['true'])
            time.sleep(0.002)
    """)
    st = HostState(uvm_every_s=0, uvm_budget=1e9)  # maps/smaps too, every time
    while p.poll() is None:
        h = sample_host(p.pid, None, st)
        assert h.trainer_rss_mib is not None
    h = sample_host(p.pid, None, st)  # the root itself gone
    assert h.trainer_partial and h.mem_total_mib


def test_unreadable_and_vanished_processes_are_partial(procs, tmp_path):
    (tmp_path / "1").mkdir()
    (tmp_path / "1/statm").write_text("100 25 0 0 0 0 0\n")
    (tmp_path / "2/statm").mkdir(parents=True)  # reading it fails like EACCES would
    assert tree_rss([1], str(tmp_path)) == (25 * hostmod.PAGE / 2**20, False)
    assert tree_rss([1, 2, 3], str(tmp_path))[1] is True


def test_tree_pids_through_thread_children_files(tmp_path):
    for pid, tids in {
        10: {10: "11 ", 12: "13"},
        11: {11: ""},
        13: {13: "14"},
        14: {14: ""},
    }.items():
        for tid, kids in tids.items():
            d = tmp_path / f"{pid}/task/{tid}"
            d.mkdir(parents=True)
            (d / "children").write_text(kids)
    assert sorted(tree_pids(10, str(tmp_path))) == [10, 11, 13, 14]


def test_uvm_rss_from_smaps_text(tmp_path):
    smaps = (
        "7f00-7f10 rw-s 00000000 00:05 123  /dev/nvidia-uvm\nSize: 65536 kB\nRss: 1024 kB\nPss: 1 kB\n"
        "7f10-7f20 rw-p 00000000 00:00 0 \nSize: 8 kB\nRss: 8 kB\n"
        "7f20-7f30 rw-s 00000000 00:05 123  /dev/nvidia-uvm\nSize: 65536 kB\nRss: 2048 kB\n"
    )
    assert uvm_rss_kib(smaps.encode()) == 3072
    files = {"statm": "1 1 0 0 0 0 0", "smaps": smaps, "maps": smaps.replace("Rss", "")}
    for name, text in files.items():
        (tmp_path / "5").mkdir(exist_ok=True)
        (tmp_path / "5" / name).write_text(text)
    (tmp_path / "5/task/5").mkdir(parents=True)
    (tmp_path / "5/task/5/children").write_text("")
    clock = Clock()
    st = HostState(proc_root=str(tmp_path), sys_root=str(tmp_path), uvm_every_s=10, clock=clock)
    assert hostmod._sample_tree(st, h := hostmod.HostSample(), 5) is None and h.trainer_uvm_mib == 3
    (tmp_path / "5/smaps").write_text("")
    hostmod._sample_tree(st, h := hostmod.HostSample(), 5)
    assert h.trainer_uvm_mib == 3  # cached until uvm_every_s has passed
    clock.t += 10
    hostmod._sample_tree(st, h := hostmod.HostSample(), 5)
    assert h.trainer_uvm_mib == 0
    st.uvm_budget = 1e-12  # any measurable cost now pushes the next refresh far out
    (tmp_path / "5/smaps").write_text(smaps * 2000)
    clock.t += 10
    hostmod._sample_tree(st, h := hostmod.HostSample(), 5)
    assert h.trainer_uvm_mib == 6000 and st.uvm_due > clock.t + 1000


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_cgroup_v2_tightest_limit_wins(tmp_path):
    _write(
        tmp_path,
        {
            "proc/self/cgroup": "0::/user.slice/run.scope\n",
            "sys/fs/cgroup/cgroup.controllers": "cpu memory\n",
            "sys/fs/cgroup/user.slice/memory.max": str(8 << 30),
            "sys/fs/cgroup/user.slice/memory.current": str(3 << 30),
            "sys/fs/cgroup/user.slice/run.scope/memory.max": "max\n",
            "sys/fs/cgroup/user.slice/run.scope/memory.current": str(1 << 30),
            "sys/fs/cgroup/user.slice/run.scope/memory.events": "low 0\nhigh 0\nmax 4\noom 2\noom_kill 2\n",
        },
    )
    proc, sys_ = str(tmp_path / "proc"), str(tmp_path / "sys")
    assert cgroup_memory("self", proc, sys_) == (8192.0, 3072.0, 2)
    (tmp_path / "sys/fs/cgroup/user.slice/run.scope/memory.max").write_text(str(2 << 30))
    assert cgroup_memory("self", proc, sys_) == (2048.0, 1024.0, 2)


def test_cgroup_v2_namespace_and_no_limit(tmp_path):
    _write(
        tmp_path,
        {
            "proc/self/cgroup": "0::/docker/abc\n",  # not visible under our mount: use its root
            "sys/fs/cgroup/cgroup.controllers": "memory\n",
            "sys/fs/cgroup/memory.max": "max\n",
            "sys/fs/cgroup/memory.current": "123\n",
        },
    )
    assert cgroup_memory("self", str(tmp_path / "proc"), str(tmp_path / "sys")) == (
        None,
        None,
        None,
    )
    (tmp_path / "sys/fs/cgroup/memory.max").write_text(str(1 << 30))
    assert cgroup_memory("self", str(tmp_path / "proc"), str(tmp_path / "sys"))[:2] == (
        1024.0,
        123 / 2**20,
    )


def test_cgroup_v1_and_hybrid(tmp_path):
    _write(
        tmp_path,
        {
            "proc/42/cgroup": "5:cpu,cpuacct:/x\n4:memory:/process_api/abc\n0::/\n",
            "sys/fs/cgroup/unified/cgroup.controllers": "",
            "sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712\n",
            "sys/fs/cgroup/memory/process_api/abc/memory.limit_in_bytes": str(4 << 30),
            "sys/fs/cgroup/memory/process_api/abc/memory.usage_in_bytes": str(1 << 30),
            "sys/fs/cgroup/memory/process_api/abc/memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 7\n",
        },
    )
    assert cgroup_memory(42, str(tmp_path / "proc"), str(tmp_path / "sys")) == (4096.0, 1024.0, 7)
    (tmp_path / "sys/fs/cgroup/memory/process_api/abc/memory.limit_in_bytes").write_text(
        "9223372036854771712"
    )
    assert cgroup_memory(42, str(tmp_path / "proc"), str(tmp_path / "sys")) == (None, None, 7)


def test_proc_files_parsing(tmp_path):
    _write(
        tmp_path,
        {
            "meminfo": "MemTotal:       1048576 kB\nMemFree: 1 kB\nMemAvailable:    524288 kB\n"
            "SwapTotal:        2048 kB\nSwapFree:         1024 kB\n",
            "vmstat": "nr_free_pages 1\noom_kill 3\n",
            "stat": "cpu  100 0 100 700 100 0 0 0 0 0\ncpu0 1 2 3\n",
        },
    )
    assert meminfo(str(tmp_path)) == {"total": 1024.0, "available": 512.0, "swap_used": 1.0}
    assert oom_kills(str(tmp_path)) == 3
    st = HostState(proc_root=str(tmp_path))
    assert cpu_percent(st) is None
    (tmp_path / "stat").write_text("cpu  150 0 150 800 100 0 0 0 0 0\n")
    assert cpu_percent(st) == 50.0
    _write(tmp_path, {"vmstat": "nr_free_pages 1\n"})  # a kernel before 4.13
    assert oom_kills(str(tmp_path)) is None


def test_broken_proc_root_gives_none_fields_not_errors(tmp_path, caplog):
    st = HostState(proc_root=str(tmp_path), sys_root=str(tmp_path))
    with caplog.at_level(logging.WARNING):
        h = sample_host(12345, None, st)
        sample_host(12345, None, st)
    assert h.mem_total_mib is None and h.cpu_pct is None and h.cgroup_limit_mib is None
    assert h.trainer_rss_mib is None or h.trainer_partial
    assert len(caplog.records) == len({r.message for r in caplog.records})  # each logged once


def test_disk_usage_of_nearest_existing_parent(tmp_path):
    free, total = disk_usage(str(tmp_path / "a/b/c"))
    assert 0 <= free <= total



"""Supervisor-side CPU cost of telemetry sampling, against FakeNVML and (when present) real NVML.

    python bench/telemetry_cost.py --seconds 20 --hz 1 10

Spawns a live process tree (a parent and children that each touch some memory), samples it
with the real host sampler at --hz for --seconds, and divides this process's CPU time
(all threads: time.process_time) by the number of samples. Run on a GPU box, it repeats the
loop with the real driver. Also prints a per-part breakdown and what psutil's
children(recursive=True) would cost on this host, for comparison with /proc task/children.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

import psutil  # noqa: E402

from supervisor.telemetry import host  # noqa: E402
from supervisor.telemetry.nvml import Nvml  # noqa: E402
from supervisor.telemetry.sampler import Sampler, ThreadedSampler  # noqa: E402
from tests.fakes.nvml import FakeNVML  # noqa: E402

CHILD = """
import sys, time
b = bytearray({mib} << 20)
for i in range(0, len(b), 4096): b[i] = 1
print("ready", flush=True)
time.sleep(3600)
"""
PARENT = """
import subprocess, sys, threading, time
b = bytearray({mib} << 20)
for i in range(0, len(b), 4096): b[i] = 1
kids = [subprocess.Popen([sys.executable, "-c", {child!r}], stdout=subprocess.PIPE) for _ in range({n})]
for k in kids: k.stdout.readline()
for _ in range({threads}): threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()
print("ready", flush=True)
time.sleep(3600)
"""


NVML_CALLS: dict[str, tuple] = {
    "nvmlDeviceGetUtilizationRates": (),
    "nvmlDeviceGetMemoryInfo": (),
    "nvmlDeviceGetTemperatureV": (0,),
    "nvmlDeviceGetPowerUsage": (),
    "nvmlDeviceGetClockInfo": (1,),
    "nvmlDeviceGetCurrentClocksEventReasons": (),
    "nvmlDeviceGetComputeRunningProcesses": (),
    "nvmlDeviceGetMarginTemperature": (),
    "nvmlDeviceGetFieldValues": ([82, 74, 76, 269, 270, 271],),
    "nvmlDeviceGetPcieThroughput": (0,),
}


def spawn_tree(children: int, mib: int, threads: int) -> subprocess.Popen:
    """A trainer-shaped tree: a parent with `threads` threads and `children` workers."""
    code = PARENT.format(mib=mib, child=CHILD.format(mib=mib), n=children, threads=threads)
    p = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, start_new_session=True
    )
    assert p.stdout is not None and p.stdout.readline().strip() == b"ready"
    return p


def run_loop(sample: Callable[[], object], seconds: float, hz: float) -> tuple[int, float, float]:
    """(samples, CPU seconds of this process, wall seconds) for sampling at hz."""
    period, n = 1.0 / hz, 0
    cpu0, wall0 = time.process_time(), time.monotonic()
    next_t = wall0
    while time.monotonic() - wall0 < seconds:
        sample()
        n += 1
        next_t += period
        time.sleep(max(0.0, next_t - time.monotonic()))
    return n, time.process_time() - cpu0, time.monotonic() - wall0


def per_call_ms(fn: Callable[[], object], n: int) -> float:
    """CPU ms per call of fn, over n calls."""
    fn()
    cpu0 = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - cpu0) * 1000 / n


def report(label: str, n: int, cpu: float, wall: float) -> None:
    ms = cpu * 1000 / n
    print(
        f"{label}: {n} samples in {wall:.1f}s wall, {cpu * 1000:.0f} ms CPU -> "
        f"cpu per sample: {ms:.3f} ms; at 1 Hz: {ms / 10:.3f} % of one core"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--seconds", type=float, default=20.0, help="sampling time per variant and rate"
    )
    ap.add_argument(
        "--hz",
        type=float,
        nargs="+",
        default=[1.0, 10.0],
        help="rates to run (10 Hz: a stabler number)",
    )
    ap.add_argument("--children", type=int, default=3, help="worker processes in the tree")
    ap.add_argument(
        "--threads", type=int, default=40, help="extra threads in the parent (a trainer has dozens)"
    )
    ap.add_argument("--mib", type=int, default=200, help="MiB each process touches")
    ap.add_argument("--gpus", type=int, default=1, help="FakeNVML devices")
    args = ap.parse_args()

    tree = spawn_tree(args.children, args.mib, args.threads)
    disk = str(Path.cwd())
    try:
        st = host.HostState()
        pids = host.tree_pids(tree.pid)
        nthreads = sum(len(os.listdir(f"/proc/{p}/task")) for p in pids)
        print(
            f"host: {os.cpu_count()} CPUs, {len(psutil.pids())} processes; tree: {len(pids)} "
            f"processes, {nthreads} threads, RSS {host.tree_rss(pids)[0]:.0f} MiB"
        )
        fake = FakeNVML(args.gpus)
        fake.open()
        parts = {
            "meminfo": lambda: host.meminfo(),
            "cpu (/proc/stat)": lambda: host.cpu_percent(st),
            "vmstat oom_kill": lambda: host.oom_kills(),
            "cgroup": lambda: host.cgroup_memory("self", state=st),
            "disk_usage": lambda: host.disk_usage(disk),
            "tree_pids (task/children)": lambda: host.tree_pids(tree.pid),
            "tree RSS (statm)": lambda: host.tree_rss(pids),
            "tree uvm (maps gate; no uvm here)": lambda: host.tree_uvm(pids),
            "smaps of the tree (if uvm were mapped)": lambda: [
                host._read(f"/proc/{p}/smaps") for p in pids
            ],
            "psutil children(recursive) [not used]": lambda: psutil.Process(tree.pid).children(
                recursive=True
            ),
            f"FakeNVML sample_gpus x{args.gpus}": lambda: fake.sample_gpus(set(pids)),
        }
        print("per-part CPU per call:")
        for name, fn in parts.items():
            print(f"  {name:40s} {per_call_ms(fn, 20 if 'smaps' in name else 200):8.3f} ms")

        variants: list[tuple[str, Callable[[], object]]] = []
        direct = Sampler(FakeNVML(args.gpus))
        variants.append(("Sampler + FakeNVML", lambda: direct.sample(tree.pid, disk)))
        threaded = ThreadedSampler(Sampler(FakeNVML(args.gpus)), timeout_s=2.0)
        variants.append(("ThreadedSampler + FakeNVML", lambda: threaded.sample(tree.pid, disk)))
        real = Nvml()
        status = real.open()
        print(
            f"real NVML: {status}"
            + (f" ({real.device_count()} GPUs, driver {real.driver})" if status == "ok" else "")
        )
        if status == "ok":
            print("real NVML CPU per call (GPU 0; wall for PCIe):")
            handle = real._devices[0].handle
            for name, call_args in NVML_CALLS.items():
                fn = getattr(real.lib, name)
                k = 10 if "Pcie" in name else 200
                w0 = time.perf_counter()
                ms = per_call_ms(lambda fn=fn, a=call_args: fn(handle, *a), k)
                print(
                    f"  {name:40s} {ms:8.3f} ms  ({(time.perf_counter() - w0) * 1000 / (k + 1):.2f} ms wall)"
                )
            real_sampler = ThreadedSampler(Sampler(real), timeout_s=2.0)
            variants.append(
                ("ThreadedSampler + real NVML", lambda: real_sampler.sample(tree.pid, disk))
            )
            print("  first real sample:", real_sampler.sample(tree.pid, disk).gpus[0])
        smaps_ms = per_call_ms(parts["smaps of the tree (if uvm were mapped)"], 10)
        every = max(st.uvm_every_s, smaps_ms / 1000 / st.uvm_budget)
        print(
            f"uvm refresh on a CUDA trainer of this size: {smaps_ms:.1f} ms every {every:.0f} s "
            f"= {smaps_ms / every / 10:.3f} % of one core (not in the loops below: no uvm here)"
        )
        for hz in args.hz:
            print(
                f"loops: {hz:g} Hz for {args.seconds:g} s each (margin, field values, PCIe every 10 s)"
            )
            for label, fn in variants:
                report(f"  {label}", *run_loop(fn, args.seconds, hz))
        threaded.close()
    finally:
        os.killpg(tree.pid, signal.SIGKILL)
        tree.wait()


if __name__ == "__main__":
    main()

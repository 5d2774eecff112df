"""Host telemetry from /proc and /sys: RAM, cgroup limit, swap, the trainer tree, CPU, disk, OOM kills.

Costs (bench/telemetry_cost.py; 2-core VM and H200 host): each small /proc read is 10-30 us.
The trainer tree comes from /proc/PID/task/TID/children, which costs per thread of the tree
(0.13-0.35 ms for 4 processes, 44 threads) and not per process on the host as psutil's
children(recursive=True) does (it reads every /proc/*/stat: 1.7-2.8 ms for ~100-190 entries,
tens of ms on a node with thousands of kernel threads). Total RSS comes from statm (O(1));
smaps and smaps_rollup walk every page table (~10 ms per GiB of RSS), so the /dev/nvidia-uvm
total is refreshed every `uvm_every_s`, and less often when that would cost more than
`uvm_budget` of one core. The /proc and /sys roots are parameters so tests can use fake trees.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from supervisor.records import HostSample

log = logging.getLogger(__name__)

MIB = 1024 * 1024
PAGE = os.sysconf("SC_PAGE_SIZE")
UNLIMITED_V1 = 1 << 60  # cgroup v1 reports "no limit" as PAGE_COUNTER_MAX pages, ~2^63


@dataclass
class HostState:
    """What `sample_host` keeps between calls; it is mutated in place."""

    proc_root: str = "/proc"
    sys_root: str = "/sys"
    uvm_every_s: float = 10.0  # smaps is the one expensive read here: at most this often,
    uvm_budget: float = 0.002  # and less often when it costs more than this share of one core
    clock: Callable[[], float] = time.monotonic
    tree_pids: list[int] = field(default_factory=list)  # last sample's trainer tree, for NVML
    cpu_prev: tuple[int, int] | None = None  # (busy, total) jiffies
    uvm_mib: float | None = None
    uvm_due: float = float("-inf")
    uvm_root: int | None = None
    cgroup_key: str | None = None
    cgroup_dirs: tuple[str, list[Path]] | None = None  # ("v1"|"v2", leaf .. root)
    logged: set[str] = field(default_factory=set)


def _read(path: str | Path) -> bytes:
    """Whole small file as bytes; os.open/read is ~2x cheaper than open().read() in text mode."""
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _kv(data: bytes, key: bytes) -> int | None:
    """The first number after `key` at the start of a line ("oom_kill 3", "MemTotal: 123 kB")."""
    if data.startswith(key):
        i = 0
    else:
        i = data.find(b"\n" + key)
        if i < 0:
            return None
        i += 1
    end = data.find(b"\n", i)
    parts = data[i + len(key) : end if end >= 0 else None].split()
    return int(parts[0]) if parts else None


# ---------------------------------------------------------------------------- memory and CPU


def meminfo(proc_root: str = "/proc") -> dict[str, float | None]:
    """MemTotal, MemAvailable and swap used (MiB) from one read of /proc/meminfo."""
    data = _read(f"{proc_root}/meminfo")
    kib = {
        k: _kv(data, k.encode() + b":")
        for k in ("MemTotal", "MemAvailable", "SwapTotal", "SwapFree")
    }
    swap = (
        None
        if kib["SwapTotal"] is None or kib["SwapFree"] is None
        else kib["SwapTotal"] - kib["SwapFree"]
    )
    to_mib = lambda v: None if v is None else v / 1024  # noqa: E731
    return {
        "total": to_mib(kib["MemTotal"]),
        "available": to_mib(kib["MemAvailable"]),
        "swap_used": to_mib(swap),
    }


def cpu_percent(state: HostState) -> float | None:
    """System CPU busy % since the previous call (None on the first); psutil's formula, no global state."""
    fields = [int(x) for x in _read(f"{state.proc_root}/stat").split(b"\n", 1)[0].split()[1:9]]
    total = sum(fields)  # user nice system idle iowait irq softirq steal (guest is inside user)
    busy = total - fields[3] - fields[4]
    prev, state.cpu_prev = state.cpu_prev, (busy, total)
    if prev is None or total <= prev[1]:
        return None
    return max(0.0, min(100.0, 100.0 * (busy - prev[0]) / (total - prev[1])))


def oom_kills(proc_root: str = "/proc") -> int | None:
    """Host-wide OOM-killer victims since boot (/proc/vmstat oom_kill, kernel 4.13+)."""
    return _kv(_read(f"{proc_root}/vmstat"), b"oom_kill ")


def disk_usage(path: str) -> tuple[float, float]:
    """(free GiB, total GiB) of the filesystem holding `path` or its nearest existing parent."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    u = shutil.disk_usage(p)
    return u.free / 2**30, u.total / 2**30


# ---------------------------------------------------------------------------- cgroup


def _cgroup_dirs(text: str, sys_root: str) -> tuple[str, list[Path]] | None:
    """("v1"|"v2", [leaf, ..., mount root]) for the memory controller named in /proc/PID/cgroup."""
    v1 = v2 = None
    for line in text.splitlines():
        hid, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if "memory" in controllers.split(","):
            v1 = path
        elif hid == "0" and controllers == "":
            v2 = path
    base = Path(sys_root, "fs/cgroup")
    if v1 is not None:  # a v1 memory controller wins: on hybrid hosts v2 has no memory files
        kind, root, rel = "v1", base / "memory", v1
    elif v2 is not None:
        root = base if (base / "cgroup.controllers").exists() else base / "unified"
        kind, rel = "v2", v2
    else:
        return None
    leaf = root / rel.lstrip("/")
    if not leaf.is_dir():  # inside a cgroup namespace or a container the mount root is our cgroup
        leaf = root
    dirs = [leaf]
    while dirs[-1] != root and root in dirs[-1].parents:
        dirs.append(dirs[-1].parent)
    return kind, dirs


def _int_file(path: Path) -> int | None:
    try:
        raw = _read(path).strip()
    except OSError:
        return None
    return None if raw in (b"max", b"") else int(raw)


def cgroup_memory(
    pid: int | str = "self",
    proc_root: str = "/proc",
    sys_root: str = "/sys",
    state: HostState | None = None,
) -> tuple[float | None, float | None, int | None]:
    """(limit MiB, used MiB, oom_kill count) of the tightest memory limit above `pid`.

    The limit is the lowest memory.max (v2) / memory.limit_in_bytes (v1) from the process's
    cgroup up to the mount root; "used" is read where that limit sits, since that level's
    usage is what the OOM killer compares. oom_kill comes from the leaf: the kernel counts a
    kill in the victim's cgroup and its ancestors. (None, None, n) when no level has a limit.
    """
    text = _read(f"{proc_root}/{pid}/cgroup").decode(errors="replace")
    if state is not None and state.cgroup_key == text and state.cgroup_dirs is not None:
        resolved: tuple[str, list[Path]] | None = state.cgroup_dirs
    else:
        resolved = _cgroup_dirs(text, sys_root)
        if state is not None:
            state.cgroup_key, state.cgroup_dirs = text, resolved
    if resolved is None:
        return None, None, None
    kind, dirs = resolved
    limit_f, used_f, events_f = (
        ("memory.limit_in_bytes", "memory.usage_in_bytes", "memory.oom_control")
        if kind == "v1"
        else ("memory.max", "memory.current", "memory.events")
    )
    best: tuple[int, Path] | None = None
    for d in dirs:
        limit = _int_file(d / limit_f)
        if limit is not None and limit < UNLIMITED_V1 and (best is None or limit < best[0]):
            best = (limit, d)
    try:
        oom = _kv(_read(dirs[0] / events_f), b"oom_kill ")
    except OSError:
        oom = None
    if best is None:
        return None, None, oom
    used = _int_file(best[1] / used_f)
    return best[0] / MIB, None if used is None else used / MIB, oom


# ---------------------------------------------------------------------------- the trainer tree


def tree_pids(root: int, proc_root: str = "/proc") -> list[int]:
    """root and all its descendants, through every thread's children file (any thread may fork)."""
    seen, todo = [root], [root]
    while todo:
        pid = todo.pop()
        try:
            tids = os.listdir(f"{proc_root}/{pid}/task")
        except OSError:  # gone (or hidden): its children, if any, were re-parented
            continue
        for tid in tids:
            try:
                kids = _read(f"{proc_root}/{pid}/task/{tid}/children").split()
            except FileNotFoundError:
                if not os.path.exists(f"{proc_root}/{pid}/task/{tid}"):
                    continue  # the thread exited
                return _tree_psutil(root)  # kernel without CONFIG_PROC_CHILDREN
            except OSError:
                continue
            for k in map(int, kids):
                if k not in seen:
                    seen.append(k)
                    todo.append(k)
    return seen


def _tree_psutil(root: int) -> list[int]:
    try:
        return [root] + [c.pid for c in psutil.Process(root).children(recursive=True)]
    except psutil.Error:
        return [root]


def tree_rss(pids: list[int], proc_root: str = "/proc") -> tuple[float, bool]:
    """(RSS MiB summed over pids from /proc/PID/statm, partial) - partial when any was unreadable.

    A process that vanished between listing and reading, or that we may not read, makes the
    total partial (RELIABILITY_PLAN F5); a zombie reads as 0, which is what it holds.
    Shared pages of forked workers are counted once per process, as top's RES does.
    """
    total, partial = 0, False
    for pid in pids:
        try:
            total += int(_read(f"{proc_root}/{pid}/statm").split()[1]) * PAGE
        except (OSError, IndexError, ValueError):
            partial = True
    return total / MIB, partial


def uvm_rss_kib(smaps: bytes) -> int:
    """Sum of Rss over the /dev/nvidia-uvm mappings in one /proc/PID/smaps text."""
    total, i = 0, 0
    while (i := smaps.find(b"/dev/nvidia-uvm\n", i)) >= 0:
        j = smaps.find(b"\nRss:", i)
        if j < 0:
            break
        end = smaps.find(b"\n", j + 1)
        total += int(smaps[j + 5 : end if end >= 0 else None].split()[0])
        i = j + 5
    return total


def tree_uvm(pids: list[int], proc_root: str = "/proc") -> tuple[float, bool]:
    """(MiB of /dev/nvidia-uvm mappings resident in RAM over pids, partial).

    /proc/PID/maps (no page-table walk, ~40 us) says whether a process maps the device at all;
    only those pay for smaps (~10 ms per GiB of RSS: it walks every page table).
    """
    total, partial = 0, False
    for pid in pids:
        try:
            if b"/dev/nvidia-uvm" in _read(f"{proc_root}/{pid}/maps"):
                total += uvm_rss_kib(_read(f"{proc_root}/{pid}/smaps"))
        except (OSError, ValueError):
            partial = True
    return total / 1024, partial


# ---------------------------------------------------------------------------- one sample


def _guard(state: HostState, part: str, fn: Callable[[], object]) -> object:
    """fn() or None: telemetry never raises; each broken part is logged once."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001
        if part not in state.logged:
            state.logged.add(part)
            log.warning("host telemetry: %s unavailable: %r", part, e)
        return None


def sample_host(
    trainer_root_pid: int | None, disk_path: str | None, prev_state: HostState | None = None
) -> HostSample:
    """One HostSample; `prev_state` carries CPU counters and caches between calls (mutated)."""
    st = prev_state if prev_state is not None else HostState()
    h = HostSample()
    mem = _guard(st, "meminfo", lambda: meminfo(st.proc_root))
    if isinstance(mem, dict):
        h.mem_total_mib, h.mem_available_mib, h.swap_used_mib = (
            mem["total"],
            mem["available"],
            mem["swap_used"],
        )
    h.cpu_pct = _guard(st, "cpu", lambda: cpu_percent(st))  # type: ignore[assignment]
    h.oom_kill_count = _guard(st, "vmstat", lambda: oom_kills(st.proc_root))  # type: ignore[assignment]
    cg_pid: int | str = (
        trainer_root_pid
        if trainer_root_pid and os.path.exists(f"{st.proc_root}/{trainer_root_pid}")
        else "self"
    )
    cg = _guard(st, "cgroup", lambda: cgroup_memory(cg_pid, st.proc_root, st.sys_root, st))
    if isinstance(cg, tuple):
        h.cgroup_limit_mib, h.cgroup_used_mib, h.cgroup_oom_kill_count = cg
    if disk_path:
        du = _guard(st, "disk", lambda: disk_usage(disk_path))
        if isinstance(du, tuple):
            h.disk_free_gib, h.disk_total_gib = du
    st.tree_pids = []
    if trainer_root_pid:
        _sample_tree(st, h, trainer_root_pid)
    return h


def _sample_tree(st: HostState, h: HostSample, root: int) -> None:
    pids = _guard(st, "tree", lambda: tree_pids(root, st.proc_root))
    if not isinstance(pids, list):
        h.trainer_partial = True
        return
    st.tree_pids = pids
    rss = _guard(st, "rss", lambda: tree_rss(pids, st.proc_root))
    if isinstance(rss, tuple):
        h.trainer_rss_mib, partial = rss
        h.trainer_partial = h.trainer_partial or partial
    now = st.clock()
    if root != st.uvm_root or now >= st.uvm_due:
        cpu0 = time.thread_time()
        uvm = _guard(st, "uvm", lambda: tree_uvm(pids, st.proc_root))
        cost = time.thread_time() - cpu0  # a 20 GiB trainer: ~0.2 s, so every 100 s at 0.2 %
        st.uvm_mib = uvm[0] if isinstance(uvm, tuple) else None
        st.uvm_root, st.uvm_due = root, now + max(st.uvm_every_s, cost / st.uvm_budget)
    h.trainer_uvm_mib = st.uvm_mib  # between refreshes, the last value

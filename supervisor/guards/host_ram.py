"""Host RAM guard: warn before the kernel OOM killer picks the trainer."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from supervisor.guards.base import GIB, Action, Warn, Window, gib, warn
from supervisor.numbers import is_finite
from supervisor.records import HostSample

if TYPE_CHECKING:  # config types only: guards import no pydantic
    from supervisor.recipe import HostRamGuard

GUARD = "host_ram"


def headroom_mib(h: HostSample) -> tuple[float | None, str]:
    """Available MiB: MemAvailable or the cgroup's limit - used, whichever is smaller."""
    candidates: list[tuple[float, str]] = []
    if is_finite(h.mem_available_mib):
        candidates.append((float(h.mem_available_mib), "MemAvailable"))  # type: ignore[arg-type]
    if is_finite(h.cgroup_limit_mib) and is_finite(h.cgroup_used_mib):
        candidates.append((float(h.cgroup_limit_mib - h.cgroup_used_mib), "cgroup memory.max - memory.current"))  # type: ignore[operator]
    if not candidates:
        return None, ""
    return min(candidates)


def check(window: Window, cfg: HostRamGuard) -> list[Action]:
    """Warn when available RAM is under the floor or swap grew over the window."""
    hosts = [(s.t, s.host) for s in window.samples]
    if not hosts:
        return []
    actions: list[Action] = []
    t, h = hosts[-1]
    avail, source = headroom_mib(h)
    floor_mib = cfg.min_available_gib * 1024
    extras: dict[str, Any] = {"trainer_rss_mib": h.trainer_rss_mib, "trainer_uvm_mib": h.trainer_uvm_mib,
                              "swap_used_mib": h.swap_used_mib}
    if avail is not None and avail < floor_mib:
        who = ""
        if is_finite(h.trainer_rss_mib):
            who = f"; the trainer holds {h.trainer_rss_mib / 1024:,.1f} GB"  # type: ignore[operator]
            if is_finite(h.trainer_uvm_mib) and h.trainer_uvm_mib:
                who += f" ({h.trainer_uvm_mib / 1024:,.1f} GB paged optimiser state)"  # type: ignore[operator]
        msg = (f"host RAM low: {avail / 1024:,.1f} GB available ({source}), "
               f"warn under {cfg.min_available_gib:g} GB{who}; the kernel may kill the trainer")
        actions += warn(window, GUARD, "host_ram:low", msg,
                        {"available_mib": avail, "source": source, "threshold_mib": floor_mib,
                         "mem_available_mib": h.mem_available_mib, "cgroup_limit_mib": h.cgroup_limit_mib,
                         "cgroup_used_mib": h.cgroup_used_mib, **extras})

    swaps = [(st, hs.swap_used_mib) for st, hs in hosts if is_finite(hs.swap_used_mib)]
    if len(swaps) >= 2:
        low = min(v for _, v in swaps)  # growth from the window's lowest point, not its first
        low_t = next(st for st, v in swaps if v == low)
        grew = swaps[-1][1] - low  # type: ignore[operator]
        if grew > cfg.swap_growth_mib:
            msg = (f"swap grew {grew:,.0f} MiB in {swaps[-1][0] - low_t:,.0f} s "
                   f"(now {swaps[-1][1]:,.0f} MiB): the host is short of RAM and training will slow")
            actions += warn(window, GUARD, "host_ram:swap", msg,
                            {"swap_growth_mib": grew, "threshold_mib": cfg.swap_growth_mib,
                             "swap_from_mib": low, "swap_to_mib": swaps[-1][1], "over_s": swaps[-1][0] - low_t,
                             **extras})
    return actions


def prelaunch_host_ram(available_bytes: int | None, needed_bytes: int | None, cfg: HostRamGuard) -> list[Action]:
    """Before launch: warn when the estimate leaves less than min_available_gib free."""
    if not cfg.enabled or available_bytes is None or needed_bytes is None:
        return []
    left = available_bytes - needed_bytes
    floor = cfg.min_available_gib * GIB
    if left >= floor:
        return []
    msg = (f"host RAM: the trainer needs about {gib(needed_bytes)} and {gib(available_bytes)} is "
           f"available, leaving {gib(max(left, 0))}" + (" (short)" if left < 0 else "")
           + f"; the guard wants {cfg.min_available_gib:g} GB spare. Close other programs, "
           "lower dataloader workers, or use a non-paged optimiser")
    return [Warn(guard=GUARD, message=msg, key="host_ram:prelaunch",
                 evidence={"available_bytes": available_bytes, "needed_bytes": needed_bytes,
                           "left_bytes": left, "threshold_bytes": floor})]

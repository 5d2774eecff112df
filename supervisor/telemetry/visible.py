"""Which NVML GPUs are the run's: `CUDA_VISIBLE_DEVICES` mapped onto NVML's devices.

On a box with several GPUs (or another user's job on the same card) only the run's devices may
drive its guards and the header; the dashboard still shows the others, marked as not this
run's. CUDA's rules, as the driver applies them:

- unset: every GPU is visible;
- a comma-separated list of entries; an entry is an index (`1`), a GPU UUID or a unique prefix
  of one (`GPU-8f2a…`, the `GPU-` optional), or a MIG instance (`MIG-<uuid>`, or the older
  `MIG-GPU-<uuid>/<gi>/<ci>`), which makes its parent GPU visible;
- an entry that matches nothing (or `-1`, or a repeat) hides it and every entry after it;
  an empty value hides every GPU.

Indices are CUDA's ordinals: they equal NVML's (PCI bus) order when `CUDA_DEVICE_ORDER=PCI_BUS_ID`
and on boxes of one GPU model; UUIDs are exact everywhere. Stdlib only.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Device:
    index: int  # NVML's index
    uuid: str | None
    mig_uuids: tuple[str, ...] = field(default_factory=tuple)


def _norm(u: str) -> str:
    return u.strip().lower()


def _match(entry: str, devices: list[Device]) -> int | None:
    e = entry.strip()
    if not e:
        return None
    if e.lstrip("+").isdigit():  # a CUDA ordinal (strtol accepts a sign)
        i = int(e)
        ordered = sorted(devices, key=lambda d: d.index)
        return ordered[i].index if 0 <= i < len(ordered) else None
    low = _norm(e)
    if low.startswith("mig-"):
        for d in devices:
            if any(_norm(m) == low for m in d.mig_uuids):
                return d.index
        if low.startswith("mig-gpu-"):  # MIG-GPU-<uuid>/<gi>/<ci>: its parent's uuid
            parent = "gpu-" + low[len("mig-gpu-"):].split("/", 1)[0]
            return _by_uuid(parent, devices, exact=True)
        return None
    if not low.startswith("gpu-"):
        low = "gpu-" + low
    return _by_uuid(low, devices, exact=False)


def _by_uuid(prefix: str, devices: list[Device], exact: bool) -> int | None:
    hits = [d.index for d in devices if d.uuid and (
        _norm(d.uuid) == prefix if exact else _norm(d.uuid).startswith(prefix))]
    return hits[0] if len(hits) == 1 else None  # an ambiguous prefix matches nothing


def resolve(cvd: str | None, devices: list[Device]) -> set[int] | None:
    """NVML indices of the GPUs a process with this CUDA_VISIBLE_DEVICES sees; None: all."""
    order = resolve_ordered(cvd, devices)
    return None if order is None else set(order)


def resolve_ordered(cvd: str | None, devices: list[Device]) -> list[int] | None:
    """The same in CUDA's order: element 0 is the process's `cuda:0`; None: all, NVML's order."""
    if cvd is None:
        return None
    out: list[int] = []
    for entry in cvd.split(","):
        hit = _match(entry, devices)
        if hit is None or hit in out:
            break  # CUDA stops at the first entry it cannot use
        out.append(hit)
    return out

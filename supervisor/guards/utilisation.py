"""Utilisation guard: the GPU sat mostly idle while training; say the likely cause."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from supervisor.guards.base import Action, Window, mean, warn
from supervisor.numbers import is_finite

if TYPE_CHECKING:  # config types only: guards import no pydantic
    from supervisor.recipe import UtilisationGuard

GUARD = "utilisation"
# Paged optimiser state moving between host and GPU shows as unified memory growing in the
# trainer's /dev/nvidia-uvm mapping while PCIe traffic is high.
UVM_GROWTH_MIB = 64.0
PCIE_BUSY_KBS = 200_000.0  # 200 MB/s: far above a tokenised batch per step
CPU_BUSY_PCT = 85.0
COVERAGE = 0.9  # samples must span this share of window_s


def _alloc_conf(env: dict[str, str]) -> str:
    # torch >= 2.9 reads PYTORCH_ALLOC_CONF; PYTORCH_CUDA_ALLOC_CONF is the older name.
    return ",".join(v for k in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF") if (v := env.get(k)))


def has_expandable_segments(env: dict[str, str]) -> bool:
    opts = [o.strip().replace(" ", "") for o in _alloc_conf(env).split(",")]
    return any(o.lower() == "expandable_segments:true" for o in opts)


def check(window: Window, cfg: UtilisationGuard) -> list[Action]:
    """Warn when mean GPU util stayed under threshold_pct for a whole window_s of training."""
    if window.phase != "training":
        return []
    start = window.now - cfg.window_s
    if window.phase_since is not None and window.phase_since > start:
        return []  # not training for a whole window yet (warm-up is slow by design)
    samples = [s for s in window.samples if s.t >= start]
    per_sample = []
    for s in samples:
        u = mean(g.util_pct for g in s.gpus if not g.lost and g.this_run)  # not another job's GPU
        if u is not None:
            per_sample.append((s.t, u))
    if len(per_sample) < 2 or per_sample[-1][0] - per_sample[0][0] < COVERAGE * cfg.window_s:
        return []
    util = mean(u for _, u in per_sample)
    if util is None or util >= cfg.threshold_pct:
        return []

    uvm = [s.host.trainer_uvm_mib for s in samples if is_finite(s.host.trainer_uvm_mib)]
    uvm_growth = (uvm[-1] - min(uvm)) if len(uvm) >= 2 else None  # type: ignore[operator]
    pcie = mean(
        ((g.pcie_rx_kbs or 0.0) + (g.pcie_tx_kbs or 0.0))
        for s in samples for g in s.gpus
        if not g.lost and g.this_run and (is_finite(g.pcie_rx_kbs) or is_finite(g.pcie_tx_kbs))
    )
    cpu = mean(s.host.cpu_pct for s in samples)
    expandable = has_expandable_segments(window.env)
    ev: dict[str, Any] = {
        "gpu_util_mean_pct": round(util, 1), "gpu_util_max_pct": max(u for _, u in per_sample),
        "threshold_pct": cfg.threshold_pct, "window_s": cfg.window_s, "samples": len(per_sample),
        "trainer_uvm_growth_mib": uvm_growth, "pcie_mean_kbs": pcie, "host_cpu_mean_pct": cpu,
        "alloc_conf": _alloc_conf(window.env) or None, "expandable_segments": expandable,
    }
    if uvm_growth is not None and uvm_growth >= UVM_GROWTH_MIB and (pcie is None or pcie >= PCIE_BUSY_KBS):
        cause = "paged_eviction"
        why = (f"paged optimiser state is moving between host and GPU (unified memory grew "
               f"{uvm_growth:,.0f} MiB" + (f", PCIe {pcie / 1e6:,.2f} GB/s" if pcie is not None else "")
               + "); lower the batch or sequence length so optimiser state stays on the GPU")
    elif not expandable:
        cause = "no_expandable_segments"
        why = ("PYTORCH_CUDA_ALLOC_CONF lacks expandable_segments:True: the allocator fragments "
               "and stalls on cudaMalloc/free; set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True")
    elif cpu is not None and cpu >= CPU_BUSY_PCT:
        cause = "cpu_bound"
        why = (f"the host CPU is busy ({cpu:.0f} %): data loading or tokenising is the bottleneck; "
               "raise dataloader_workers or pre-tokenise")
    else:
        cause = "small_batch"
        why = "the GPU is starved: batch or sequence too small for this card (try packing or a larger batch)"
    ev["cause"] = cause
    msg = (f"GPU utilisation averaged {util:.0f} % over the last {cfg.window_s / 60:g} min "
           f"(under {cfg.threshold_pct:.0f} %): likely {why}")
    return warn(window, GUARD, f"utilisation:{cause}", msg, ev)

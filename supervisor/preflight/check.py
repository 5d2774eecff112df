"""The preflight check: the memory model (preflight/memory.py) against this machine
(preflight/machine.py) or the sizes given, the verdict, what would fit (preflight/advice.py),
and the table or JSON that `qlora-watch preflight` and `start` print.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from supervisor.preflight.advice import margin_line, safer, suggest
from supervisor.preflight.emulation import MIB, card_total_bytes
from supervisor.preflight.machine import detect_gpu, host_available, nearest_existing
from supervisor.preflight.memory import (
    CALIBRATION,
    CPU_SOURCE,
    EXIT_ERROR,
    GB,
    GIB,
    Budget,
    Calibration,
    FitReport,
    card_need,
    disk_components,
    estimate_notes,
    gib,
    host_components,
    setup_line,
    vram_components,
)
from supervisor.preflight.shapes import ShapeError, resolve_shape
from supervisor.recipe import Recipe


def _card(recipe: Recipe, gpu_mem_gib: float | None, nvml: Any) -> tuple[float | None, str]:
    """(card bytes, where that came from): --gpu-mem, the recipe, else NVML; a rehearsed card
    (hardware.emulate_vram_gib) below that. A size in GB is the card's total as nvidia-smi
    shows it (24: 24,564 MiB, supervisor/preflight/emulation.py)."""
    hw = recipe.hardware
    if recipe.train.use_cpu is True:
        return None, CPU_SOURCE
    given = gpu_mem_gib if gpu_mem_gib is not None else hw.gpu_mem_gib
    if given is not None:
        card: float | None = float(card_total_bytes(given))
        flag = "--gpu-mem" if gpu_mem_gib is not None else "hardware.gpu_mem_gib"
        src = f"{flag} {given:g}: {card / MIB:,.0f} MiB"
    else:
        card, src = detect_gpu(nvml)
    if hw.emulate_vram_gib is None:
        return card, src
    cap = float(card_total_bytes(hw.emulate_vram_gib))
    src += (f"; rehearsing a {hw.emulate_vram_gib:g} GB card ({cap / MIB:,.0f} MiB, "
            f"hardware.emulate_vram_gib, {hw.emulate_mode} mode)")
    return (cap if card is None else min(card, cap)), src


def estimate(recipe: Recipe, gpu_mem_gib: float | None = None, host_ram_gib: float | None = None,
             disk_free_gib: float | None = None, cal: Calibration = CALIBRATION,
             nvml: Any = None) -> FitReport:
    """Estimate peak VRAM, host RAM and disk for `recipe`, and say whether it fits."""
    shape = resolve_shape(recipe)
    on_cpu = recipe.train.use_cpu is True
    vram = vram_components(shape, recipe, cal)
    card, src = _card(recipe, gpu_mem_gib, nvml)
    need = card_need(vram)
    # within the estimate's error over the card is "tight", not a refusal
    vb = Budget(need, card, src, None if card is None else need <= card * (1 + cal.estimate_error))

    host = host_components(shape, recipe, vram, cal, on_cpu)
    if host_ram_gib is not None:
        have_h, hsrc = host_ram_gib * GIB, f"--host-ram {host_ram_gib:g}"
    elif recipe.hardware.host_ram_gib is not None:
        have_h = recipe.hardware.host_ram_gib * GIB
        hsrc = f"hardware.host_ram_gib {recipe.hardware.host_ram_gib:g}"
    else:
        have_h, hsrc = host_available()
    hb = Budget(sum(c.bytes for c in host), have_h, hsrc)

    disk = disk_components(recipe, vram, cal)
    if disk_free_gib is not None:
        have_d, dsrc = disk_free_gib * GIB, f"given: {disk_free_gib:g} GiB free"
    else:
        where = nearest_existing(Path(recipe.train.output_dir))
        have_d, dsrc = float(shutil.disk_usage(where).free), f"free on {where}"
    db = Budget(sum(c.bytes for c in disk), have_d, dsrc)

    report = FitReport(recipe.name, shape, setup_line(shape, recipe, cal), vram + host + disk,
                       vb, hb, db, notes=estimate_notes(shape, recipe, cal, vb), calibration=cal)
    if vb.fits is False:
        report.suggestions = suggest(shape, recipe, report, cal)
    elif report.tight:
        report.suggestions = safer(shape, recipe, report, cal)
    return report


def render_table(report: FitReport) -> str:
    """A plain text table per resource, then the verdict and what would fit."""
    lines = [f"preflight: {report.recipe_name}", f"  {report.setup}", ""]
    titles = {"vram": "GPU memory (peak)", "host": "Host RAM", "disk": "Disk (output_dir)"}
    budgets = {"vram": report.vram, "host": report.host, "disk": report.disk}
    for sec, title in titles.items():
        lines.append(f"{title:<34}{'GiB':>8}  why")
        for c in report.rows(sec):
            val = f"{c.bytes / GIB:8.2f}" if c.counted else f"({c.bytes / GIB:.2f})"
            lines.append(f"  {c.label:<32}{val:>8}  {c.why}")
        lines.append(f"  {'total':<32}{budgets[sec].need / GIB:8.2f}  {_budget_line(budgets[sec])}")
        lines.append("")
    lines.append(f"weights (NF4 + bf16 embeddings/lm_head): {report.weights_bytes / GB:.1f} GB; "
                 f"peak allocated (torch's view): {report.peak_allocated / GB:.1f} GB = "
                 f"{gib(report.peak_allocated)}")
    word = {"fits": "FITS", "does not fit": "DOES NOT FIT", "tight": f"TIGHT ({margin_line(report)})",
            "unknown": "UNKNOWN for the GPU (no card to compare with); host RAM and disk fit"}
    lines.append(f"Verdict: {word[report.verdict]}")
    if report.suggestions:
        title = "To make it safer:" if report.tight and report.fits else "What would fit:"
        lines += [title] + [f"  {x}" for x in report.suggestions]
    lines += [f"note: {n}" for n in report.notes]
    return "\n".join(lines) + "\n"


def _budget_line(b: Budget) -> str:
    if b.have is None:
        return f"[{b.source}]"
    head = b.have - b.need
    state = f"fits, {gib(head)} headroom" if head >= 0 else f"DOES NOT FIT, short by {gib(-head)}"
    if b.fits and head < 0:
        state = f"TIGHT, over by {gib(-head)}, within the estimate's error"
    return f"of {gib(b.have)} [{b.source}]: {state}"


def run_preflight(recipe: Recipe, gpu_mem_gib: float | None = None,
                  host_ram_gib: float | None = None, as_json: bool = False,
                  disk_free_gib: float | None = None) -> tuple[str, int]:
    """(output, exit code) for `qlora-watch preflight`: 0 fits or unknown, 3 does not, 2 error."""
    try:
        report = estimate(recipe, gpu_mem_gib, host_ram_gib, disk_free_gib)
    except ShapeError as e:
        if as_json:
            return json.dumps({"error": str(e), "exit_code": EXIT_ERROR}) + "\n", EXIT_ERROR
        return f"{e}\n", EXIT_ERROR
    if as_json:
        return json.dumps(report.to_dict(), indent=2) + "\n", report.exit_code
    return render_table(report), report.exit_code

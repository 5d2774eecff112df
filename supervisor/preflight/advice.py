"""What would fit: for a recipe that does not fit, the smaller batch, the OOM ladder's rungs or the
real options (a bigger card, two GPUs); for a tight one, the margin and what leaves headroom.
Arithmetic on the memory model (preflight/memory.py), no probing.
"""

from __future__ import annotations

from supervisor import ladder
from supervisor.preflight.memory import (
    COMMON_CARDS,
    GB,
    GIB,
    Calibration,
    FitReport,
    expandable_segments,
    fsdp_two_card_need,
    gib,
    vram_need,
)
from supervisor.preflight.shapes import BUILTIN_SHAPES, ModelShape
from supervisor.recipe import Recipe, apply_rung


def largest_batch(shape: ModelShape, recipe: Recipe, cal: Calibration,
                  limit: float) -> tuple[int, float] | None:
    """(per_device_batch, need): the largest batch below the recipe's that divides its effective
    batch (grad_accum takes the rest) and needs at most `limit` bytes; None if none does."""
    eff = recipe.train.effective_batch
    for b in range(recipe.train.per_device_batch - 1, 0, -1):
        if eff % b == 0:
            r = apply_rung(recipe, {"train.per_device_batch": b, "train.grad_accum": eff // b})
            n = vram_need(shape, r, cal)
            if n <= limit:
                return b, n
    return None


def margin_line(report: FitReport) -> str:
    """'0.6 GiB (2.6 % of the card) against a measured error of 3 %' for a tight verdict."""
    b, e = report.vram, report.calibration.estimate_error
    head = (b.have or 0) - b.need
    pct = 100 * head / (b.have or 1)
    return (f"{'headroom' if head >= 0 else 'over the card by'} {gib(abs(head))} "
            f"({abs(pct):.1f} % of the card) against the estimate's measured error of "
            f"{100 * e:.0f} %")


def safer(shape: ModelShape, recipe: Recipe, report: FitReport, cal: Calibration) -> list[str]:
    """For a tight verdict: the margin, and what leaves real headroom at the same effective batch."""
    card, e = report.vram.have or 0.0, cal.estimate_error
    out = [f"- tight: {margin_line(report)}; it may run, or OOM (the OOM ladder then takes over)"]
    found = largest_batch(shape, recipe, cal, card * (1 - e))
    if found:
        b, n = found
        eff = recipe.train.effective_batch
        out.append(f"- safer: per_device_batch {b} x grad_accum {eff // b} (same effective batch "
                   f"{eff}): {gib(n)} of {gib(card)}, {gib(card - n)} headroom")
    if not expandable_segments(recipe):
        out.append(f"- safer: PYTORCH_CUDA_ALLOC_CONF = \"expandable_segments:True\" in [env] "
                   f"(allocator slack {cal.allocator_slack:.0%} -> {cal.allocator_slack_expandable:.0%})")
    return out


def suggest(shape: ModelShape, recipe: Recipe, report: FitReport, cal: Calibration) -> list[str]:
    """What fits the card: smaller batch, the OOM ladder, or (weights too big) the real options.

    Sets report.first_fitting_rung when a prefix of the ladder fits.
    """
    card = report.vram.have or 0.0
    out: list[str] = []
    floor = report.weights_bytes + cal.cuda_context_gib * GIB
    fixed = False
    if floor > card:
        out.append(f"The weights alone ({report.weights_bytes / GB:.1f} GB: NF4 linear layers + "
                   f"bf16 embeddings/lm_head; {gib(floor)} with the CUDA context) exceed the "
                   f"{gib(card)} card. No OOM-ladder rung can help: the ladder shrinks "
                   "activations and the adapter, never the base weights. What does work:")
        rows = report.rows("vram")
        per = fsdp_two_card_need(rows, shape, False, cal)
        off = fsdp_two_card_need(rows, shape, True, cal)
        out.append(f"- two {card / GIB:g} GiB cards with FSDP-QLoRA: about {gib(per)} per card "
                   "while training (weights, adapter, optimizer halved; activations and the "
                   f"gathered embeddings/lm_head whole): {'fits' if per <= card else 'does not fit'}; "
                   f"with the shards offloaded to CPU RAM about {gib(off)} per card: "
                   f"{'fits' if off <= card else 'does not fit'}. But loading comes first: "
                   "transformers 5 quantises the whole model onto every rank's card before FSDP "
                   "shards it (measured on 2 x H200: +469 MiB per 70B layer on each card before the "
                   f"first step, a whole NF4 layer), so each card needs the single-card {gib(floor)} to load: "
                   f"{'fits' if floor <= card else 'does not fit'}")
    else:
        eff, e = recipe.train.effective_batch, cal.estimate_error
        found = largest_batch(shape, recipe, cal, card * (1 + e))
        if found:
            b, n = found
            word = ("fits" if n <= card * (1 - e) else
                    f"tight ({gib(abs(card - n))} {'headroom' if n <= card else 'over'})")
            out.append(f"- per_device_batch {b} x grad_accum {eff // b} (same effective batch "
                       f"{eff}): {gib(n)} of {gib(card)}, {word}")
            if n > card * (1 - e):
                roomy = largest_batch(shape, apply_rung(recipe, {"train.per_device_batch": b,
                                                                 "train.grad_accum": eff // b}),
                                      cal, card * (1 - e))
                if roomy:
                    out.append(f"- per_device_batch {roomy[0]} x grad_accum {eff // roomy[0]}: "
                               f"{gib(roomy[1])} of {gib(card)}, fits with headroom")
            fixed = True
        done, n = [], 0.0
        for i in range(1, len(recipe.oom_ladder) + 1):
            done.append(f"{ladder.label(i)} ({ladder.describe(recipe, i)})")
            n = vram_need(shape, ladder.effective(recipe, i), cal)
            if n <= card:
                out.append(f"- OOM ladder {' + '.join(done)}: {gib(n)} of {gib(card)}, fits")
                report.first_fitting_rung, report.first_fitting_rung_desc = i, " + ".join(done)
                fixed = True
                break
        else:
            if recipe.oom_ladder:
                out.append(f"- OOM ladder: all {len(recipe.oom_ladder)} rungs still need "
                           f"{gib(n)}: no rung fits")
    cards = [gb for gb, usable in COMMON_CARDS if report.vram.need <= usable * GIB]
    need = gib(report.vram.need)
    out.append(f"- one card of {cards[0]} GB or more (the estimate is {need})" if cards
               else f"- no single common card holds {need}")
    if not fixed:
        smaller = []
        for key, s in sorted(BUILTIN_SHAPES.items(), key=lambda kv: -kv[1].total_params):
            if s.total_params < shape.total_params:
                n = vram_need(s, recipe, cal)
                if n <= card:
                    smaller.append(f"{key} ({gib(n)})")
        out.append("- a smaller model at these settings: "
                   + (", ".join(smaller[:2]) if smaller else "none of the built-in shapes fits"))
    return out

"""Preflight's memory model: peak VRAM, host RAM and disk from the model's shape, no torch.
The check against a machine, the verdict and the output are preflight/check.py; what would fit
is preflight/advice.py; the machine's own sizes are preflight/machine.py.

Every number is arithmetic on the shape and the recipe; every tunable constant is in
`CALIBRATION`, so a GPU session can fit them to measured peaks (target: within 10 %).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from supervisor.preflight.shapes import (
    ALL_LINEAR,
    ModelShape,
    lora_tensors,
    targeted,
)
from supervisor.recipe import Recipe, apply_rung
from supervisor.runner.backends import planned_backend

GIB = 1 << 30
GB = 10**9
EXIT_FITS, EXIT_ERROR, EXIT_DOES_NOT_FIT = 0, 2, 3
# Cards to suggest: (marketing GB, usable GiB NVML reports for the smallest common card of that
# size, approximately: RTX 5090, A100-40GB, L40S, A100/H100-80GB, H100 NVL, H200).
COMMON_CARDS = ((32, 31.4), (40, 39.4), (48, 44.4), (80, 79.1), (96, 93.0), (141, 139.0))
STATIC_KEYS = ("nf4_weights", "embeddings", "lm_head", "small")  # allocated once: no fragmentation
OVERHEAD_KEYS = ("slack", "context")  # on the card but not in torch's max_memory_allocated
ACTIVATION_KEYS = ("checkpoints", "mask", "layer", "head", "act_calibration", "backend")
CPU_SOURCE = "not used (train.use_cpu = true)"


@dataclass(frozen=True)
class Calibration:
    """Every tunable constant of the estimate and where it comes from. Fit them to measurements."""

    # --- weights (bitsandbytes NF4/FP4, blocksize 64)
    nf4_bits: float = 4.0  # two 4-bit codes per byte
    # double quant: 8-bit absmax per 64-block + fp32 absmax of those per 256 blocks = 0.127 bits
    dq_overhead_bits: float = 8 / 64 + 32 / (64 * 256)
    sq_overhead_bits: float = 32 / 64  # single quant: fp32 absmax per 64-block
    # --- adapter and optimizer. trl 1.16's SFTTrainer casts a quantised model's trainable params
    # to bf16 (sft_trainer.py); peft 0.21 alone would leave LoRA A/B in fp32 (4 bytes).
    lora_param_bytes: float = 2.0
    lora_grad_bytes: float = 2.0  # gradients take the parameter's dtype
    adam8_state_bytes: float = 2 + 2 * 4 / 256  # two uint8 moments + fp32 absmax per 256 each
    adam8_min_numel: int = 4096  # bnb keeps 32-bit state for smaller tensors (min_8bit_size)
    adam32_state_bytes: float = 8.0  # two fp32 moments (paged_adamw_32bit)
    paged_min_numel: int = 100_000  # bnb pages (cudaMallocManaged) only state tensors this large
    # --- activations, bytes per token unless said otherwise
    checkpoint_bytes_per_hidden: float = 2.0  # one bf16 hidden state per layer (checkpointing)
    norm_saved_bytes_per_hidden: float = 4.0  # RMSNorm keeps its fp32 upcast input for backward
    # liger-kernel (use_liger_kernel): its RMSNorm keeps the bf16 input + a per-row rstd, its
    # SwiGLU keeps gate and up only (SiLU is recomputed) and writes their gradients in place
    liger_norm_saved_bytes_per_hidden: float = 2.0
    liger_mlp_saved_bytes_per_inter: float = 4.0
    liger_bwd_transient_bytes_per_inter: float = 2.0  # only the gradient of down_proj's input
    dropout_bytes_per_in: float = 3.0  # LoRA dropout, per module: bf16 input copy + bool mask
    attn_saved_bytes_per_q: float = 4.0  # roped q + SDPA output (bf16)
    kv_saved_bytes: float = 4.0  # roped k + v (bf16), per kv feature (per q feature if repeated)
    sdpa_repeat_kv: bool = True  # with a padding mask transformers repeats k/v to all heads
    # Batches with a shorter row carry a padding mask: SDPA then gets the 4-D mask and k/v
    # repeated to every head (transformers 5 drops both for an all-ones mask: is_causal, GQA).
    # The worst case for real data, so preflight assumes it; the calibration runs (every row
    # truncated to max_seq_len) had no padding and are fitted with False.
    assume_padding: bool = True
    sdpa_mask_bytes: float = 3.0  # per batch x seq^2: bool 4-D mask + the bf16 bias SDPA makes
    mlp_saved_bytes_per_inter: float = 6.0  # gate out, SiLU out, up out (bf16) kept for backward
    bwd_transient_bytes_per_inter: float = 4.0  # MLP gradients alive together in backward
    bwd_transient_bytes_per_hidden: float = 4.0  # incoming grad + residual grad
    head_bytes_per_hidden: float = 12.0  # final norm fp32 4 + hidden copy 2 + grads fp32 4, bf16 2
    head_tile_tokens: int = 4096  # trl's chunked log-prob tile: tokens x vocab columns, bf16
    head_tile_vocab: int = 32768
    # "chunked": trl >= 1.16 SFTTrainer's fused LM head never builds the logits (the runner uses
    # it). "full": plain transformers loss, bf16 logits + fp32 upcast + log_softmax (fwd 10 B,
    # bwd 12 B per batch x seq x vocab element).
    logits_mode: str = "chunked"
    full_logits_bytes_per_elem: float = 12.0
    flash_available: bool = False  # flash-attn is rarely installed: flash recipes run as SDPA
    # Multiplies the activation rows (not weights, not full-logits bytes). Fitted on an H200
    # (2026-11-28, bench/gpu_suite.py + bench/fit_estimator.py, docs/benchmarks.md): seven
    # configurations of the 8B, 32B and 70B shapes, fixed-length sequences. The per-tensor count
    # is right as it stands (worst error 4.6 %). An earlier 1.85, fitted to the field notes'
    # single 24.8 GB point, overestimated activations by 1.6x at seq 4096.
    activation_scale: float = 1.0
    # Unsloth backend (model.backend resolving to "unsloth"): its activation rows against the HF
    # path's (checkpoints offloaded to host RAM, padding-free varlen attention, its fused loss).
    # Fitted on an H200 (session 3, bench/peer_speed.py): see docs/benchmarks.md.
    unsloth_activation_scale: float = 0.48
    # --- device overheads
    # CUDA context + cuBLAS workspace, outside the allocator: NVML minus reserved was 764 MiB in
    # six of seven H200 runs (torch 2.11, cu130)
    cuda_context_gib: float = 0.75  # full depth, 2026-12-02: NVML per-process - reserved = 758 MiB
    allocator_slack: float = 0.10  # reserved - allocated, share of the dynamic (non-weight) memory
    # with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (the shipped recipes' [env]): reserved -
    # allocated was 2.1-3.6 % at full depth on the H200 (11 runs, 2026-12-02); 5 % also covers the
    # ~1.5 % per token that the tensor count misses (fit: every full-depth row within -0.8..+1.4 %)
    allocator_slack_expandable: float = 0.05
    # A need within this share of the card either way is "tight", not "fits" / "does not fit":
    # twice the worst full-depth error (1.4 %), as 11 runs on two shapes are a small sample
    # (tests/unit/test_estimator_calibration.py keeps every full-depth row inside it)
    estimate_error: float = 0.03
    # --- host
    host_framework_gib: float = 3.0  # python + torch + CUDA libs + transformers, resident
    host_shard_gb: float = 5.0  # one safetensors shard mapped while its tensors are quantised
    host_dataset_factor: float = 3.0  # tokenised rows (int64 ids, mask, labels) vs JSONL bytes
    host_dataset_default_gib: float = 0.5  # when the data file is not there to measure
    # --- disk
    checkpoint_small_mb: float = 25.0  # scheduler, rng, trainer_state, tokenizer per checkpoint

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


CALIBRATION = Calibration()


@dataclass
class Component:
    """One row of the table: a named amount of memory or disk and why."""

    key: str
    label: str
    bytes: float
    why: str
    section: str = "vram"  # vram | host | disk
    counted: bool = True  # False: shown, but not live at the peak (see `why`)

    def to_dict(self) -> dict[str, Any]:
        b = self.bytes
        return {**asdict(self), "bytes": int(b), "gib": round(b / GIB, 3), "gb": round(b / GB, 3)}


def _gib_or_none(b: float | None) -> float | None:
    return None if b is None else round(b / GIB, 3)


@dataclass
class Budget:
    """Need vs have for one resource; fits is None when `have` is unknown."""

    need: float
    have: float | None
    source: str
    fits: bool | None = None

    def __post_init__(self) -> None:
        if self.have is not None and self.fits is None:
            self.fits = self.need <= self.have

    def to_dict(self) -> dict[str, Any]:
        head = None if self.have is None else self.have - self.need
        return {
            "need_bytes": int(self.need),
            "need_gib": _gib_or_none(self.need),
            "have_bytes": None if self.have is None else int(self.have),
            "have_gib": _gib_or_none(self.have),
            "headroom_gib": _gib_or_none(head),
            "source": self.source,
            "fits": self.fits,
        }


@dataclass
class FitReport:
    """The whole estimate: components, three budgets, verdict and what would fit instead."""

    recipe_name: str
    shape: ModelShape
    setup: str
    components: list[Component]
    vram: Budget
    host: Budget
    disk: Budget
    suggestions: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    calibration: Calibration = CALIBRATION
    first_fitting_rung: int | None = None  # the first ladder rung that fits (ladder.py numbering; --auto-fit)
    first_fitting_rung_desc: str | None = None

    def rows(self, section: str) -> list[Component]:
        return [c for c in self.components if c.section == section]

    @property
    def weights_bytes(self) -> float:
        """NF4 linear weights + bf16 embeddings, lm_head, norms: the floor no ladder rung moves."""
        return sum(c.bytes for c in self.components if c.key in STATIC_KEYS)

    @property
    def peak_allocated(self) -> float:
        """What torch.cuda.max_memory_allocated would say (no context, no slack)."""
        return sum(c.bytes for c in self.rows("vram") if c.counted and c.key not in OVERHEAD_KEYS)

    @property
    def fits(self) -> bool:
        """False when any budget is short; an unknown card (no GPU) does not fail the check."""
        return False not in (self.vram.fits, self.host.fits, self.disk.fits)

    @property
    def tight(self) -> bool:
        """The need is within the estimate's measured error of the card (either side)."""
        b, e = self.vram, self.calibration.estimate_error
        return b.have is not None and b.have * (1 - e) < b.need <= b.have * (1 + e)

    @property
    def verdict(self) -> str:
        if not self.fits:
            return "does not fit"
        if self.tight:
            return "tight"  # exit 0: a run that may fit is not refused; the OOM ladder backs it
        return "unknown" if self.vram.fits is None and self.vram.source != CPU_SOURCE else "fits"

    @property
    def exit_code(self) -> int:
        return EXIT_FITS if self.fits else EXIT_DOES_NOT_FIT

    @property
    def checkpoint_bytes(self) -> float:
        """One checkpoint on disk: adapter + optimizer state + small files."""
        get = {c.key: c.bytes for c in self.components}
        small = self.calibration.checkpoint_small_mb * 1e6
        return get.get("lora_weights", 0) + get.get("optimizer", 0) + small

    def to_dict(self) -> dict[str, Any]:
        margin = sum(c.bytes for c in self.components if c.key == "ram_margin")
        return {
            "recipe": self.recipe_name,
            "setup": self.setup,
            "model": self.shape.to_dict(),
            "components": [c.to_dict() for c in self.components],
            "weights_bytes": int(self.weights_bytes),
            "weights_gb": round(self.weights_bytes / GB, 3),
            "peak_allocated_bytes": int(self.peak_allocated),
            "peak_allocated_gib": round(self.peak_allocated / GIB, 3),
            "vram": self.vram.to_dict(),
            "host": self.host.to_dict(),
            "disk": self.disk.to_dict(),
            "verdict": self.verdict,
            "tight": self.tight,
            "estimate_error": self.calibration.estimate_error,
            "exit_code": self.exit_code,
            "gpu_needed_bytes": int(self.vram.need),
            "host_ram_needed_bytes": int(self.host.need - margin),  # the guard adds its margin
            "checkpoint_bytes": int(self.checkpoint_bytes),
            "first_fitting_rung": self.first_fitting_rung,
            "first_fitting_rung_desc": self.first_fitting_rung_desc,
            "suggestions": self.suggestions,
            "notes": self.notes,
            "calibration": self.calibration.to_dict(),
        }


# ------------------------------------------------------------------------------ adapter, optimizer


def _count(n: float) -> str:
    """6.98e9 -> '6.98 B', 4.19e7 -> '41.9 M', 2e4 -> '20.0 k'."""
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.{2 if unit == 'B' else 1}f} {unit}"
    return f"{n:.0f}"


def optimizer_bytes(
    tensors: list[tuple[int, int]], optim: str, cal: Calibration
) -> tuple[float, float]:
    """(state bytes, of which paged) for the trainable tensors under `optim`."""
    total = paged = 0.0
    for numel, count in tensors:
        if "8bit" in optim:
            per = cal.adam8_state_bytes if numel >= cal.adam8_min_numel else cal.adam32_state_bytes
        elif optim == "paged_adamw_32bit":
            per = cal.adam32_state_bytes
        else:  # torch AdamW: two moments in the parameter's dtype
            per = 2 * cal.lora_param_bytes
        total += per * numel * count
        if optim.startswith("paged") and numel >= cal.paged_min_numel:
            paged += per * numel * count
    return total, paged


def adapter_components(shape: ModelShape, recipe: Recipe, cal: Calibration) -> list[Component]:
    """LoRA weights, their gradients and the optimizer state."""
    tensors, _ = lora_tensors(shape, recipe)
    n = sum(numel * count for numel, count in tensors)
    opt, paged = optimizer_bytes(tensors, recipe.train.optim, cal)
    why = f"{recipe.train.optim}: {opt / max(n, 1):.2f} B/param"
    if paged:
        why += f"; {paged / opt:.0%} paged (managed memory: on the card while resident)"
    p, g = cal.lora_param_bytes, cal.lora_grad_bytes
    how = "bf16: trl casts a 4-bit model's adapter"
    if not recipe.quant.load_in_4bit:  # peft upcasts LoRA to fp32; trl only casts for 4/8-bit
        p, g, how = 4.0, 4.0, "fp32: peft's autocast_adapter_dtype"
    grads = Component("lora_grads", "LoRA gradients", n * g, f"{_count(n)} params x {g:g} B")
    if recipe.train.grad_accum == 1:  # freed at each step (set_to_none); built layer by layer in
        # backward as the checkpoints go: not there at the peak (H200: 8 x 1 vs 8 x 2 = +320 MiB)
        grads.counted, grads.why = False, grads.why + "; grad_accum 1: none alive at the peak"
    rows = [Component("lora_weights", "LoRA adapter", n * p, f"{_count(n)} params x {p:g} B ({how})"),
            grads, Component("optimizer", "optimizer state", opt, why)]
    if paged:  # managed memory: evicted to host RAM under pressure, never the process's NVML
        rows[-1].counted = False
        rows[-1].why += "; evicted to host RAM under pressure, so not counted"
        rows.append(Component("optimizer_unpaged", "optimizer state, not paged", opt - paged,
                              f"tensors under {cal.paged_min_numel:,} elements stay on the card"))
    return rows


# ------------------------------------------------------------------------------ activations


def attention_kind(recipe: Recipe, cal: Calibration) -> str:
    """The attention the run will use: flash_* without flash-attn installed falls back to SDPA."""
    a = recipe.model.attn_implementation
    return "sdpa" if a.startswith("flash") and not cal.flash_available else a


def layer_saved_per_token(shape: ModelShape, recipe: Recipe, cal: Calibration) -> float:
    """Bytes per token one decoder layer keeps for backward (its recompute, when checkpointed)."""
    h, q, i = shape.hidden, shape.q_dim, shape.intermediate
    repeat = (cal.sdpa_repeat_kv and cal.assume_padding and shape.kv_heads < shape.heads
              and not recipe.train.padding_free)
    liger = recipe.train.use_liger_kernel
    norm = cal.liger_norm_saved_bytes_per_hidden if liger else cal.norm_saved_bytes_per_hidden
    mlp = cal.liger_mlp_saved_bytes_per_inter if liger else cal.mlp_saved_bytes_per_inter
    s = 2 * norm * h + cal.attn_saved_bytes_per_q * q
    s += cal.kv_saved_bytes * (q if repeat else shape.kv_dim) + mlp * i
    # LoRA: with dropout each module saves its own dropped-out input; without, lora_A saves the
    # shared input itself (the 4-bit base matmul keeps none).
    tgt, dims = targeted(recipe), shape.module_dims()
    if recipe.lora.dropout > 0:
        s += sum(cal.dropout_bytes_per_in * dims[m][0] for m in tgt if m in dims)
    else:
        groups = {("q_proj", "k_proj", "v_proj"): h, ("o_proj",): q, ("gate_proj", "up_proj"): h}
        groups[("down_proj",)] = i
        s += sum(2 * width for mods, width in groups.items() if tgt & set(mods))
    return s + 2 * recipe.lora.r * len(tgt & set(dims))  # lora_A outputs, saved by lora_B


def activation_components(shape: ModelShape, recipe: Recipe, cal: Calibration) -> list[Component]:
    """Checkpoints, one layer's recompute working set, attention mask, loss head, calibration."""
    t = recipe.train
    b, seq, h, v = t.per_device_batch, t.max_seq_len, shape.hidden, shape.vocab
    tok = b * seq
    saved = layer_saved_per_token(shape, recipe, cal)
    inter = (cal.liger_bwd_transient_bytes_per_inter if t.use_liger_kernel
             else cal.bwd_transient_bytes_per_inter)
    transient = inter * shape.intermediate + cal.bwd_transient_bytes_per_hidden * h
    if t.gradient_checkpointing:
        ck = cal.checkpoint_bytes_per_hidden * h * tok * shape.layers
        out = [Component("checkpoints", "checkpointed hidden states", ck,
                         f"{shape.layers} layers x batch {b} x seq {seq} x hidden {h} x 2 B")]
        layer = Component("layer", "recompute working set", (saved + transient) * tok,
                          f"one layer redone in backward: {saved + transient:,.0f} B/token "
                          "(norm inputs, LoRA dropout copies, attention, MLP, grads)")
    else:
        out = [Component("checkpoints", "saved activations, all layers",
                         saved * tok * shape.layers,
                         f"no checkpointing: {saved:,.0f} B/token x {shape.layers} layers")]
        layer = Component("layer", "backward working set", transient * tok, "gradients of a layer")
    attn = attention_kind(recipe, cal)
    if attn == "sdpa" and not t.padding_free and cal.assume_padding:
        out.append(Component("mask", "attention mask", cal.sdpa_mask_bytes * b * seq * seq,
                             f"{b} x {seq}^2 padding mask: bool + the bf16 bias SDPA makes"))
    elif attn == "eager":
        out.append(Component("mask", "attention scores (eager)", 6.0 * b * shape.heads * seq * seq,
                             "batch x heads x seq^2: bf16 probabilities + fp32 softmax"))
    hidden_part, vocab_part = cal.head_bytes_per_hidden * h * tok, 0.0
    if cal.logits_mode == "full" and not t.use_liger_kernel:
        vocab_part = cal.full_logits_bytes_per_elem * tok * v  # well understood: not scaled
        hwhy = f"full logits {b} x {seq} x vocab {v}: bf16 + fp32 upcast + log_softmax"
    else:
        hidden_part += min(tok, cal.head_tile_tokens) * min(v, cal.head_tile_vocab) * 2
        hwhy = (f"trl chunked log-probs, never full logits (fp32 ones: {tok * v * 4 / GB:.1f} GB); "
                "tile + hidden grads")
    head = Component("head", "LM head + loss", hidden_part + vocab_part, hwhy)
    # The loss head runs before the first layer's backward and its buffers are gone by then.
    smaller = head if head.bytes <= layer.bytes else layer
    smaller.counted = False
    other = "loss head" if smaller is layer else "layer recompute"
    smaller.why += f"; not live with the {other}: not added"
    out += [layer, head]
    if cal.activation_scale != 1.0:
        scalable = sum(c.bytes for c in out if c.counted) - (vocab_part if head.counted else 0.0)
        out.append(Component("act_calibration", f"activation calibration x{cal.activation_scale:g}",
                             (cal.activation_scale - 1) * scalable,
                             "the measured H200 8B peak exceeds the per-tensor count: refit"))
    if planned_backend(recipe) == "unsloth":
        hf_rows = sum(c.bytes for c in out if c.counted) - (vocab_part if head.counted else 0.0)
        out.append(Component("backend", "Unsloth backend", (cal.unsloth_activation_scale - 1) * hf_rows,
                             f"activations x{cal.unsloth_activation_scale:g} of the HF path's "
                             "(offloaded checkpoints, padding-free, fused loss; H200 fit)"))
    return out


# ------------------------------------------------------------------------------ VRAM


def vram_components(
    shape: ModelShape, recipe: Recipe, cal: Calibration = CALIBRATION
) -> list[Component]:
    """Every device-memory component of the peak, in bytes (overheads last)."""
    q = recipe.quant
    if q.load_in_4bit:
        bits = cal.nf4_bits + (cal.dq_overhead_bits if q.double_quant else cal.sq_overhead_bits)
        kind = f"{q.quant_type.upper()}{' + double quant' if q.double_quant else ''}"
        label = f"{q.quant_type.upper()} linear weights"
    else:
        bits, kind, label = 16.0, "bf16, not quantised", "bf16 linear weights"
    d = 4 if recipe.model.dtype == "float32" else 2  # what stays unquantised keeps model.dtype
    dt = recipe.model.dtype.replace("float", "fp").replace("bfp16", "bf16")
    emb = f"{shape.vocab} x {shape.hidden} x {d} B, not quantised"
    rows = [
        Component("nf4_weights", label, shape.linear_params * bits / 8,
                  f"{_count(shape.linear_params)} params x {bits:.3f} bits ({kind})"),
        Component("embeddings", f"embeddings ({dt})", shape.embedding_params * d, emb),
    ]
    if shape.lm_head_params:
        rows.append(Component("lm_head", f"lm_head ({dt})", shape.lm_head_params * d, emb))
    rows.append(Component("small", f"norms + biases ({dt})", shape.small_params * d,
                          "RMSNorm weights, q/k/v biases"))
    rows += adapter_components(shape, recipe, cal)
    rows.append(Component("dequant", "dequantised weight (temp)", shape.largest_linear_params * 2,
                          "bf16 copy of the largest linear in its matmul / backward"))
    rows += activation_components(shape, recipe, cal)
    dynamic = sum(c.bytes for c in rows if c.counted and c.key not in STATIC_KEYS)
    expandable = expandable_segments(recipe)
    slack = cal.allocator_slack_expandable if expandable else cal.allocator_slack
    how = ("expandable segments on" if expandable else
           "no expandable segments: PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True in [env] "
           f"makes it {cal.allocator_slack_expandable:.0%}")
    rows.append(Component("slack", f"allocator slack ({slack:.0%})", dynamic * slack,
                          f"reserved, unallocated blocks: share of all but the weights; {how}"))
    rows.append(Component("context", "CUDA context", cal.cuda_context_gib * GIB,
                          "driver context + cuBLAS workspace, outside the allocator"))
    return rows


def expandable_segments(recipe: Recipe, env: Any = None) -> bool:
    """Whether the trainer's allocator uses expandable segments (recipe [env], else this env)."""
    conf = recipe.env.get("PYTORCH_CUDA_ALLOC_CONF")
    if conf is None:
        conf = (os.environ if env is None else env).get("PYTORCH_CUDA_ALLOC_CONF", "")
    return "expandable_segments:true" in conf.replace(" ", "").lower()


def card_need(rows: list[Component]) -> float:
    """Bytes the card must hold: the process's peak, its CUDA context included (the emulated
    card's total holds the context too, in both emulation modes)."""
    return sum(c.bytes for c in rows if c.section == "vram" and c.counted)


def fsdp_two_card_need(rows: list[Component], shape: ModelShape, offload: bool,
                       cal: Calibration = CALIBRATION) -> float:
    """Per-card need with FSDP-QLoRA on two cards (optionally with the shards offloaded to CPU)."""
    get = {c.key: c.bytes for c in rows}
    root = get.get("embeddings", 0) + get.get("lm_head", 0)  # unwrapped root unit: gathered whole
    layer_nf4 = get.get("nf4_weights", 0) / shape.layers
    if offload:  # shards in host RAM: a card holds the root, two layers in flight, activations
        held = root + 2 * layer_nf4
    else:  # half of everything + the other half of the root + the next layer prefetched
        keys = (*STATIC_KEYS, "lora_weights", "lora_grads", "optimizer")
        held = sum(get.get(k, 0) for k in keys) / 2 + root / 2 + layer_nf4
    act = sum(c.bytes for c in rows if c.counted and c.key in (*ACTIVATION_KEYS, "dequant"))
    return held + act * (1 + cal.allocator_slack) + get.get("context", 0)


# ------------------------------------------------------------------------------ host and disk


def host_components(shape: ModelShape, recipe: Recipe, vram: list[Component], cal: Calibration,
                    on_cpu: bool) -> list[Component]:
    """Host RAM the trainer needs: framework, loading, dataset, optimizer spill, guard margin."""
    rows = [
        Component("framework", "python + torch + CUDA libs", cal.host_framework_gib * GIB,
                  "resident size of the trainer before the model", "host"),
        Component("loading", "model loading", min(shape.total_params * 2, cal.host_shard_gb * GB),
                  f"one bf16 shard (<= {cal.host_shard_gb:g} GB) mapped while it is quantised; "
                  "NF4 lands on the GPU shard by shard", "host"),
    ]
    data = Path(recipe.data.path)
    if data.is_file():
        size = data.stat().st_size
        rows.append(Component("dataset", "tokenised dataset", size * cal.host_dataset_factor,
                              f"{size / 1e6:.1f} MB JSONL x {cal.host_dataset_factor:g} tokenised",
                              "host"))
    else:
        rows.append(Component("dataset", "tokenised dataset", cal.host_dataset_default_gib * GIB,
                              "data file not found: a guess", "host"))
    get = {c.key: c.bytes for c in vram}
    if recipe.train.optim.startswith("paged") and get.get("optimizer"):
        rows.append(Component("optimizer_spill", "paged optimizer state", get["optimizer"],
                              "evicted to host RAM under GPU memory pressure (worst case: all)",
                              "host"))
    if on_cpu:
        peak = sum(c.bytes for c in vram if c.counted and c.key not in OVERHEAD_KEYS)
        rows.append(Component("cpu_training", "training on the CPU", peak,
                              "train.use_cpu: weights, adapter, activations in RAM", "host"))
    if recipe.guards.host_ram.enabled:
        rows.append(Component("ram_margin", "host_ram guard margin",
                              recipe.guards.host_ram.min_available_gib * GIB,
                              "guards.host_ram.min_available_gib: the guard acts below it", "host"))
    return rows


def disk_components(recipe: Recipe, vram: list[Component], cal: Calibration) -> list[Component]:
    """Checkpoints kept (limit + 1 while rotating) + the final adapter + the guard's margin."""
    get = {c.key: c.bytes for c in vram}
    adapter, opt = get.get("lora_weights", 0), get.get("optimizer", 0)  # saved as in memory
    small = cal.checkpoint_small_mb * 1e6
    n = recipe.train.save_total_limit + 1
    rows = [
        Component("checkpoints_disk", f"{n} checkpoints", (adapter + opt + small) * n,
                  f"(adapter {adapter / 1e6:.0f} MB + optimizer {opt / 1e6:.0f} MB + "
                  f"{small / 1e6:.0f} MB) x (save_total_limit + 1 while rotating)", "disk"),
        Component("final_adapter", "final adapter", adapter + small, "adapter + tokenizer", "disk"),
    ]
    model = recipe.model
    if (model is not None and model.weight_cache != "off" and recipe.quant.load_in_4bit
            and recipe.hardware.gpus == 1):
        weights = sum(get.get(k, 0) for k in ("nf4_weights", "embeddings", "lm_head", "small"))
        where = "the run's records folder" if model.weight_cache == "run" else "the shared cache"
        rows.append(Component("weight_cache", "quantised-weight cache", weights,
                              f"the NF4 base model saved for fast relaunches ({where}; "
                              "model.weight_cache = \"off\" saves it)", "disk"))
    data = recipe.data
    if data is not None and data.cache and (not recipe.trainer.command
                                            or "supervisor.runner.train" in recipe.trainer.command):
        try:
            text = Path(data.path).expanduser().stat().st_size
        except OSError:
            text = 0
        if text:
            rows.append(Component("dataset_cache", "tokenised-dataset cache", 4 * text,
                                  "the records tokenised once per run, in the run's records folder: "
                                  "input_ids and labels as int64, ~4x the text at ~4 bytes of text a "
                                  "token (data.cache = false saves it)", "disk"))
    if recipe.guards.checkpoints.enabled:
        rows.append(Component("disk_margin", "checkpoint guard margin",
                              recipe.guards.checkpoints.min_free_gib * GIB,
                              "guards.checkpoints.min_free_gib", "disk"))
    return rows


# ------------------------------------------------------------------------------ the whole estimate


def gib(b: float) -> str:
    return f"{b / GIB:.1f} GiB"


def setup_line(shape: ModelShape, recipe: Recipe, cal: Calibration) -> str:
    t, lo, q = recipe.train, recipe.lora, recipe.quant
    tm = lo.target_modules if isinstance(lo.target_modules, str) else ",".join(lo.target_modules)
    if targeted(recipe) == set(ALL_LINEAR):
        tm = "all-linear"
    quant = f"{q.quant_type.upper()}{'+DQ' if q.double_quant else ''}" if q.load_in_4bit else "bf16"
    gc = "grad checkpointing" if t.gradient_checkpointing else "NO grad checkpointing"
    return (f"{shape.name} [{shape.source}], {_count(shape.total_params)} params; {quant}, "
            f"LoRA r={lo.r} {tm}; seq {t.max_seq_len} x batch {t.per_device_batch} "
            f"(x accum {t.grad_accum}); {t.optim}; {gc}; {attention_kind(recipe, cal)}; "
            f"backend {planned_backend(recipe)}")


def vram_need(shape: ModelShape, recipe: Recipe, cal: Calibration) -> float:
    return card_need(vram_components(shape, recipe, cal))


def estimate_notes(shape: ModelShape, recipe: Recipe, cal: Calibration, vb: Budget) -> list[str]:
    notes = []
    if vb.have is None and recipe.train.use_cpu is not True:
        notes.append("no GPU detected; pass --gpu-mem to check a card")
    _, unknown = lora_tensors(shape, recipe)
    if unknown:
        notes.append(f"target modules preflight does not know (not counted): {', '.join(unknown)}")
    if recipe.train.use_liger_kernel and importlib.util.find_spec("liger_kernel") is None:
        more = vram_need(shape, apply_rung(recipe, {"train.use_liger_kernel": False}), cal) - vb.need
        notes.append(f"estimated with liger-kernel, which is not installed here: without it the "
                     f"trainer needs {gib(more)} more (pip install 'qlora-watch[gpu]')")
    if shape.experts > 1:
        notes.append(f"MoE, {shape.experts} experts: every expert's weights counted, "
                     "activations as for a dense model")
    attn = recipe.model.attn_implementation
    if attn != attention_kind(recipe, cal):
        notes.append(f"{attn} estimated as SDPA; without flash-attn the run uses varlen on one GPU "
                     "(padding-free; measured 387 MiB less allocated than SDPA on the 8B shape)")
    if vb.have is None and recipe.train.use_cpu == "auto":
        notes.append("train.use_cpu = auto: without a GPU the run trains on the CPU, holding the "
                     "GPU estimate above in host RAM too")
    if recipe.model.tiny is None and not shape.source.endswith("config.json"):
        notes.append(f"not checked: the hub download of the base weights (about "
                     f"{shape.total_params * 2 / GB:.0f} GB of bf16 safetensors) in the HF cache")
    if not recipe.train.packing:
        notes.append("assumes every sample fills max_seq_len; shorter batches pad less, use less")
    if recipe.hardware.gpus > 1:
        notes.append(f"hardware.gpus = {recipe.hardware.gpus}: estimated for one GPU; "
                     "multi-GPU sharding is not modelled")
    return notes

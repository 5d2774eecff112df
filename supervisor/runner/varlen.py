"""Padding-free training on the HF path without flash-attn: `attn_implementation = "varlen"`.

The GPU box has no flash-attn wheel, and SDPA over a padding-free (flattened) batch needs a
block-diagonal mask, which drops it off its flash kernel (-44 % measured, docs/benchmarks.md).
PyTorch itself ships the flash kernel with variable-length inputs (`aten::_flash_attention_forward`
with cumulative sequence lengths, the op under `torch.nn.attention.varlen`; differentiable):
this module registers it as a transformers attention implementation named "varlen", with the
mask function of flash-attn (no mask unless there is padding), and gives the trainer trl's own
padding-free collator (each batch one row, position ids restarting per sample, the first token
of each sample masked from the loss: the same samples and losses as padded batches).

The kernel is checked once per process against per-sample SDPA (forward and gradients, random
data, GQA). Where it fails or there is no CUDA (CPU tests) the same function computes each
sample with SDPA in a loop (exact, slower). Sliding-window attention is not handled: a model with
it falls back to "sdpa".
"""

from __future__ import annotations

from typing import Any

NAME = "varlen"
_MODE: dict[str, str] = {}  # device type -> "flash" | "sdpa-loop", decided by self_check


def _lengths_from_positions(position_ids: Any) -> tuple[Any, int]:
    """(cu_seqlens int32 on the device, max length) of the flattened batch; a sample starts
    wherever the position id is 0. Cached on the tensor (one host sync per forward, not per layer)."""
    cached = getattr(position_ids, "_qlw_varlen", None)
    if cached is not None:
        return cached
    import torch

    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).flatten()
    if starts.numel() == 0 or int(starts[0]) != 0:  # a row not starting at 0 (no packing info)
        starts = torch.cat([torch.zeros(1, dtype=starts.dtype, device=starts.device), starts])
    cu = torch.cat([starts, torch.tensor([flat.numel()], device=starts.device)]).to(torch.int32)
    out = (cu, int((cu[1:] - cu[:-1]).max()))
    try:
        position_ids._qlw_varlen = out
    except (AttributeError, RuntimeError):
        pass
    return out


def _flash(q: Any, k: Any, v: Any, cu: Any, max_len: int, scale: float | None) -> Any:
    """[T, H, D] causal attention within each [cu[i], cu[i+1]) span, PyTorch's flash kernel."""
    import torch

    return torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, max_len, max_len, 0.0, True, False,
                                                   scale=scale)[0]


def _sdpa_loop(q: Any, k: Any, v: Any, cu: Any, max_len: int, scale: float | None) -> Any:
    """The same with SDPA, one sample at a time (exact; the reference and the CPU path)."""
    import torch
    import torch.nn.functional as F

    bounds = cu.tolist()
    outs = []
    gqa = k.shape[1] != q.shape[1]
    for a, b in zip(bounds[:-1], bounds[1:], strict=False):
        if b <= a:
            continue
        qi, ki, vi = (x[a:b].transpose(0, 1).unsqueeze(0) for x in (q, k, v))
        o = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale, enable_gqa=gqa)
        outs.append(o.squeeze(0).transpose(0, 1))
    return torch.cat(outs, dim=0)


def varlen_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
                     dropout: float = 0.0, scaling: float | None = None, **kwargs: Any) -> tuple[Any, None]:
    """transformers' attention-function contract: query/key/value [B, H, S, D] in, [B, S, H, D] out."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if dropout or kwargs.get("sliding_window") or query.shape[2] != key.shape[2]:
        # attention dropout, sliding windows, a KV cache (generation): plain SDPA does these
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    bsz, heads, seq, dim = query.shape
    q, k, v = (x.transpose(1, 2).reshape(bsz * seq, x.shape[1], dim) for x in (query, key, value))
    index = None
    if attention_mask is not None and attention_mask.dim() == 2:  # padded rows: unpad them
        keep = attention_mask.reshape(-1).bool()
        index = torch.nonzero(keep).flatten()
        q, k, v = q[index], k[index], v[index]
        lens = attention_mask.sum(-1, dtype=torch.int32)
        cu = torch.nn.functional.pad(torch.cumsum(lens, 0, dtype=torch.int32), (1, 0))
        max_len = int(lens.max())
    elif attention_mask is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    elif kwargs.get("cu_seq_lens_q") is not None and kwargs.get("max_length_q") is not None:
        cu, max_len = kwargs["cu_seq_lens_q"].to(torch.int32), int(kwargs["max_length_q"])
    elif kwargs.get("position_ids") is not None:
        cu, max_len = _lengths_from_positions(kwargs["position_ids"])
    else:  # every row one whole sample
        cu = torch.arange(0, (bsz + 1) * seq, seq, dtype=torch.int32, device=q.device)
        max_len = seq
    fn = _flash if _MODE.get(q.device.type) == "flash" else _sdpa_loop
    out = fn(q.contiguous(), k.contiguous(), v.contiguous(), cu, max_len, scaling)
    if index is not None:
        full = out.new_zeros(bsz * seq, heads, dim)
        out = full.index_copy(0, index, out)
    return out.reshape(bsz, seq, heads, dim), None


def self_check(device: str) -> str:
    """Decide the kernel for `device` once: "flash" where PyTorch's varlen flash kernel matches
    per-sample SDPA on random data (output and q/k/v gradients within 2e-2 relative), else
    "sdpa-loop". Returns the decision with why."""
    import torch

    if device in _MODE:
        return _MODE[device]
    if device != "cuda" or not torch.cuda.is_available():
        _MODE[device] = "sdpa-loop"
        return "sdpa-loop (no CUDA)"
    try:
        gen = torch.Generator(device="cuda").manual_seed(1234)
        lens = [37, 300, 1, 129]
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
        t = sum(lens)

        def leaf(h: int) -> Any:
            return torch.randn(t, h, 128, device="cuda", dtype=torch.bfloat16,
                               generator=gen).requires_grad_()

        q, k, v = leaf(8), leaf(2), leaf(2)
        g = torch.randn(t, 8, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
        res = []
        for fn in (_flash, _sdpa_loop):
            out = fn(q, k, v, cu, max(lens), 128 ** -0.5)
            grads = torch.autograd.grad(out, (q, k, v), g)
            res.append([out.float(), *(x.float() for x in grads)])
        err = max(float((a - b).norm() / b.norm().clamp_min(1e-6)) for a, b in zip(*res, strict=True))
        if not err < 2e-2:
            _MODE[device] = "sdpa-loop"
            return f"sdpa-loop (the varlen flash kernel differs from SDPA: relative error {err:.3g})"
    except Exception as e:  # no flash kernel in this build, an old GPU, a changed op signature
        _MODE[device] = "sdpa-loop"
        return f"sdpa-loop (the varlen flash kernel failed its check: {type(e).__name__}: {str(e)[:120]})"
    _MODE[device] = "flash"
    return f"flash (PyTorch's varlen flash kernel, checked against SDPA: relative error {err:.1e})"


def register(device: str) -> str:
    """Register "varlen" with transformers (attention + mask functions); the kernel decision."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(NAME, varlen_attention)
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["flash_attention_2"])
    return self_check(device)


def collator(tokenizer: Any) -> Any:
    """trl's collator in its padding-free mode (one flattened row per batch, position ids)."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return DataCollatorForLanguageModeling(pad_token_id=pad, padding_free=True)

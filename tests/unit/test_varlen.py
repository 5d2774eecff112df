"""attn_implementation = "varlen": padding-free batches give the same per-sample attention, logits
and loss as padded SDPA batches (the CPU path is the per-sample SDPA loop; the GPU path's flash
kernel is checked against it by varlen.self_check on the device). The real tiny trainer on it:
tests/e2e/test_varlen.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from supervisor.runner import varlen


def block_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: list[int]) -> torch.Tensor:
    """Dense SDPA over the flattened row with a block-diagonal causal mask: [1, T, H, D]."""
    t = sum(lens)
    doc = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    mask = (doc[:, None] == doc[None, :]) & torch.ones(t, t, dtype=torch.bool).tril()
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    return out.transpose(1, 2)


def test_flattened_and_padded_rows_match_the_block_diagonal_reference() -> None:
    varlen.self_check("cpu")
    gen = torch.Generator().manual_seed(7)
    lens = [5, 1, 17, 9]
    t = sum(lens)
    q = torch.randn(1, 4, t, 16, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(1, 2, t, 16, generator=gen, dtype=torch.float64) for _ in range(2))
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    out, _ = varlen.varlen_attention(None, q, k, v, None, scaling=16 ** -0.5, position_ids=pos)
    ref = block_reference(q, k, v, lens)
    assert out.shape == (1, t, 4, 16)
    assert float((out - ref).norm() / ref.norm()) < 1e-12
    assert hasattr(pos, "_qlw_varlen")  # lengths computed once per forward, not once per layer

    # the same samples as a right-padded batch with a 2D mask: equal rows, zeros at padding
    width = max(lens)
    qp = torch.zeros(len(lens), 4, width, 16, dtype=torch.float64)
    kp, vp = (torch.zeros(len(lens), 2, width, 16, dtype=torch.float64) for _ in range(2))
    mask = torch.zeros(len(lens), width, dtype=torch.long)
    start = 0
    for i, n in enumerate(lens):
        qp[i, :, :n], kp[i, :, :n], vp[i, :, :n] = (x[0, :, start:start + n] for x in (q, k, v))
        mask[i, :n] = 1
        start += n
    outp, _ = varlen.varlen_attention(None, qp, kp, vp, mask, scaling=16 ** -0.5)
    start = 0
    for i, n in enumerate(lens):
        assert torch.allclose(outp[i, :n], ref[0, start:start + n], atol=1e-12)
        assert not outp[i, n:].any()
        start += n


def test_model_logits_padding_free_equal_padded_sdpa(tmp_path: Path) -> None:
    """The tiny Llama (fp32) on [sample A, sample B] flattened with "varlen" against the padded
    batch on "sdpa": the same logits for every real token, so the same loss."""
    from transformers import LlamaConfig, LlamaForCausalLM

    varlen.register("cpu")
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randint(0, 97, (11,), generator=gen), torch.randint(0, 97, (6,), generator=gen)
    with torch.no_grad():
        model.config._attn_implementation = "sdpa"
        padded = torch.stack([a, torch.cat([b, torch.zeros(5, dtype=torch.long)])])
        mask = torch.tensor([[1] * 11, [1] * 6 + [0] * 5])
        ref = model(input_ids=padded, attention_mask=mask).logits
        model.config._attn_implementation = "varlen"
        flat = torch.cat([a, b])[None]
        pos = torch.cat([torch.arange(11), torch.arange(6)])[None]
        out = model(input_ids=flat, position_ids=pos).logits
    assert torch.allclose(out[0, :11], ref[0], atol=1e-5)
    assert torch.allclose(out[0, 11:], ref[1, :6], atol=1e-5)


def test_collator_flattens_and_masks_each_first_token() -> None:
    class Tok:
        pad_token_id, eos_token_id = 0, 2

    batch = varlen.collator(Tok())([{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9]]
    assert "attention_mask" not in batch


def test_flash_without_flash_attn_falls_back_to_varlen_on_one_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CUDA machine (faked: this one has no GPU) flash_attention_2 without flash-attn trains on
    "varlen"; FSDP (several GPUs) and CPU keep the SDPA fallback."""
    import importlib.util

    from supervisor.runner.train import pick_attention

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")

    class W:
        def __init__(self) -> None:
            self.notes: list[str] = []

        def notice(self, m: str) -> None:
            self.notes.append(m)

    w = W()
    assert pick_attention("flash_attention_2", w) == "sdpa"  # no CUDA here
    assert w.notes == ["flash-attn not installed; using sdpa"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(varlen, "_MODE", {})
    w = W()
    assert pick_attention("flash_attention_2", w, multi_gpu=True) == "sdpa"
    assert pick_attention("flash_attention_2", w) == "varlen"
    assert w.notes[1] == "flash-attn not installed; using varlen (PyTorch's flash kernel, padding-free)"
    # the kernel check could not run on the faked GPU: the exact per-sample SDPA path is chosen
    assert w.notes[2].startswith("attention varlen: padding-free batches, kernel sdpa-loop (")

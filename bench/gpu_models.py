"""Random-weight models of the real architectures, built locally (no downloads).

Throughput and memory depend on shapes, not weight values, so a model built from the
published config with random weights measures what the real one would. `layers` may be
reduced (a per-layer fit extrapolates to full depth). The tokenizer is trained locally on
random words; the model keeps the architecture's full vocabulary (embeddings, lm_head and
the loss are sized by it).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from supervisor.preflight.shapes import BUILTIN_SHAPES, ModelShape


def words(n: int = 3000) -> list[str]:
    return [f"w{i}" for i in range(n)]


def write_text_data(path: Path, n_samples: int, tokens: int | list[int], seed: int = 0) -> Path:
    """JSONL of {"text": ...} with about `tokens` words each (one word ~ one token)."""
    rng = random.Random(seed)
    vocab = words()
    lengths = tokens if isinstance(tokens, list) else [tokens] * n_samples
    with open(path, "w") as f:
        for n in lengths:
            f.write(json.dumps({"text": " ".join(rng.choice(vocab) for _ in range(n))}) + "\n")
    return path


def build(shape_key: str, layers: int | None, out: Path, seed: int = 0,
          shape: ModelShape | None = None) -> Path:
    """Save config.json, random bf16 safetensors and a tokenizer into `out` (idempotent);
    `shape` instead of a built-in key (a small one for CPU tests)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from supervisor.runner.tiny import train_tokenizer

    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    out.mkdir(parents=True, exist_ok=True)
    s = shape or BUILTIN_SHAPES[shape_key]
    model_type = "qwen2" if shape_key.startswith("qwen") else ("mistral" if "mistral" in shape_key else "llama")
    cfg = AutoConfig.for_model(
        model_type, hidden_size=s.hidden, num_hidden_layers=layers or s.layers,
        num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
        intermediate_size=s.intermediate, vocab_size=s.vocab, head_dim=s.hd,
        max_position_embeddings=8192, tie_word_embeddings=s.tied_embeddings, dtype="bfloat16",
    )
    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(out, max_shard_size="5GB")
    del model
    tok = train_tokenizer([" ".join(words()[i:i + 50]) for i in range(0, 3000, 10)] * 3, 4096)
    tok.save_pretrained(out)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out

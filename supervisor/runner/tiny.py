"""Build a tiny random-weight Llama and a tokenizer trained on the data file, cached on disk."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from supervisor.runner.data import load_records, texts_of

BUILD_VERSION = "1"  # bump when the build changes, so old caches are not reused
MARKER = "tiny-build.json"  # written last: a folder without it is an interrupted build

BOS, EOS, PAD, UNK = "<s>", "<|end|>", "<pad>", "<unk>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|tool|>"]
SPECIAL_TOKENS = [PAD, UNK, BOS, EOS, *ROLE_TOKENS]

# One turn is <|role|>content<|end|>; EOS doubles as end-of-turn, so the model learns to stop.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def cache_key(tiny: Any, data_path: str | Path) -> str:
    """sha256 of the tiny config, the data file's bytes and the build version (16 hex digits)."""
    h = hashlib.sha256()
    h.update(BUILD_VERSION.encode())
    h.update(json.dumps(tiny.model_dump(mode="json"), sort_keys=True).encode())
    with open(data_path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def default_cache_root(output_dir: str | Path) -> Path:
    """$QLW_TINY_CACHE, else `.tiny-cache` beside the output folder (shared by relaunches)."""
    env = os.environ.get("QLW_TINY_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(output_dir).expanduser().resolve().parent / ".tiny-cache"


def train_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """A BPE tokenizer (Metaspace, single digits) trained on `texts`, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK))
    # Single digits keep arithmetic learnable; Metaspace keeps spaces, so decode is lossless.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(prepend_scheme="first"), pre_tokenizers.Digits(individual_digits=True)]
    )
    tok.decoder = decoders.Metaspace(prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=ROLE_TOKENS,
        model_max_length=1 << 20,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(tiny: Any, tokenizer: Any) -> Any:
    """A LlamaForCausalLM with random weights (fixed seed) sized by the recipe's [model.tiny]."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=tiny.hidden_size,
        intermediate_size=tiny.intermediate_size,
        num_hidden_layers=tiny.num_layers,
        num_attention_heads=tiny.num_heads,
        num_key_value_heads=tiny.num_kv_heads,
        max_position_embeddings=32768,  # RoPE: no per-position weights, so a large limit is free
        # The base stays frozen under LoRA: at the usual 0.02 a random lm_head cannot express a
        # confident prediction (logits stay within about +-1), so the loss could barely fall.
        initializer_range=tiny.hidden_size**-0.5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(tiny.seed)
    model = LlamaForCausalLM(config)
    return model.to(torch.bfloat16)


def build_tiny(
    tiny: Any, data_path: str | Path, cache_root: str | Path, data_format: str = "auto"
) -> tuple[Path, bool]:
    """The folder holding the tiny model + tokenizer, built unless cached: (folder, was_cached)."""
    key = cache_key(tiny, data_path)
    root = Path(cache_root)
    final = root / key
    if (final / MARKER).is_file():
        return final, True
    root.mkdir(parents=True, exist_ok=True)
    records, _fmt = load_records(data_path, data_format)
    texts = [t for r in records for t in texts_of(r)]
    tokenizer = train_tokenizer(texts, tiny.vocab_size)
    model = build_model(tiny, tokenizer)
    # Build in a temp folder and rename it in, so a killed build never looks complete.
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        meta = {"key": key, "data": str(data_path), "tiny": tiny.model_dump(mode="json")}
        (tmp / MARKER).write_text(json.dumps(meta, indent=2) + "\n")
        if final.exists() and not (final / MARKER).is_file():  # an interrupted build
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError:  # a concurrent build won the race: use its folder
            if not (final / MARKER).is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            return final, True
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final, False

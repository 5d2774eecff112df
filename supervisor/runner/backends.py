"""Model backends of the built-in trainer: plain transformers + peft ("hf") or Unsloth.

`choose_backend` resolves `model.backend` ("hf" | "unsloth" | "auto") before anything imports
transformers, because Unsloth patches transformers, peft and trl at its own import and must come
first. Unsloth is imported only when it is chosen; the HF path never imports it.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from supervisor.recipe import Recipe


def lora_kwargs(recipe: Recipe) -> dict[str, Any]:
    """The adapter's shape, one definition for peft's LoraConfig and Unsloth's get_peft_model."""
    lo = recipe.lora
    return dict(r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout,
                target_modules=lo.target_modules, bias="none")

# Model types Unsloth 2026.10 has fast paths for (unsloth/models/*.py); others go to HF under auto.
UNSLOTH_MODEL_TYPES = frozenset({
    "llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3", "cohere",
    "granite", "falcon_h1",
})


# The training stack's modules, imported by the trainer up front (timed) and by a warm standby
# (supervisor/standby.py) before it gets an attempt. Unsloth patches transformers, peft and trl
# when it is imported and must come first, and its import needs the GPU: before it only modules
# that do not import transformers.
HF_STACK = ("torch", "datasets", "transformers", "transformers.trainer", "peft", "bitsandbytes",
            "trl", "accelerate")
UNSLOTH_PRE = ("torch", "datasets", "bitsandbytes")


def stack_modules(backend: str, after_unsloth: bool = False) -> tuple[str, ...]:
    """The heavy modules of a backend; for Unsloth before its import unless after_unsloth."""
    if backend == "unsloth" and not after_unsloth:
        return UNSLOTH_PRE
    return HF_STACK


class BackendUnavailable(SystemExit):
    """model.backend = "unsloth" where Unsloth cannot run: one line on stderr, no traceback."""


@dataclass(frozen=True)
class Backend:
    """The backend a run trains with, and why (the notice event's text)."""

    name: str
    reason: str


def model_type(recipe: Recipe) -> str | None:
    """config.json's model_type from a local folder or the HF cache, else from the built-in shape."""
    name = recipe.model.name
    config = Path(name).expanduser() / "config.json"
    if not config.is_file():
        config = None
        try:
            from huggingface_hub import try_to_load_from_cache

            hit = try_to_load_from_cache(name, "config.json")
            config = Path(hit) if isinstance(hit, str) else None
        except Exception:  # not a repo id, or no hub client: the shape decides
            config = None
    if config is not None:
        try:
            return str(json.loads(config.read_text(encoding="utf-8")).get("model_type") or "") or None
        except (OSError, ValueError):
            return None
    shape = recipe.model.shape or ""
    for prefix in ("llama", "mistral", "qwen2", "qwen3", "gemma"):
        if shape.startswith(prefix) or shape.replace("-", "").startswith(prefix):
            return prefix
    return "qwen2" if shape.startswith("qwen") else None


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def unsloth_obstacle(recipe: Recipe, cuda: bool | None = None) -> str | None:
    """Why `auto` should not pick Unsloth for this recipe on this machine, or None."""
    if recipe.model.tiny is not None:
        return "the tiny test model trains on the HF path"
    if recipe.hardware.gpus > 1:
        return "hardware.gpus > 1 (FSDP-QLoRA) runs on the HF path"
    if recipe.train.use_cpu is True or not (_cuda_available() if cuda is None else cuda):
        return "no CUDA GPU (Unsloth's kernels are Triton kernels)"
    if recipe.quant.load_in_4bit and recipe.quant.quant_type != "nf4":
        return f"quant.quant_type = {recipe.quant.quant_type!r} (Unsloth loads NF4 only)"
    kind = model_type(recipe)
    if kind is None:
        return f"the model type of {recipe.model.name} is unknown before download (set model.shape)"
    if kind not in UNSLOTH_MODEL_TYPES:
        return f"Unsloth has no fast path for model type {kind!r}"
    if importlib.util.find_spec("unsloth") is None:
        return "Unsloth is not installed (pip install 'qlora-watch[unsloth]')"
    return None


def planned_backend(recipe: Recipe) -> str:
    """The backend a run of this recipe takes on a CUDA machine like this one (preflight: no
    imports beyond a find_spec, so an "auto" recipe is estimated for Unsloth only where it is installed)."""
    if recipe.model.backend != "auto":
        return recipe.model.backend
    return "hf" if unsloth_obstacle(recipe, cuda=True) else "unsloth"


def unsloth_missing(recipe: Recipe) -> str | None:
    """For `qlora-watch start`: model.backend = "unsloth" where Unsloth is not installed."""
    if recipe.model.backend != "unsloth" or recipe.trainer.command:
        return None
    if importlib.util.find_spec("unsloth") is None:
        return ('model.backend = "unsloth" but Unsloth is not installed here '
                '(pip install \'qlora-watch[unsloth]\', or set model.backend = "auto" or "hf")')
    return None


def import_unsloth() -> str | None:
    """Import Unsloth now (before transformers); None on success, else the error in one line."""
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")  # no phone-home from a supervised run
    try:
        import unsloth  # noqa: F401
    except Exception as e:  # ImportError, NotImplementedError (no accelerator), version caps
        first = (str(e).strip().splitlines() or [""])[0][:200]
        return f"Unsloth failed to import: {type(e).__name__}: {first}"
    return None


def unsloth_version() -> str:
    import unsloth

    return str(getattr(unsloth, "__version__", "?"))


def choose_backend(recipe: Recipe, cuda: bool | None = None) -> Backend:
    """Resolve model.backend; imports Unsloth when (and only when) it is chosen."""
    requested = recipe.model.backend
    if requested == "hf":
        return Backend("hf", 'model.backend = "hf"')
    obstacle = None if requested == "unsloth" else unsloth_obstacle(recipe, cuda)
    if obstacle is None and requested == "unsloth" and importlib.util.find_spec("unsloth") is None:
        obstacle = "Unsloth is not installed (pip install 'qlora-watch[unsloth]')"
    if obstacle is None:
        obstacle = import_unsloth()
    if obstacle is None:
        return Backend("unsloth", f'model.backend = "{requested}": Unsloth {unsloth_version()}')
    if requested == "unsloth":
        raise BackendUnavailable(f'error: model.backend = "unsloth": {obstacle}; '
                                 'set model.backend = "auto" or "hf"')
    return Backend("hf", f'model.backend = "auto": HF path, because {obstacle}')


def prequantised(path: str) -> bool:
    """A local folder whose config.json carries a quantization_config (a weight-cache entry)."""
    try:
        cfg = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and cfg.get("quantization_config") is not None


def load_hf(recipe: Recipe, path: str, attn: str) -> tuple[Any, Any]:
    """(model, tokenizer): NF4 + double quant via BitsAndBytesConfig when quant.load_in_4bit."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    r = recipe
    kwargs: dict[str, Any] = {
        "dtype": getattr(torch, r.model.dtype),
        "attn_implementation": attn,
        "trust_remote_code": r.model.trust_remote_code,
    }
    if r.quant.load_in_4bit and not prequantised(path):  # a cache entry brings its own config
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=r.quant.quant_type,
            bnb_4bit_use_double_quant=r.quant.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, r.quant.compute_dtype),
            # FSDP-QLoRA shards the packed 4-bit weights: they must be stored in a float dtype
            **({"bnb_4bit_quant_storage": getattr(torch, r.quant.compute_dtype)}
               if r.hardware.gpus > 1 else {}),
        )
    # No prepare_model_for_kbit_training: it upcasts embeddings and lm_head to fp32 (GBs at 8B).
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=r.model.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_unsloth_base(recipe: Recipe, path: str) -> tuple[Any, Any]:
    """(model, tokenizer) from FastLanguageModel, before its LoRA: NF4 (or pre-quantised) weights."""
    import torch
    from unsloth import FastLanguageModel

    r = recipe
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=path,
        max_seq_length=r.train.max_seq_len,
        dtype=getattr(torch, r.model.dtype),
        load_in_4bit=r.quant.load_in_4bit,
        load_in_16bit=not r.quant.load_in_4bit,
        trust_remote_code=r.model.trust_remote_code,
        use_exact_model_name=True,  # the folder or repo named, never a swapped "-bnb-4bit" one
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def unsloth_adapter(recipe: Recipe, model: Any) -> Any:
    from unsloth import FastLanguageModel

    r = recipe
    return FastLanguageModel.get_peft_model(
        model,
        **lora_kwargs(r),
        use_gradient_checkpointing="unsloth" if r.train.gradient_checkpointing else False,
        random_state=r.train.seed,
    )


def load_unsloth(recipe: Recipe, path: str) -> tuple[Any, Any]:
    """(PeftModel, tokenizer) from FastLanguageModel: NF4, LoRA, Unsloth's gradient checkpointing."""
    model, tokenizer = load_unsloth_base(recipe, path)
    return unsloth_adapter(recipe, model), tokenizer


def load_base(backend: Backend, recipe: Recipe, path: str, attn: str) -> tuple[Any, Any]:
    """The quantised base model (no adapter) and its tokenizer, from `path` (original or cache)."""
    if backend.name == "unsloth":
        return load_unsloth_base(recipe, path)
    return load_hf(recipe, path, attn)


def _is_oom(e: BaseException) -> bool:
    """A CUDA OOM while loading: the OOM ladder's business, never a reason to change backend."""
    return type(e).__name__ == "OutOfMemoryError" or "out of memory" in str(e).lower()


def load_model_and_tokenizer(backend: Backend, recipe: Recipe, path: str, attn: str,
                             writer: Any = None, device: str = "cuda") -> tuple[Any, Any]:
    """(model, tokenizer) from the chosen backend; Unsloth's model comes with its LoRA already.
    The base model comes from the weight cache when `$QLW_QCACHE_DIR` holds a sound entry for it
    (runner/qcache.py), else from `path`, and is then saved there for the next attempt."""
    import time

    from supervisor.runner.qcache import load_base_cached

    model, tokenizer = load_base_cached(backend, recipe, path, attn, writer, device, load_base=load_base)
    if backend.name == "unsloth":
        t0 = time.perf_counter()
        model = unsloth_adapter(recipe, model)
        if writer is not None:
            writer.emit("timing", phase="adapter", s=round(time.perf_counter() - t0, 3))
    return model, tokenizer


def load_with_fallback(backend: Backend, recipe: Recipe, path: str, attn: str | Callable[[], str],
                       writer: Any = None, device: str = "cuda") -> tuple[Backend, Any, Any]:
    """(backend, model, tokenizer), through the weight cache (load_model_and_tokenizer). Under
    model.backend = "auto", Unsloth failing to load the model (FastLanguageModel.from_pretrained or
    get_peft_model raising: an architecture variant or a transformers it does not handle) falls back
    to the HF path; the returned backend's reason says so. An explicit "unsloth", a CUDA OOM and
    BaseExceptions (SIGTERM's stop) propagate. `attn` may be a function: the HF path's attention,
    resolved only when the HF path loads (Unsloth picks its own)."""
    def load(b: Backend) -> tuple[Backend, Any, Any]:
        a = "sdpa" if b.name == "unsloth" else (attn() if callable(attn) else attn)
        return b, *load_model_and_tokenizer(b, recipe, path, a, writer=writer, device=device)

    if backend.name != "unsloth" or recipe.model.backend != "auto":
        return load(backend)
    try:
        return load(backend)
    except Exception as e:
        if _is_oom(e):
            raise
        first = (str(e).strip().splitlines() or [""])[0][:200]
        why = f"Unsloth failed to load the model: {type(e).__name__}: {first}"
    import gc

    gc.collect()  # whatever Unsloth had put on the GPU before it failed
    if _cuda_available():
        import torch

        torch.cuda.empty_cache()
    return load(Backend("hf", f'model.backend = "auto": HF path, because {why}'))


def sft_overrides(backend: Backend, recipe: Recipe) -> dict[str, Any]:
    """SFTConfig changes for a backend: Unsloth checkpoints its own way, fuses its own kernels and
    decides padding-free itself (None = "auto", as its own scripts leave it)."""
    if backend.name != "unsloth":
        return {}
    out: dict[str, Any] = {"use_liger_kernel": False, "checkpointing": False}
    if not recipe.train.padding_free:
        out["padding_free"] = None
    return out

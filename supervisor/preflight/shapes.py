"""Model shapes for preflight: a built-in table, a local config.json, or the recipe's tiny model."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

# Module names of a Llama-family decoder layer; peft's "all-linear" is all of them (not lm_head).
ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
ALL_LINEAR = ATTN_MODULES + MLP_MODULES

# Model types whose config.json omits tie_word_embeddings because their class default is False.
# (PretrainedConfig's own default is True, so an unknown type with no key is taken as tied.)
UNTIED_BY_DEFAULT = {"llama", "mistral", "qwen2", "qwen3", "mixtral", "phi3"}


class ShapeError(Exception):
    """No usable model shape (unknown name, unreadable config.json). Exit 2, like a recipe error."""

    exit_code = 2


@dataclass(frozen=True)
class ModelShape:
    """The dimensions preflight needs; parameter counts are derived from them."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    head_dim: int = 0  # 0: hidden // heads
    tied_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: q/k/v biases (bf16, not quantised; counted with the norms)
    experts: int = 1  # MoE: MLP weights x experts (activations are not modelled for MoE)
    source: str = "built-in table"

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def q_dim(self) -> int:
        return self.heads * self.hd

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.hd

    def module_dims(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear module of one decoder layer."""
        h, i = self.hidden, self.intermediate
        return {
            "q_proj": (h, self.q_dim),
            "k_proj": (h, self.kv_dim),
            "v_proj": (h, self.kv_dim),
            "o_proj": (self.q_dim, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @property
    def linear_params_per_layer(self) -> int:
        dims = self.module_dims()
        attn = sum(dims[m][0] * dims[m][1] for m in ATTN_MODULES)
        mlp = sum(dims[m][0] * dims[m][1] for m in MLP_MODULES) * self.experts
        return attn + mlp

    @property
    def linear_params(self) -> int:
        """Parameters in the decoder layers' linear modules: what NF4 quantises."""
        return self.linear_params_per_layer * self.layers

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def lm_head_params(self) -> int:
        return 0 if self.tied_embeddings else self.vocab * self.hidden

    @property
    def small_params(self) -> int:
        """Norm weights (2 per layer + final) and q/k/v biases: kept in bf16."""
        norms = (2 * self.layers + 1) * self.hidden
        bias = (self.q_dim + 2 * self.kv_dim) * self.layers if self.qkv_bias else 0
        return norms + bias

    @property
    def total_params(self) -> int:
        return self.linear_params + self.embedding_params + self.lm_head_params + self.small_params

    @property
    def largest_linear_params(self) -> int:
        return max(a * b for a, b in self.module_dims().values())

    def to_dict(self) -> dict[str, Any]:
        """The dimensions and the derived parameter counts, for --json."""
        d = asdict(self)
        d.update(
            head_dim=self.hd,
            linear_params=self.linear_params,
            embedding_params=self.embedding_params,
            lm_head_params=self.lm_head_params,
            total_params=self.total_params,
        )
        return d


# From each model's published config.json (FIELD_NOTES section 1). All five are untied; the Qwen2.5
# models have q/k/v biases.
BUILTIN_SHAPES: dict[str, ModelShape] = {
    "llama-3.1-8b": ModelShape("Llama 3.1 8B", 4096, 32, 32, 8, 14336, 128256),
    "qwen-2.5-14b": ModelShape("Qwen 2.5 14B", 5120, 48, 40, 8, 13824, 152064, qkv_bias=True),
    "mistral-small-22b": ModelShape("Mistral Small 22B (2409)", 6144, 56, 48, 8, 16384, 32768),
    "qwen-2.5-32b": ModelShape("Qwen 2.5 32B", 5120, 64, 40, 8, 27648, 152064, qkv_bias=True),
    "llama-3.1-70b": ModelShape("Llama 3.1 70B", 8192, 80, 64, 8, 28672, 128256),
}


def _target_names(recipe: Any) -> list[str]:
    """Short names of the LoRA target modules, in recipe order ("all-linear" expanded)."""
    tm = recipe.lora.target_modules
    return list(ALL_LINEAR) if tm == "all-linear" else [t.split(".")[-1] for t in tm]


def lora_tensors(shape: ModelShape, recipe: Any) -> tuple[list[tuple[int, int]], list[str]]:
    """[(numel, count)] of LoRA A/B tensors, and target names preflight does not know."""
    r, dims, out, unknown = recipe.lora.r, shape.module_dims(), [], []
    for name in dict.fromkeys(_target_names(recipe)):
        if name in dims:
            fin, fout = dims[name]
            n = shape.layers * (shape.experts if name in MLP_MODULES else 1)
            out += [(r * fin, n), (fout * r, n)]
        elif name in ("lm_head", "embed_tokens"):
            out += [(r * shape.vocab, 1), (r * shape.hidden, 1)]
        else:
            unknown.append(name)
    return out, unknown


def targeted(recipe: Any) -> set[str]:
    """Short names of the LoRA target modules ("all-linear" expanded)."""
    return set(_target_names(recipe))


def _norm(s: str) -> str:
    return re.sub(r"[^a-z0-9]", "", s.lower())


def _guess_builtin(name: str) -> str | None:
    """'meta-llama/Llama-3.1-8B-Instruct' -> 'llama-3.1-8b': hub ids of the built-in models."""
    n = _norm(name.split("/")[-1])
    aliases = {
        "llama-3.1-8b": ("llama318b",),
        "qwen-2.5-14b": ("qwen2514b",),
        "mistral-small-22b": ("mistralsmall2409", "mistralsmallinstruct2409", "mistralsmall22b"),
        "qwen-2.5-32b": ("qwen2532b",),
        "llama-3.1-70b": ("llama3170b",),
    }
    for key, keys in aliases.items():
        if any(n.startswith(k) for k in keys):
            return key
    return None


def shape_from_config(data: dict[str, Any], source: str) -> ModelShape:
    """A ModelShape from a transformers config.json dict (text_config for multimodal wrappers)."""
    cfg = data.get("text_config") if isinstance(data.get("text_config"), dict) else data
    try:
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        mtype = str(cfg.get("model_type") or data.get("model_type") or "")
        tied = cfg.get("tie_word_embeddings", data.get("tie_word_embeddings"))
        if tied is None:
            tied = mtype not in UNTIED_BY_DEFAULT
        return ModelShape(
            name=str((data.get("architectures") or [mtype or "model"])[0]),
            hidden=hidden,
            layers=int(cfg["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads),
            intermediate=int(cfg["intermediate_size"]),
            vocab=int(cfg["vocab_size"]),
            head_dim=int(cfg.get("head_dim") or 0),
            tied_embeddings=bool(tied),
            qkv_bias=bool(cfg.get("attention_bias", mtype == "qwen2")),
            experts=int(cfg.get("num_local_experts") or cfg.get("num_experts") or 1),
            source=source,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ShapeError(f"{source}: not a decoder config preflight understands ({e!r})") from None


def resolve_shape(recipe: Any) -> ModelShape:
    """Tiny model from the recipe, else a local config.json, else the built-in table."""
    m = recipe.model
    if m.tiny is not None:
        t = m.tiny
        # The runner sizes the vocabulary from the trained tokenizer: at most vocab_size + specials.
        dims = (t.hidden_size, t.num_layers, t.num_heads, t.num_kv_heads, t.intermediate_size)
        name = f"tiny Llama ({m.name})"
        return ModelShape(name, *dims, t.vocab_size, source="recipe [model.tiny]")
    folder = Path(m.name).expanduser()
    cfg_path = folder / "config.json"
    if cfg_path.is_file():
        try:
            data = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ShapeError(f"{cfg_path}: cannot read: {e}") from None
        if not isinstance(data, dict):
            raise ShapeError(f"{cfg_path}: not a JSON object")
        return shape_from_config(data, str(cfg_path))
    key = m.shape or _guess_builtin(m.name)
    if key is None or key not in BUILTIN_SHAPES:
        known = ", ".join(BUILTIN_SHAPES)
        if m.shape:
            what = f"model.shape {m.shape!r} is not a built-in shape"
        else:
            what = f"{m.name!r} is no local folder with a config.json and model.shape is not set"
        raise ShapeError(f"preflight: {what}; use one of: {known}")
    return replace(BUILTIN_SHAPES[key], source=f"built-in table ({key})")

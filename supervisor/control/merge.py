"""After the run: merge the LoRA adapter into its base model (on the CPU). (`rm`: control/remove.py.)

Merging a QLoRA model on the GPU dequantises it to bf16 in VRAM first (+30 GB on a 70B, an OOM
on a 24 GB card), so this always loads the bf16 base on the CPU, applies the adapter with peft
and `merge_and_unload()`s it there. The adapter was trained against the NF4-quantised base;
merging into the bf16 base is the standard QLoRA merge (NF4 is a lossy copy of those weights).
torch, transformers and peft are imported inside the functions that need them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from supervisor.store import read_json

OVERHEAD = 1.2  # bf16 weights + ~20 %: the adapter, save_pretrained's shard buffers, allocator slack


class MergeError(Exception):
    """The merge cannot be done (no adapter, base missing, not enough RAM). Shown as is."""


# ------------------------------------------------------------------------------ finding things


def _is_run(path: Path) -> bool:
    return (path / "run.json").is_file()


def _run_recipe(run_dir: Path) -> dict[str, Any] | None:
    """The recipe of the run's last attempt (what made its adapter), else the run's recipe."""
    root = run_dir / "attempts"
    nums = sorted((int(p.name) for p in root.iterdir() if p.name.isdigit()), reverse=True) if root.is_dir() else []
    for n in nums:
        data = read_json(root / str(n) / "recipe.json")
        if data:
            return data
    return read_json(run_dir / "recipe.json")


def find_adapter(source: Path, checkpoint: int | None = None) -> Path:
    """The adapter folder: a run's final adapter or its checkpoint-N, or `source` itself."""
    source = Path(source).expanduser()
    if _is_run(source):
        info, state = read_json(source / "run.json") or {}, read_json(source / "state.json") or {}
        base = Path(info.get("output_dir") or state.get("output_dir") or ".")
        dirs = [Path(p) for p in (state.get("output_dir"), info.get("output_dir")) if p]
        dirs += sorted(base.glob("attempt-*"), key=lambda p: p.stat().st_mtime, reverse=True) if base.is_dir() else []
        if checkpoint is None:
            cands = ([Path(state["adapter_path"])] if state.get("adapter_path") else []) + [d / "adapter" for d in dirs]
        else:
            cands = [d / f"checkpoint-{checkpoint}" for d in dirs]
        what = f"checkpoint-{checkpoint}" if checkpoint is not None else "final adapter"
    else:
        cands = [source / f"checkpoint-{checkpoint}"] if checkpoint is not None else [source, source / "adapter"]
        what = f"checkpoint-{checkpoint}" if checkpoint is not None else "adapter (adapter_config.json)"
    for c in cands:
        if (c / "adapter_config.json").is_file():
            return c
    looked = ", ".join(str(c) for c in dict.fromkeys(cands)) or str(source)
    hint = "" if checkpoint is not None else " (a stopped or failed run has none: pass --checkpoint N)"
    raise MergeError(f"no {what} found; looked in {looked}{hint}")


def _rebuild_tiny(recipe: dict[str, Any], base: Path) -> Path:
    """The tiny recipe's base, rebuilt into its cache when the folder is gone (same key, same seed)."""
    from supervisor.recipe import Recipe
    from supervisor.runner.tiny import build_tiny

    r = Recipe.model_validate(recipe)
    folder, _cached = build_tiny(r.model.tiny, r.data.path, base.parent, r.data.format)
    return folder


def find_base(adapter: Path, run_dir: Path | None, base_model: str | None = None) -> tuple[str, dict[str, Any] | None]:
    """(base model path or hub id, the run's recipe or None) for an adapter."""
    cfg = read_json(adapter / "adapter_config.json") or {}
    recipe = _run_recipe(run_dir) if run_dir is not None else None
    base = base_model or cfg.get("base_model_name_or_path")
    if not base:
        raise MergeError(f"{adapter}/adapter_config.json names no base_model_name_or_path; pass the base model")
    tiny = ((recipe or {}).get("model") or {}).get("tiny")
    local = Path(base).expanduser()
    if (local / "config.json").is_file():
        return str(local), recipe
    if tiny and local.is_absolute():  # the trainer loads the tiny base from its cache folder
        return str(_rebuild_tiny(recipe or {}, local)), recipe
    if local.is_absolute():
        raise MergeError(f"base model folder {local} is gone (no config.json); pass the run folder so a "
                         "tiny base can be rebuilt, or give the base model explicitly")
    return base, recipe  # a hub id: transformers resolves it (its cache, else a download)


def bf16_bytes(config: dict[str, Any]) -> int:
    """Bytes of the model in bf16 from its config (2 bytes per parameter)."""
    from supervisor.preflight.shapes import ShapeError, shape_from_config

    try:
        return 2 * shape_from_config(config, "config.json").total_params
    except ShapeError as e:
        raise MergeError(f"cannot size the base model for the RAM check: {e}") from None


def check_ram(need: int, host_ram_bytes: int | None = None) -> int:
    """Available host RAM; raises MergeError when `need` does not fit."""
    if host_ram_bytes is None:
        import psutil

        host_ram_bytes = int(psutil.virtual_memory().available)
    if need > host_ram_bytes:
        raise MergeError(
            f"not enough host RAM to merge on the CPU: the bf16 model needs about {need / 2**30:.2f} GiB "
            f"({need:,} bytes, parameters x 2 bytes + 20 %) but only {host_ram_bytes / 2**30:.2f} GiB "
            f"({host_ram_bytes:,} bytes) is available. Free memory or merge on a bigger machine "
            "(never on the GPU: it dequantises the whole model in VRAM)."
        )
    return host_ram_bytes


# ------------------------------------------------------------------------------ merging


def merge_adapter(run_dir_or_adapter: Path, out_dir: Path, checkpoint: int | None = None,
                  host_ram_bytes: int | None = None, *, base_model: str | None = None) -> Path:
    """Merge the adapter into its bf16 base on the CPU and save safetensors shards + tokenizer."""
    source = Path(run_dir_or_adapter).expanduser()
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise MergeError(f"{out_dir} exists and is not an empty folder; choose a new --out")
    adapter = find_adapter(source, checkpoint)
    base, recipe = find_base(adapter, source if _is_run(source) else None, base_model)
    trust = bool(((recipe or {}).get("model") or {}).get("trust_remote_code", False))

    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base, trust_remote_code=trust)
    if getattr(config, "quantization_config", None):
        raise MergeError(f"{base} is a pre-quantised checkpoint; the merge needs the bf16 base model")
    need = int(bf16_bytes(config.to_dict()) * OVERHEAD)
    check_ram(need, host_ram_bytes)

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # device_map cpu and torch_device cpu: nothing of this touches a GPU, even when one is free.
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, device_map={"": "cpu"},
                                                 trust_remote_code=trust)
    model = PeftModel.from_pretrained(model, str(adapter), torch_device="cpu")
    merged = model.merge_and_unload()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(adapter), trust_remote_code=trust)
    except (OSError, ValueError):  # no tokenizer saved with this adapter: the base's
        tokenizer = AutoTokenizer.from_pretrained(base, trust_remote_code=trust)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Written aside and renamed in: an interrupted merge never leaves a folder that looks complete.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.merging-", dir=out_dir.parent))
    try:
        merged.save_pretrained(tmp, max_shard_size="2GB")
        tokenizer.save_pretrained(tmp)
        meta = {"base": base, "adapter": str(adapter), "checkpoint": checkpoint, "merged_at": time.time(),
                "dtype": "bfloat16", "device": "cpu", "tool": "qlora-watch merge"}
        (tmp / "qlora-watch-merge.json").write_text(json.dumps(meta, indent=1) + "\n")
        if not any(tmp.glob("*.safetensors")):
            raise MergeError("save_pretrained wrote no .safetensors file")
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir

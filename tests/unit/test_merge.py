"""merge_adapter on the real tiny model (transformers + peft on CPU), and remove_run.

The adapters are made here with peft (random non-zero B weights), not trained: what matters is
that the merged model computes what base + adapter computes.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from supervisor.checkpoints.folders import claim_output_dir
from supervisor.control.merge import MergeError, find_adapter, merge_adapter
from supervisor.control.remove import RemoveError, describe_removal, remove_run
from supervisor.recipe import load_recipe, recipe_to_json
from supervisor.store import atomic_write, create_run
from tests.support import ROOT


def _make_adapter(base_path: Path, folder: Path, seed: int, tokenizer: Any) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                            lora_dropout=0.0, task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero (a no-op adapter): make it matter
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A finished tiny run: run folder, output dir with adapter/ and checkpoint-50/ (two adapters)."""
    from transformers import AutoTokenizer

    from supervisor.runner.tiny import build_tiny

    root = tmp_path_factory.mktemp("merge")
    out = root / "outputs" / "tiny"
    recipe = load_recipe(ROOT / "recipes" / "tiny.toml", [f"train.output_dir={out}"])
    base, _ = build_tiny(recipe.model.tiny, recipe.data.path, out.parent / ".tiny-cache", recipe.data.format)
    tok = AutoTokenizer.from_pretrained(base)
    out.mkdir(parents=True)
    _make_adapter(base, out / "adapter", 1, tok)
    _make_adapter(base, out / "checkpoint-50", 2, tok)
    store = create_run(root / "runs", {"recipe": "tiny", "model": "tiny-llama", "output_dir": str(out)})
    store.attempt_dir(1).mkdir(parents=True)
    (store.attempt_dir(1) / "recipe.json").write_text(recipe_to_json(recipe))
    store.write_state({"state": "completed", "adapter_path": str(out / "adapter"), "output_dir": str(out)})
    return {"root": root, "run": store.path, "out": out, "base": base, "tok": tok}


def _logits(model: Any, ids: Any) -> Any:
    import torch

    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _reference(base: Path, adapter: Path, ids: Any) -> tuple[Any, Any]:
    """(base logits, base + unmerged adapter logits), both in float32."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    plain = _logits(model, ids)
    return plain, _logits(PeftModel.from_pretrained(model, str(adapter)), ids)


def _check_merged(merged_dir: Path, base: Path, adapter: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.bfloat16)
    ids = torch.randint(0, merged.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    plain, want = _reference(base, adapter, ids)
    assert merged.dtype == torch.bfloat16
    assert not any("lora" in n for n, _ in merged.named_parameters())
    got = _logits(merged.float(), ids)
    err = (got - want).abs().max().item()
    effect = (want - plain).abs().max().item()
    # bf16 storage of W + BA rounds each weight by <= 2^-9 relative: small against the adapter's effect.
    assert err < 0.02 * want.abs().max().item(), (err, effect)
    assert effect > 10 * err, (err, effect)


def test_merge_final_adapter_from_run(tiny: dict[str, Any], tmp_path: Path) -> None:
    out = merge_adapter(tiny["run"], tmp_path / "merged")
    assert out == tmp_path / "merged"
    assert list(out.glob("*.safetensors")) and (out / "config.json").is_file()
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer_config.json").is_file()
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    meta = json.loads((out / "qlora-watch-merge.json").read_text())
    assert meta["adapter"] == str(tiny["out"] / "adapter") and meta["device"] == "cpu"
    _check_merged(out, tiny["base"], tiny["out"] / "adapter")
    assert not list(tmp_path.glob(".merged.merging-*"))


def test_merge_checkpoint(tiny: dict[str, Any], tmp_path: Path) -> None:
    assert find_adapter(tiny["run"], 50) == tiny["out"] / "checkpoint-50"
    out = merge_adapter(tiny["out"], tmp_path / "m50", checkpoint=50)  # an output folder works too
    _check_merged(out, tiny["base"], tiny["out"] / "checkpoint-50")


def test_refuses_when_ram_is_short(tiny: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(MergeError) as err:
        merge_adapter(tiny["run"], tmp_path / "never", host_ram_bytes=100_000)
    msg = str(err.value)
    assert "100,000 bytes" in msg and "needs about" in msg and "GiB" in msg
    assert not (tmp_path / "never").exists() and list(tmp_path.iterdir()) == []


def test_refusals(tiny: dict[str, Any], tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("mine")
    with pytest.raises(MergeError, match="not an empty folder"):
        merge_adapter(tiny["run"], tmp_path / "full")
    with pytest.raises(MergeError, match="checkpoint-999"):
        find_adapter(tiny["run"], 999)
    with pytest.raises(MergeError, match="--checkpoint"):
        find_adapter(tmp_path / "full")


def test_rebuilds_a_missing_tiny_base(tiny: dict[str, Any], tmp_path: Path) -> None:
    base: Path = tiny["base"]
    keep = tmp_path / "orig-base"
    shutil.move(base, keep)  # the cache folder was cleaned: merge rebuilds the same base
    try:
        out = merge_adapter(tiny["run"], tmp_path / "merged")
        assert (base / "config.json").is_file()
        _check_merged(out, keep, tiny["out"] / "adapter")  # same weights as the original base
    finally:
        shutil.rmtree(base, ignore_errors=True)
        shutil.move(keep, base)


# ------------------------------------------------------------------------------ remove_run


def _run(root: Path, state: str | None, out: Path | None = None, age_s: float = 3600) -> Path:
    store = create_run(root / "runs", {"recipe": "x", "output_dir": str(out or root / "out")})
    info = json.loads((store.path / "run.json").read_text())
    info["created_at"] = time.time() - age_s
    atomic_write(store.path / "run.json", json.dumps(info))
    if state:
        store.write_state({"state": state})
    store.db()  # creates db.sqlite, as a real run has
    store.close()
    return store.path


def _output(root: Path, run_id: str) -> Path:
    out = root / "out"
    claim_output_dir(out, run_id)
    for name in ("checkpoint-100", "checkpoint-200.incomplete-17", "adapter", "tensorboard/system"):
        (out / name).mkdir(parents=True)
        (out / name / "f.bin").write_bytes(b"x" * 10)
    (out / "notes.txt").write_text("mine")
    att = out / "attempt-3"
    claim_output_dir(att, run_id)
    (att / "checkpoint-10").mkdir()
    outside = root / "precious"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    os.symlink(outside, out / "checkpoint-300")  # a link: unlinked, never followed
    return out


def test_rm_refuses_live_runs(tmp_path: Path) -> None:
    live = _run(tmp_path, "training")
    with pytest.raises(RemoveError, match="live"):
        remove_run(live, with_checkpoints=False)
    assert describe_removal(live, False).startswith("refused")
    young = _run(tmp_path, None, age_s=1)  # no state yet: maybe starting
    with pytest.raises(RemoveError, match="starting"):
        remove_run(young, with_checkpoints=False)
    assert live.exists() and young.exists()
    with pytest.raises(RemoveError, match="not a qlora-watch run"):
        remove_run(tmp_path, with_checkpoints=False)


def test_rm_records_only_keeps_checkpoints(tmp_path: Path) -> None:
    run = _run(tmp_path, "completed")
    out = _output(tmp_path, run.name)
    text = describe_removal(run, False)
    assert str(run) in text and "keep checkpoints" in text
    assert remove_run(run, with_checkpoints=False) == [str(run)]
    assert not run.exists() and (out / "checkpoint-100").is_dir() and (out / "adapter").is_dir()


def test_rm_with_checkpoints(tmp_path: Path) -> None:
    run = _run(tmp_path, "failed")
    out = _output(tmp_path, run.name)
    text = describe_removal(run, True)
    assert "checkpoint-100" in text and "attempt-3" in text and "notes.txt" not in text
    removed = remove_run(run, with_checkpoints=True)
    assert str(out / "adapter") in removed and str(run) == removed[-1]
    left = sorted(p.name for p in out.iterdir())
    assert left == [".qlora-watch-run", "notes.txt", "tensorboard"]
    assert (tmp_path / "precious" / "keep.txt").read_text() == "keep"
    assert not run.exists()


def test_rm_never_touches_another_runs_output(tmp_path: Path) -> None:
    run = _run(tmp_path, "completed")
    out = _output(tmp_path, "someone-else")
    assert "belongs to run someone-else" in describe_removal(run, True)
    assert remove_run(run, with_checkpoints=True) == [str(run)]
    assert (out / "checkpoint-100").is_dir() and (out / "adapter").is_dir()

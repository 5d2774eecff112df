"""Recipes: every shipped file validates; bad input gives a precise error and exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisor import ladder
from supervisor.recipe import (
    RecipeError,
    apply_rung,
    load_recipe,
    parse_override,
)
from tests.support import ROOT, recipe_file

RECIPES = sorted((ROOT / "recipes").glob("*.toml"))

MINIMAL = """
name = "t"
[model]
name = "x"
[data]
path = "d.jsonl"
[train]
output_dir = "runs/t"
"""


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_validates(path: Path) -> None:
    r = load_recipe(path)
    assert r.train.save_total_limit >= 1
    text = path.read_text()
    assert "qlora-watch start" in text, "header comment must give the command that runs it"
    assert "--set" in text, "header comment must give an override example"
    for rung in r.oom_ladder:
        apply_rung(r, rung)


def test_article_hyperparameters() -> None:
    r70 = load_recipe(ROOT / "recipes/70b.toml")
    assert (r70.lora.r, r70.lora.alpha, r70.train.max_seq_len) == (16, 32, 1024)
    assert r70.train.max_grad_norm == 0.3 and r70.train.optim == "paged_adamw_8bit"
    assert r70.env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert r70.oom_ladder == [
        {"train.max_seq_len": 768}, {"lora.r": 8}, {"lora.target_modules": ["q_proj", "v_proj"]},
    ]
    r8 = load_recipe(ROOT / "recipes/8b.toml")
    assert r8.lora.r == 64 and r8.lora.target_modules == "all-linear"
    assert r8.train.effective_batch == 16 and r8.train.learning_rate == 2e-4


def test_unknown_key_suggests(tmp_path: Path) -> None:
    p = recipe_file(tmp_path, MINIMAL + "save_total_limt = 3\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert "train.save_total_limt" in msg and "did you mean save_total_limit?" in msg
    assert f"{p}:9:" in msg  # points at the line


def test_unknown_section_and_nested(tmp_path: Path) -> None:
    p = recipe_file(tmp_path, 'quantizaton = "4bit"\n' + MINIMAL)
    with pytest.raises(RecipeError, match=r"quantizaton: unknown key"):
        load_recipe(p)
    p = recipe_file(tmp_path, MINIMAL + "[guards.thermal]\nmargin = 3\n")
    with pytest.raises(RecipeError, match=r"guards.thermal.margin: unknown key \(did you mean margin_c\?\)"):
        load_recipe(p)


@pytest.mark.parametrize(
    "extra, pattern",
    [
        ("save_total_limit = -1", r"train.save_total_limit: Input should be greater than or equal to 1"),
        ("per_device_batch = 0", r"train.per_device_batch"),
        ('max_seq_len = "ten"', r"train.max_seq_len: Input should be a valid integer"),
        ("learning_rate = 5.0", r"train.learning_rate"),
        ("padding_free = true", r"train: .*padding_free = true needs packing = true"),
    ],
)
def test_bad_values(tmp_path: Path, extra: str, pattern: str) -> None:
    with pytest.raises(RecipeError, match=pattern):
        load_recipe(recipe_file(tmp_path, MINIMAL + extra + "\n"))


def test_malformed_toml_gives_line_and_column(tmp_path: Path) -> None:
    p = recipe_file(tmp_path, MINIMAL + "lr = = 3\n")
    with pytest.raises(RecipeError, match=rf"{p}:9:\d+: invalid TOML"):
        load_recipe(p)
    p = recipe_file(tmp_path, MINIMAL + 'output_dir = "again"\n')
    with pytest.raises(RecipeError, match=rf"{p}:9:\d+: invalid TOML"):
        load_recipe(p)


def test_invalid_utf8_and_nul(tmp_path: Path) -> None:
    p = recipe_file(tmp_path, MINIMAL.encode() + b'description = "\xff"\n')
    with pytest.raises(RecipeError, match=rf"{p}:9:\d+: not valid UTF-8"):
        load_recipe(p)
    p = recipe_file(tmp_path, MINIMAL.encode() + b"\x00\n")
    with pytest.raises(RecipeError, match="invalid TOML"):
        load_recipe(p)


def test_huge_file_rejected(tmp_path: Path) -> None:
    p = recipe_file(tmp_path, MINIMAL + "#" * (2 << 20) + "\n")
    with pytest.raises(RecipeError, match="limit"):
        load_recipe(p)


def test_paths_and_command_injection(tmp_path: Path) -> None:
    bad = MINIMAL.replace('output_dir = "runs/t"', 'output_dir = "../../x"')
    with pytest.raises(RecipeError, match=r"train.output_dir: must not contain '..'"):
        load_recipe(recipe_file(tmp_path, bad))
    bad = MINIMAL.replace('output_dir = "runs/t"', 'output_dir = "/"')
    with pytest.raises(RecipeError, match="must not be /"):
        load_recipe(recipe_file(tmp_path, bad))
    shell = MINIMAL + '[trainer]\ncommand = "python train.py; touch /tmp/pwned"\n'
    with pytest.raises(RecipeError, match="argv list"):
        load_recipe(recipe_file(tmp_path, shell))


def test_literal_secret_rejected(tmp_path: Path) -> None:
    p = recipe_file(tmp_path, MINIMAL + '[env]\nHF_TOKEN = "hf_abcdefghijklmnopqrstuvwxyz0123456789"\n')
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    assert "do not put secrets" in str(e.value)


def test_overrides_are_typed_and_validated(tmp_path: Path) -> None:
    p = recipe_file(tmp_path, MINIMAL)
    r = load_recipe(p, ["train.max_seq_len=768", 'lora.target_modules=["q_proj","v_proj"]',
                        "model.name=other", "train.bf16=false"])
    assert r.train.max_seq_len == 768 and r.lora.target_modules == ["q_proj", "v_proj"]
    assert r.model.name == "other" and r.train.bf16 is False
    with pytest.raises(RecipeError, match="did you mean max_seq_len"):
        load_recipe(p, ["train.max_seq_lenn=768"])
    with pytest.raises(RecipeError, match="valid integer"):
        load_recipe(p, ["train.max_seq_len=abc"])
    with pytest.raises(RecipeError, match="KEY=VALUE"):
        parse_override("train.max_seq_len")


def test_ladder_rungs() -> None:
    r = load_recipe(ROOT / "recipes/70b.toml")
    one = apply_rung(r, r.oom_ladder[0])
    assert one.train.max_seq_len == 768 and one.train.effective_batch == r.train.effective_batch
    assert not ladder.changes_adapter_shape(r.oom_ladder[0])
    assert ladder.changes_adapter_shape(r.oom_ladder[1])
    assert ladder.describe(r, 1) == "max_seq_len 1024 -> 768"
    # A batch rung keeps the effective batch by growing grad_accum.
    r8 = load_recipe(ROOT / "recipes/8b.toml")
    half = apply_rung(r8, {"train.per_device_batch": r8.train.per_device_batch // 2})
    assert half.train.effective_batch == r8.train.effective_batch


def test_bad_ladder_rung(tmp_path: Path) -> None:
    p = recipe_file(tmp_path, 'oom_ladder = [{ "lora.alpah" = 8 }]\n' + MINIMAL)
    with pytest.raises(RecipeError, match=r"oom_ladder\[0\].*lora.alpah: unknown key \(did you mean alpha"):
        load_recipe(p)



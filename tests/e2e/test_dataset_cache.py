"""The tokenised-dataset cache (#20, runner/dcache.py): trl's own tokens, through the cache.

The real SFTTrainer on the tiny model (chat records, its chat template): the training dataset
trl prepares directly and the one prepared through the cache (first saved, then loaded) are the
same rows, for the recipe's max_length, a shorter one (an OOM rung) and packing. A damaged
entry, changed data and another max_samples are never served.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from supervisor.recipe import load_recipe
from supervisor.runner import dcache

ROOT = Path(__file__).resolve().parents[2]


from tests.support import RecordingWriter as Writer  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from supervisor.runner.backends import Backend, load_base
    from supervisor.runner.tiny import build_tiny

    recipe = load_recipe(str(ROOT / "recipes" / "tiny.toml"))
    folder, _ = build_tiny(recipe.model.tiny, ROOT / recipe.data.path,
                           tmp_path_factory.mktemp("tiny"), recipe.data.format)
    _, tokenizer = load_base(Backend("hf", "test"), recipe, str(folder), "sdpa")
    return recipe, folder, tokenizer


def prepared(tiny, tmp_path: Path, root: Path | None, data: Path | None = None, **sets) -> tuple[list, Writer]:
    """The rows of trainer.train_dataset as the built-in trainer builds it (cache at root)."""
    from supervisor.runner import train
    from supervisor.runner.backends import Backend, load_base
    from supervisor.runner.data import load_records, to_dataset

    recipe, folder, _ = tiny
    data_path = str(data or ROOT / recipe.data.path)
    argv = ["--recipe", str(ROOT / "recipes" / "tiny.toml"), "--output-dir", str(tmp_path / "out"),
            "--set", f"data.path={data_path}"]
    for k, v in sets.items():
        argv += ["--set", f"{k.replace('__', '.')}={v}"]
    ctx = train.load_context(train.parse_args(argv), env={})
    model, tokenizer = load_base(Backend("hf", "test"), ctx.recipe, str(folder), "sdpa")
    records, fmt = load_records(ctx.recipe.data.path, ctx.recipe.data.format, ctx.recipe.data.max_samples)
    w = Writer()
    old = os.environ.get(dcache.ENV_DIR)
    if root is None:
        os.environ.pop(dcache.ENV_DIR, None)
    else:
        os.environ[dcache.ENV_DIR] = str(root)
    try:
        cls = train.trainer_class(w)
        cls.dataset_cache = train.dataset_cache(ctx.recipe, str(folder), fmt, "hf", w)
        trainer = cls(model=train.with_lora(model, ctx.recipe), args=train.sft_config(ctx, use_liger=False),
                      train_dataset=to_dataset(records), processing_class=tokenizer)
    finally:
        if old is None:
            os.environ.pop(dcache.ENV_DIR, None)
        else:
            os.environ[dcache.ENV_DIR] = old
    return [dict(r) for r in trainer.train_dataset], w


@pytest.mark.parametrize("sets", [{}, {"train__max_seq_len": 12}, {"train__packing": "true", "train__max_seq_len": 64}],
                         ids=["recipe", "short-rung", "packing"])
def test_the_cache_gives_trl_s_own_tokens(tiny, tmp_path, sets):
    direct, w0 = prepared(tiny, tmp_path, None, **sets)
    assert direct and "dataset_cache_save" not in w0.phases()
    root = tmp_path / "dc"
    saved, w1 = prepared(tiny, tmp_path, root, **sets)
    loaded, w2 = prepared(tiny, tmp_path, root, **sets)
    assert "dataset_cache_save" in w1.phases() and "dataset_cache_load" in w2.phases()
    assert saved == direct and loaded == direct


def test_one_entry_serves_every_rung(tiny, tmp_path):
    root = tmp_path / "dc"
    full, _ = prepared(tiny, tmp_path, root)  # attempt 1 at the recipe's length
    assert max(len(r["input_ids"]) for r in full) > 12  # so the rung below does cut
    rung, w = prepared(tiny, tmp_path, root, train__max_seq_len=12)
    assert "dataset_cache_load" in w.phases()
    assert rung == prepared(tiny, tmp_path, None, train__max_seq_len=12)[0]
    assert max(len(r["input_ids"]) for r in rung) <= 12
    assert len([p for p in root.iterdir() if not p.name.startswith(".")]) == 1


def test_damaged_entry_is_set_aside_and_the_records_tokenised_again(tiny, tmp_path):
    root = tmp_path / "dc"
    direct, _ = prepared(tiny, tmp_path, root)
    entry = next(root.iterdir())
    arrow = next(entry.rglob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:-200])
    again, w = prepared(tiny, tmp_path, root)
    assert again == direct and "dataset_cache_load" not in w.phases()
    why = [e["cache_fallback"] for e in w.events if e.get("cache_fallback")]
    assert why and "size" in why[0]
    assert list(root.glob(f"{entry.name}.bad-*")) and (root / entry.name / dcache.MANIFEST).is_file()

    # same size, other bytes (a flipped byte): only the sha256 can tell
    data = bytearray(arrow.read_bytes())
    data[-300] ^= 0xFF
    arrow.write_bytes(bytes(data))
    again, w = prepared(tiny, tmp_path, root)
    assert again == direct and "dataset_cache_load" not in w.phases()
    assert any("sha256" in (e.get("cache_fallback") or "") for e in w.events)


def test_changed_data_or_max_samples_is_another_entry(tiny, tmp_path):
    recipe, _, _ = tiny
    data = tmp_path / "data.jsonl"
    data.write_text((ROOT / recipe.data.path).read_text())
    root = tmp_path / "dc"
    first, _ = prepared(tiny, tmp_path, root, data=data)
    lines = data.read_text().splitlines()
    rec = json.loads(lines[0])
    rec["messages"][-1]["content"] += " 7"
    data.write_text("\n".join([json.dumps(rec)] + lines[1:]) + "\n")
    changed, w = prepared(tiny, tmp_path, root, data=data)
    assert "dataset_cache_load" not in w.phases() and changed != first
    fewer, w = prepared(tiny, tmp_path, root, data=data, data__max_samples=5)
    assert "dataset_cache_load" not in w.phases() and len(fewer) <= 5
    assert len([p for p in root.iterdir() if not p.name.startswith(".")]) == 3

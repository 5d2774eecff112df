"""model.backend: the choice (hf | unsloth | auto), the fallback notice, recipe validation, and
Unsloth imported only when it is chosen. "Installed" cases use a real package on sys.path of a
subprocess: one that imports, one that fails at import (as Unsloth does without a GPU or with a
transformers it does not support)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from supervisor.recipe import RecipeError, load_recipe
from supervisor.runner.backends import (
    BackendUnavailable,
    choose_backend,
    model_type,
    unsloth_obstacle,
)
from tests.support import ROOT, fake_unsloth

TINY = ROOT / "recipes" / "tiny.toml"
GPU_RECIPES = ["8b", "14b", "22b", "32b", "70b"]


def llama_folder(tmp_path: Path, kind: str = "llama") -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": kind}))
    return folder


def choose_in_subprocess(site: Path | None, *sets: str, cuda: bool = True) -> dict:
    """choose_backend in a fresh interpreter (so sys.modules is clean), `site` first on its path."""
    code = (
        "import json, sys\n"
        "from supervisor.recipe import load_recipe\n"
        "from supervisor.runner.backends import choose_backend\n"
        f"r = load_recipe({str(ROOT / 'recipes' / '8b.toml')!r}, {list(sets)!r})\n"
        "try:\n"
        f"    b = choose_backend(r, cuda={cuda!r}); out = {{'name': b.name, 'reason': b.reason}}\n"
        "except SystemExit as e:\n"
        "    out = {'exit': str(e)}\n"
        "out['imported'] = 'unsloth' in sys.modules\n"
        "print(json.dumps(out))\n"
    )
    path = [str(site)] if site else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*path, str(ROOT)])}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_default_is_hf_and_gpu_recipes_ship_auto() -> None:
    assert load_recipe(TINY).model.backend == "hf"
    for name in GPU_RECIPES:
        recipe = load_recipe(ROOT / "recipes" / f"{name}.toml")
        assert recipe.model.backend == "auto", name
        assert recipe.lora.dropout == 0.0, name


def test_hf_is_chosen_without_importing_unsloth(tmp_path: Path) -> None:
    # even with an importable unsloth on the path: "hf" never touches it
    site = fake_unsloth(tmp_path, "__version__ = '0-test'\n")
    out = choose_in_subprocess(site, "model.backend=hf")
    assert out == {"name": "hf", "reason": 'model.backend = "hf"', "imported": False}


def test_auto_picks_unsloth_where_it_imports_and_supports_the_model(tmp_path: Path) -> None:
    site = fake_unsloth(tmp_path, "__version__ = '2026.10.9-test'\n")
    folder = llama_folder(tmp_path)
    out = choose_in_subprocess(site, f"model.name={folder}")
    assert out["name"] == "unsloth" and out["imported"] is True
    assert out["reason"] == 'model.backend = "auto": Unsloth 2026.10.9-test'


def test_auto_falls_back_with_the_import_error(tmp_path: Path) -> None:
    site = fake_unsloth(tmp_path, "raise NotImplementedError('Unsloth cannot find any torch accelerator')\n")
    out = choose_in_subprocess(site, f"model.name={llama_folder(tmp_path)}")
    assert out["name"] == "hf"
    assert out["reason"] == ('model.backend = "auto": HF path, because Unsloth failed to import: '
                             "NotImplementedError: Unsloth cannot find any torch accelerator")


def test_explicit_unsloth_that_cannot_import_is_a_one_line_error(tmp_path: Path) -> None:
    site = fake_unsloth(tmp_path, "raise ImportError('Unsloth needs transformers<=5.17.0')\n")
    out = choose_in_subprocess(site, f"model.name={llama_folder(tmp_path)}", "model.backend=unsloth")
    assert out["exit"] == ('error: model.backend = "unsloth": Unsloth failed to import: ImportError: '
                           'Unsloth needs transformers<=5.17.0; set model.backend = "auto" or "hf"')


def test_explicit_unsloth_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    if any((Path(p) / "unsloth").exists() for p in sys.path if p):
        pytest.skip("unsloth is installed in this environment")
    recipe = load_recipe(ROOT / "recipes" / "8b.toml", ["model.backend=unsloth"])
    with pytest.raises(BackendUnavailable, match=r"not installed \(pip install 'qlora-watch\[unsloth\]'\)"):
        choose_backend(recipe, cuda=True)


@pytest.mark.parametrize(("sets", "cuda", "why"), [
    ([], False, "no CUDA GPU"),
    (["train.use_cpu=true"], True, "no CUDA GPU"),
    (["hardware.gpus=2"], True, "hardware.gpus > 1 (FSDP-QLoRA) runs on the HF path"),
    (["quant.quant_type=fp4"], True, "quant.quant_type = 'fp4' (Unsloth loads NF4 only)"),
])
def test_auto_reasons(sets: list[str], cuda: bool, why: str) -> None:
    recipe = load_recipe(ROOT / "recipes" / "8b.toml", sets)
    assert why in (unsloth_obstacle(recipe, cuda) or "")
    assert choose_backend(recipe, cuda=cuda).reason.startswith('model.backend = "auto": HF path, because ')


def test_auto_on_the_tiny_model_says_why() -> None:
    recipe = load_recipe(TINY, ["model.backend=auto"])
    backend = choose_backend(recipe, cuda=True)
    assert backend.name == "hf"
    assert backend.reason == 'model.backend = "auto": HF path, because the tiny test model trains on the HF path'


def test_model_type_from_folder_shape_or_unknown(tmp_path: Path) -> None:
    folder = llama_folder(tmp_path, "phi3")
    recipe = load_recipe(ROOT / "recipes" / "8b.toml", [f"model.name={folder}"])
    assert model_type(recipe) == "phi3"
    assert "no fast path for model type 'phi3'" in unsloth_obstacle(recipe, cuda=True)
    for name, kind in [("8b", "llama"), ("14b", "qwen2"), ("22b", "mistral"), ("32b", "qwen2")]:
        assert model_type(load_recipe(ROOT / "recipes" / f"{name}.toml")) == kind
    unknown = load_recipe(TINY, ["model.name=someone/unknown-model"])
    unknown.model.tiny = None
    assert model_type(unknown) is None
    assert "unknown before download (set model.shape)" in unsloth_obstacle(unknown, cuda=True)


@pytest.mark.parametrize(("sets", "message"), [
    (["model.backend=unsloth", "hardware.gpus=2"], 'trains on one GPU; FSDP (hardware.gpus > 1) needs backend "hf" or "auto"'),
    (["model.backend=unsloth", "quant.quant_type=fp4"], "loads NF4 only"),
    (["model.backend=unsloth", 'trainer.command=["python", "train.py"]'], "applies to the built-in trainer"),
    (["model.backend=unslot"], "model.backend: Input should be 'hf', 'unsloth' or 'auto'"),
])
def test_recipe_validation(sets: list[str], message: str) -> None:
    with pytest.raises(RecipeError, match=None) as err:
        load_recipe(ROOT / "recipes" / "8b.toml", sets)
    assert message in str(err.value) and "\n" not in str(err.value).strip()


def test_sft_config_under_unsloth_leaves_padding_free_and_checkpointing_to_it(tmp_path: Path) -> None:
    from supervisor.runner.backends import Backend, sft_overrides
    from supervisor.runner.train import load_context, parse_args, sft_config

    recipe = tmp_path / "r.toml"
    recipe.write_text(TINY.read_text().replace('path = "data/', f'path = "{ROOT}/recipes/data/'))
    ctx = load_context(parse_args(["--recipe", str(recipe), "--output-dir", str(tmp_path / "o")]), env={})
    over = sft_overrides(Backend("unsloth", "test"), ctx.recipe)
    cfg = sft_config(ctx, use_liger=False, overrides=over)
    ck = "activation_checkpointing" if hasattr(cfg, "activation_checkpointing") else "gradient_checkpointing"
    assert getattr(cfg, ck) is False and cfg.padding_free is None and cfg.use_liger_kernel is False
    assert sft_overrides(Backend("hf", "test"), ctx.recipe) == {}
    assert getattr(sft_config(ctx), ck) is True and cfg.save_only_model is False


def test_preflight_estimates_the_backend_the_run_will_take(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from supervisor.preflight.check import estimate

    def need(*sets: str) -> float:
        rep = estimate(load_recipe(ROOT / "recipes" / "8b.toml", list(sets)), gpu_mem_gib=141)
        assert any(c.key == "backend" for c in rep.components) == ("backend unsloth" in rep.setup)
        return rep.vram.need

    hf, unsloth = need("model.backend=hf"), need("model.backend=unsloth")
    assert unsloth < 0.75 * hf
    if not any((Path(p) / "unsloth").exists() for p in sys.path if p):
        assert need() == hf  # auto without Unsloth installed: the HF path, estimated as such
    monkeypatch.syspath_prepend(str(fake_unsloth(tmp_path, "")))
    assert need() == unsloth  # auto with Unsloth installed (found, not imported)
    assert "unsloth" not in sys.modules

"""What the package ships, in-process: every package folder listed, the committed recipe schema,
`recipes` and `recipes cp`, shipped recipes by name, a missing extra named. (The wheel built and
installed alone: tests/e2e/test_packaging.py.)"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from supervisor import catalog
from supervisor.cli import main
from tests.support import ROOT


def test_every_package_folder_is_listed_in_pyproject() -> None:
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "supervisor").rglob("__init__.py")}
    assert found <= listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}"


def test_committed_schema_matches_the_recipe_model() -> None:
    committed = (ROOT / "docs" / "recipe.schema.json").read_text()
    assert committed == catalog.schema_text(), (
        "docs/recipe.schema.json is stale: qlora-watch recipes schema > docs/recipe.schema.json")
    schema = json.loads(committed)
    assert "train" in schema["required"] and {"model", "data", "trainer"} <= set(schema["properties"])
    # [model]/[data] may be left out only with a [trainer] command (checked by the validator)
    assert schema["$defs"]["TrainSection"]["additionalProperties"] is False  # editors flag typos


def test_recipes_lists_each_with_model_seq_batch_and_card(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name in catalog.names():
        assert any(line.startswith(name + " ") for line in out.splitlines()), name
    line8 = next(line for line in out.splitlines() if line.startswith("8b "))
    assert "Llama-3.1-8B" in line8 and "4096" in line8 and "4 x 4" in line8 and "16 GiB card" in line8  # 14.5 GiB (dropout 0)
    assert main(["recipes", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in rows} == set(catalog.names())


def test_recipes_cp_copies_and_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dest = tmp_path / "my-tiny.toml"
    assert main(["recipes", "cp", "tiny", str(dest)]) == 0
    # The copy finds the shipped data from anywhere: its data.path became absolute.
    from supervisor.recipe import load_recipe

    assert Path(load_recipe(dest).data.path).is_file()
    assert main(["recipes", "cp", "tiny", str(dest)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert main(["recipes", "cp", "nope", str(tmp_path / "x.toml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "there are: 8b" in err


def test_a_shipped_recipe_is_found_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # outside the checkout: recipes/tiny.toml is not a file here
    assert catalog.resolve("tiny") == str(catalog.shipped_dir() / "tiny.toml")
    assert catalog.resolve("recipes/8b.toml") == str(catalog.shipped_dir() / "8b.toml")
    (tmp_path / "tiny").write_text("")  # a file of that name wins
    assert catalog.resolve("tiny") == "tiny"
    assert main(["validate", "70b"]) == 0


def test_a_missing_extra_is_named_in_one_line(monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from supervisor import extras

    real = extras.installed
    monkeypatch.setattr(extras, "installed", lambda m: m != "matplotlib" and real(m))
    assert main(["report", "whatever"]) == 2
    err = capsys.readouterr().err
    assert err == ("qlora-watch: report (its plots) needs matplotlib, which the base install leaves "
                   "out: pip install 'qlora-watch[report]' (in a checkout: pip install -e '.[report]')\n")

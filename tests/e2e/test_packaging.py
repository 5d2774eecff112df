"""What `pip install qlora-watch` gives: a light base that watches runs, shipped recipes, the schema.

The slow test builds a wheel from this tree, installs it alone (no extras) in a fresh venv and
uses it outside the checkout against a live run that the full venv started.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from supervisor import catalog
from supervisor.cli import main
from tests.support import ROOT, fake_recipe, qlw, wait_for

HEAVY = ("torch", "transformers", "peft", "trl", "bitsandbytes", "tensorboard", "matplotlib",
         "apprise", "plotext", "textual_plotext")


def test_wheel_ships_the_recipes_and_their_data(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for p in sorted((ROOT / "recipes").glob("*.toml")):
        assert f"supervisor/recipes/{p.name}" in names
    assert "supervisor/recipes/data/tiny-chat.jsonl" in names
    assert "supervisor/tui/app.tcss" in names


def test_wheel_metadata_keeps_the_trainer_stack_in_extras(wheel: Path) -> None:
    meta = zipfile.ZipFile(wheel).read("qlora_watch-0.1.0.dist-info/METADATA").decode()
    base = [line for line in meta.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert base and not [b for b in base if any(h in b for h in ("torch", "transformers", "plotext",
                                                                 "matplotlib", "apprise", "tensorboard"))]
    assert "Requires-Dist: torch" in meta and "extra == \"train\"" in meta


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


# ------------------------------------------------------------------------------ a fresh venv


def light_env(home: Path, venv: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{venv / 'bin'}:/usr/bin:/bin", QLORA_WATCH_HOME=str(home), TERM="xterm-256color")
    return env


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_base_install_alone_watches_a_live_run(tree: Path, qlw_home: Path, tmp_path: Path) -> None:
    pexpect = pytest.importorskip("pexpect")
    venv = tmp_path / "light"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    # `pip install .`, no extras; pip's wheel cache (~/.cache/pip) keeps a second run local.
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(tree)], check=True, timeout=300,
                   capture_output=True)
    have = subprocess.run([str(venv / "bin" / "python"), "-c", "import importlib.util as u; print("
                           f"[m for m in {HEAVY!r} if u.find_spec(m)])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    assert have == "[]", f"the base install pulled in {have}"
    env = light_env(qlw_home, venv)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import supervisor; print(supervisor.__file__)"],
                           capture_output=True, text=True, check=True, cwd=elsewhere, env=env).stdout
    assert "site-packages" in where  # the installed wheel, not the checkout

    def light(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(venv / "bin" / "qlora-watch"), *args], capture_output=True,
                              text=True, env=env, cwd=elsewhere, timeout=60)

    listed = light("recipes")
    assert listed.returncode == 0 and "tiny" in listed.stdout and "8b" in listed.stdout, listed.stderr
    assert light("recipes", "cp", "8b", "my-8b.toml").returncode == 0
    assert "llama-3.1-8b" in (elsewhere / "my-8b.toml").read_text()
    start = light("start", "tiny")
    assert start.returncode == 2
    assert "pip install 'qlora-watch[train]'" in start.stderr
    assert start.stderr.count("\n") == 1 and "Traceback" not in start.stderr

    # A live run started by the full install, watched by the light one.
    recipe = fake_recipe(tmp_path, ["--steps", "2000", "--step-time", "0.05"])
    run_id = qlw("start", str(recipe), "--detach", check=True).stdout.strip().splitlines()[-1]
    try:
        wait_for(lambda: '"step"' in qlw("status", run_id, "--json").stdout and
                 json.loads(qlw("status", run_id, "--json").stdout).get("step"), what="first steps")
        status = light("status", run_id)
        assert status.returncode == 0 and f"run       {run_id}" in status.stdout, status.stderr
        child = pexpect.spawn(str(venv / "bin" / "qlora-watch"), ["attach", run_id], env=env,
                              cwd=str(elsewhere), dimensions=(40, 140), timeout=60, encoding="utf-8")
        try:
            child.expect("TRAINING")
            child.expect("Training · ")  # the chart panel drew from live steps
            child.send("d")
            child.expect(f"detached from {run_id}")
            child.expect(pexpect.EOF)
        finally:
            child.close(force=True)
        assert child.exitstatus == 0
    finally:
        qlw("stop", run_id, "--now")
        qlw("wait", run_id, "--timeout", "30")

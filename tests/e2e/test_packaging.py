"""What `pip install qlora-watch` gives: a light base that watches runs, shipped recipes, the schema.

The slow test builds a wheel from this tree, installs it alone (no extras) in a fresh venv and
uses it outside the checkout against a live run that the full venv started.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

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

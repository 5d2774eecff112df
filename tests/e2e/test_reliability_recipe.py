"""RELIABILITY_PLAN G7 with a real supervisor: the recipe is snapshotted at start; editing the file
mid-run changes nothing. (G1-G6 and the parser fuzzing: tests/unit/test_reliability_recipe.py.)"""

from __future__ import annotations

import hashlib
import json
import stat
from pathlib import Path

import pytest

from tests.support import (
    fake_recipe,
    launches,
    read_state,
    run_dir,
    start,
    wait_end,
    wait_for,
)

pytestmark = pytest.mark.timeout(120)


def test_g7_recipe_edited_mid_run_changes_nothing(qlw_home: Path, tmp_path: Path) -> None:
    """The recipe is snapshotted (0600, hash in run.json) at start; rewriting the file while the
    run trains changes nothing, relaunches included."""
    rec = tmp_path / "rec.jsonl"
    recipe = fake_recipe(tmp_path, ["--steps", "40", "--step-time", "0.04", "--save-every", "10",
                                    "--crash-at", "15", "--record", str(rec),
                                    "--once-file", str(tmp_path / "once")])
    original = recipe.read_bytes()
    run_id = start(recipe)
    wait_for(lambda: launches(rec), what="first launch")
    recipe.write_text(recipe.read_text().replace("max_seq_len = 1024", "max_seq_len = 64")
                      .replace('"--steps", "40"', '"--steps", "99999"'))
    assert wait_end(run_id, 60) == 0
    first, second = launches(rec)
    assert first["max_seq_len"] == second["max_seq_len"] == 1024
    assert second["argv"] == first["argv"] and "40" in second["argv"]
    run = run_dir(qlw_home, run_id)
    snap = run / "recipe.toml"
    assert snap.read_bytes() == original and stat.S_IMODE(snap.stat().st_mode) == 0o600
    info = json.loads((run / "run.json").read_text())
    assert info["recipe_sha256"] == hashlib.sha256(original).hexdigest()
    assert read_state(qlw_home, run_id)["attempt"] == 2

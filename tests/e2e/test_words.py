"""The words `qlora-watch ls` prints for a real run (the rest of the wording: tests/tui/test_words.py)."""

from __future__ import annotations

from pathlib import Path

from tests.support import fake_recipe, qlw


def test_ls_shows_the_rung_and_the_last_checkpoint(qlw_home: Path, tmp_path: Path) -> None:
    recipe = fake_recipe(tmp_path, ["--steps", "12", "--step-time", "0.01", "--save-every", "5",
                                    "--oom-at", "7", "--oom-above-seq", "800"])
    run_id = qlw("start", str(recipe), "--detach", check=True).stdout.strip().splitlines()[-1]
    assert qlw("wait", run_id, "--timeout", "60").returncode == 0
    out = qlw("ls", check=True).stdout.splitlines()
    assert "RUNG" in out[0] and "CHECKPOINT" in out[0]
    row = next(line for line in out if line.startswith(run_id))
    assert "rung 1" in row and "checkpoint-10" in row

"""The README's main job for real: the tiny recipe under the supervisor, on the real stack."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from supervisor.checkpoints.folders import checkpoint_status
from tests.support import ROOT, jsonl, qlw, read_state

pytestmark = pytest.mark.slow


@pytest.mark.timeout(400)
def test_tiny_recipe_completes_under_the_supervisor(qlw_home: Path, tmp_path: Path) -> None:
    out = tmp_path / "tiny-out"
    res = qlw("start", "recipes/tiny.toml", "--detach", "--set", f'train.output_dir="{out}"',
              "--set", "train.max_steps=60", "--set", "train.save_steps=20", check=True)
    run_id = res.stdout.strip().splitlines()[-1]
    assert qlw("wait", run_id, "--timeout", "360").returncode == 0, qlw("logs", run_id).stdout
    st = read_state(qlw_home, run_id)
    assert st["state"] == "completed" and st["step"] == 60
    events = jsonl(qlw_home / "runs" / run_id / "attempts" / "1" / "events.jsonl")
    losses = [e["loss"] for e in events if e["event"] == "step" and e.get("loss") is not None]
    assert losses[-1] < 0.7 * losses[0], losses  # the loss visibly falls
    assert any(e["event"] == "checkpoint" for e in events)
    assert any(e["event"] == "finished" for e in events)
    assert (out / "adapter" / "adapter_config.json").exists()
    ckpts = sorted(out.glob("checkpoint-*"))
    assert ckpts and all(checkpoint_status(c).complete for c in ckpts)
    db = sqlite3.connect(qlw_home / "runs" / run_id / "db.sqlite")
    assert db.execute("SELECT COUNT(*) FROM steps").fetchone()[0] >= 25


@pytest.mark.timeout(600)
def test_real_trainer_oom_walks_down_the_ladder(qlw_home: Path, tmp_path: Path) -> None:
    """A real torch.OutOfMemoryError (test knob) at seq 1024; rung 1 (768) resumes and completes."""
    out = tmp_path / "tiny-oom"
    res = qlw("start", "recipes/tiny.toml", "--detach", "--set", f'train.output_dir="{out}"',
              "--set", "train.max_steps=30", "--set", "train.save_steps=10",
              "--set", "debug.raise_oom_above_seq_len=800", check=True)
    run_id = res.stdout.strip().splitlines()[-1]
    assert qlw("wait", run_id, "--timeout", "500").returncode == 0, qlw("logs", run_id).stdout
    st = read_state(qlw_home, run_id)
    assert st["state"] == "completed" and st["attempt"] == 2 and st["rung"] == 1
    assert st["resume_from"].endswith("checkpoint-20")
    recipe2 = json.loads((qlw_home / "runs" / run_id / "attempts" / "2" / "recipe.json").read_text())
    assert recipe2["train"]["max_seq_len"] == 768
    exit1 = json.loads((qlw_home / "runs" / run_id / "attempts" / "1" / "exit.json").read_text())
    assert exit1["returncode"] == 1
    assert any("torch.OutOfMemoryError" in line for line in exit1["tail"])


def test_readme_quick_start_commands_are_the_tested_ones() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "qlora-watch start recipes/tiny.toml && qlora-watch wait" in readme
    assert "python -m pytest -q" in readme and "python -m pytest -q" in ci
    assert "pip install torch==2.13.0" in readme and "torch==2.13.0" in ci

"""attn_implementation = "varlen": the real tiny trainer runs padding-free (the per-sample SDPA loop on CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT as REPO


@pytest.mark.slow
def test_tiny_trainer_runs_padding_free_on_varlen(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "QLW_TINY_CACHE": str(tmp_path / "cache")}
    res = subprocess.run(
        [sys.executable, "-m", "supervisor.runner.train", "--recipe", str(REPO / "recipes" / "tiny.toml"),
         "--set", "model.attn_implementation=varlen", "--set", "train.max_steps=2",
         "--output-dir", str(tmp_path / "out"), "--events", str(events)],
        env=env, capture_output=True, text=True, timeout=240, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    evs = [json.loads(x) for x in events.read_text().splitlines()]
    notices = [e["message"] for e in evs if e.get("event") == "notice"]
    assert "attention varlen: padding-free batches, kernel sdpa-loop (no CUDA)" in notices
    assert any(n.endswith("attention varlen") for n in notices)
    steps = [e for e in evs if e.get("event") == "step"]
    assert len(steps) == 2 and all(isinstance(e.get("loss"), float) for e in steps)
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()

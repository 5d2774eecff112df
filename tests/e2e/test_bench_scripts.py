"""The GPU bench scripts run on machines with GPUs only; what can be checked here is checked:
the phase names (a typo spent device time once), the article port on the tiny model, and the
telemetry-truth pairing against an nvidia-smi CSV."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT


def test_unknown_phase_is_refused_before_any_work(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_suite.py"), "--out", str(tmp_path),
                        "--phases", "env,fsdpresum"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "unknown phases ['fsdpresum']" in p.stderr
    assert not (tmp_path / "gpu_results.json").exists()


@pytest.mark.timeout(240)
def test_article_port_trains_the_tiny_model(tmp_path: Path) -> None:
    """bench/article_port.py is the article's script: it must still run on current APIs."""
    from supervisor.recipe import load_recipe
    from supervisor.runner.tiny import build_tiny

    tiny = load_recipe(ROOT / "recipes" / "tiny.toml")
    model, _ = build_tiny(tiny.model.tiny, tiny.data.path, tmp_path / "cache", tiny.data.format)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": "w1 w2 w3 " * 20}) + "\n" for _ in range(16)))
    events = tmp_path / "ev.jsonl"
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "article_port.py"), "--model", str(model),
                        "--data", str(data), "--out", str(tmp_path / "out"), "--events", str(events),
                        "--seq", "64", "--batch", "2", "--accum", "1", "--r", "4", "--steps", "2"],
                       capture_output=True, text=True, timeout=220, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    steps = [json.loads(x) for x in events.read_text().splitlines() if '"step"' in x]
    assert [s["step"] for s in steps if s["event"] == "step"] == [1, 2]
    assert all(s["tokens"] > 0 for s in steps if s["event"] == "step")


@pytest.mark.slow
def test_calibration_dry_run_on_the_tiny_model(tmp_path: Path) -> None:
    """The GPU script's every path (free runs, a rehearsed card, qlora-watch start, an edge
    group) on the tiny model on the CPU, as before each device call."""
    env = {**os.environ, "QLW_BENCH_WORK": str(tmp_path / "work"),
           "QLORA_WATCH_HOME": str(tmp_path / "home"),
           "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "calibrate_full_depth.py"), "--out",
                        str(tmp_path / "out"), "--plan", "tiny"], capture_output=True, text=True,
                       timeout=600, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = json.loads((tmp_path / "out" / "calibration.json").read_text())["rows"]
    assert [r.get("rc", 0) for r in rows] == [0] * 5
    assert rows[2]["state"] == "completed" and rows[2]["samples"] > 0


def test_peer_speed_refuses_an_unknown_variant(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "peer_speed.py"), "--out", str(tmp_path),
                        "--order", "hf,unsloth_scrip"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "unknown variant(s) ['unsloth_scrip']" in p.stderr


def test_peer_speed_refuses_an_unknown_shape_in_a_plan(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "peer_speed.py"), "--out", str(tmp_path),
                        "--plan", "llama-3.1-8b=hf;qwen-9b=auto"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "unknown shape 'qwen-9b'" in p.stderr


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_peer_speed_rehearses_on_the_tiny_model(tmp_path: Path) -> None:
    """bench/peer_speed.py --tiny with a two-shape plan: the recipe's HF row and the padding-free
    varlen row train to the same losses (Llama and Qwen2 architectures); an Unsloth row is skipped
    with its reason where Unsloth is not installed (it ran on the H200 after this passed)."""
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "peer_speed.py"), "--tiny", "--out",
                        str(tmp_path / "out"), "--work", str(tmp_path / "work"), "--seq", "64",
                        "--batch", "2", "--accum", "1", "--steps", "3",
                        "--plan", "llama-3.1-8b=hf,hf_varlen,unsloth_script;qwen-2.5-14b=hf_varlen"],
                       capture_output=True, text=True, timeout=280, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads((tmp_path / "out" / "peer_results.json").read_text())
    hf, varlen, script, qwen = res["rows"]
    assert hf["rc"] == 0 and hf["backend"] == "hf" and hf["tokens_per_s"] > 0 and len(hf["loss"]) == 3
    assert varlen["rc"] == 0 and varlen["loss"] == pytest.approx(hf["loss"], rel=1e-3)
    assert any("attention varlen: padding-free batches" in n for n in varlen["notices"])
    if "skipped" in script:
        assert script["skipped"] == "unsloth is not installed here"
    assert qwen["shape"] == "qwen-2.5-14b" and qwen["rc"] == 0 and len(qwen["loss"]) == 3
    assert set(res["summary"]) == {"llama-3.1-8b", "qwen-2.5-14b"}
    assert "run shape" in p.stdout

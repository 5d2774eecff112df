"""The GPU bench scripts run on machines with GPUs only; what can be checked here is checked:
the phase names (a typo spent device time once), the article port on the tiny model, and the
telemetry-truth pairing against an nvidia-smi CSV."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_unknown_phase_is_refused_before_any_work(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_suite.py"), "--out", str(tmp_path),
                        "--phases", "env,fsdpresum"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "unknown phases ['fsdpresum']" in p.stderr
    assert not (tmp_path / "gpu_results.json").exists()


def test_telemetry_truth_pairs_our_samples_with_nvidia_smi_lines(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT))
    import bench.gpu_suite as suite

    db = sqlite3.connect(tmp_path / "db.sqlite")
    db.execute("CREATE TABLE samples (t REAL, data TEXT)")
    lines = []
    for i in range(5):
        t = 1_800_000_000.0 + i
        gpus = [{"index": g, "util_pct": 97.0, "mem_used_mib": 7049.0 + g, "temp_c": 55.0,
                 "power_w": 362.4, "sm_clock_mhz": 1845.0, "throttle_mask": 4} for g in (0, 1)]
        db.execute("INSERT INTO samples VALUES (?, ?)", (t, json.dumps({"t": t, "gpus": gpus})))
        stamp = datetime.fromtimestamp(t + 0.03).strftime("%Y/%m/%d %H:%M:%S.%f")[:-3]
        lines += [f"{stamp}, {g}, 97, {7049 + g}, 55, 362.44, 1845, 0x0000000000000004" for g in (0, 1)]
    db.commit()
    (tmp_path / "smi.csv").write_text("garbage line\n" + "\n".join(lines) + "\n")
    suite.telemetry_truth(tmp_path, tmp_path / "smi.csv", key="t")
    r = suite.RESULTS["t"]
    assert r["n"] == r["n_within_0.1s"] == 10 and {p["gpu"] for p in r["pairs"]} == {0, 1}
    assert r["worst_within_0.1s"]["mem_mib"] == 0 and r["worst_within_0.1s"]["throttle_mismatches"] == 0
    assert r["worst_within_0.1s"]["power_w"] == pytest.approx(0.04)


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


def test_calibration_picks_the_edge_batches_from_the_measured_fit() -> None:
    sys.path.insert(0, str(ROOT))
    from bench.calibrate_full_depth import Group, Job, edge_batches, plan_full, resolve_edge

    # session 3's 8B rows: 15,126 / 23,426 / 25,468 MiB at batch 4 / 8 / 9 -> 20 fits 48 GB
    rows = [{"recipe": "8b", "batch": b, "rc": 0, "proc_peak_mib": p, "card_gib": None}
            for b, p in ((4, 15_126), (8, 23_426), (9, 25_468))]
    assert edge_batches(rows, "8b", 49_140) == (20, 21)
    assert edge_batches(rows[:1], "8b", 49_140) is None  # one point is no fit
    g = resolve_edge(Group("free", [Job("x", "8b", 18, steps=1)], 60, edge=("8b", 49_140)), rows)
    assert [(j.name, j.batch, j.steps) for j in g.jobs] == [("8b-b20", 20, 1), ("8b-b21", 21, 1)]
    names = [j.name for grp in plan_full() for j in grp.jobs]
    assert len(names) == len(set(names))


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

"""generate_report on synthetic run stores (tests/support/report_run.py): numbers, plots, edge cases."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest

from supervisor.numbers import ema_debiased as ema
from supervisor.report.data import (
    ReportError,
    load_run,
    recipe_diffs,
    summarize,
    throttle_periods,
)
from supervisor.report.html import generate_report
from supervisor.store import create_run
from tests.support.report_run import build_run

TIMELINE_PNGS = {"loss.png", "optim.png", "throughput.png", "gpu_util.png", "temps.png", "memory.png"}


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The OOM-relaunch + throttling run and its report."""
    root = tmp_path_factory.mktemp("report")
    run = build_run(root / "runs")
    html = generate_report(run, root / "out")
    return {"root": root, "run": run, "html": html, "text": html.read_text()}


def _offline(text: str) -> None:
    """Nothing in the page reaches outside it: no URL, no script, images inline."""
    assert "http://" not in text and "https://" not in text
    assert "<script" not in text.lower() and "<link" not in text.lower()
    for src in re.findall(r"src=['\"]([^'\"]*)", text):
        assert src.startswith("data:image/png;base64,"), src[:60]


def test_full_report(full: dict[str, Any]) -> None:
    html: Path = full["html"]
    text: str = full["text"]
    assert html == full["root"] / "out" / "report.html"
    assert {p.name for p in html.parent.glob("*.png")} == TIMELINE_PNGS
    _offline(text)
    assert text.count("data:image/png;base64,") == len(TIMELINE_PNGS)
    for needle in ("completed", "Time lost to relaunches", "Time throttled", "thermal 20 min",
                   "attempt 2: train.max_seq_len 4096 -&gt; 768", "checkpoint-200", "cuda_oom",
                   "thermally throttled", "relaunching at rung 1", "Tokens trained"):
        assert needle in text, needle
    assert "no GPU telemetry" not in text


def test_summary_numbers(full: dict[str, Any]) -> None:
    run = load_run(full["run"])
    s = summarize(run)
    assert s["state"] == "completed" and s["attempts"] == 2 and s["step"] == 1200
    (r,) = s["relaunches"]
    # exit -> 20 s back-off -> 150 s loading -> one step of ~4.7 s
    assert 170 < r["gap_s"] < 182, r
    assert r["redone_steps"] == 30 and 500 < r["redone_s"] < 600  # steps 201-230 at ~18 s
    assert s["throttle_thermal_s"] == pytest.approx(1200, abs=20) and s["throttle_power_s"] == 0
    assert s["tokens"] == max(st["tokens"] for st in run.steps)
    assert 0.8 < s["final_loss"] < 1.2 and s["nan_losses"] == 0
    assert 20 < s["peak_vram_gib"] < 24 and s["max_hotspot_c"] > 95
    assert recipe_diffs(run.attempts) == ["attempt 2: train.max_seq_len 4096 -> 768"]
    (start, end, kind), = throttle_periods(run.samples)
    assert kind == "thermal" and end - start == pytest.approx(1200, abs=20)


def test_compare(full: dict[str, Any]) -> None:
    other = build_run(full["root"] / "runs", oom=False, throttle=False, seed=3, sample_s=30,
                      max_steps=300, overrides=("train.max_seq_len=768",))
    html = generate_report(full["run"], full["root"] / "cmp", other)
    text = html.read_text()
    _offline(text)
    assert (html.parent / "compare.png").is_file()
    assert full["run"].name in text and other.name in text and "Compared with" in text
    # the same folder without --compare: the stale compare.png goes away
    generate_report(full["run"], full["root"] / "cmp")
    assert not (html.parent / "compare.png").exists()


def test_cpu_run_has_no_gpu_plots(tmp_path: Path) -> None:
    run = build_run(tmp_path / "runs", gpu=False, oom=False, throttle=False, max_steps=40, sample_s=30)
    html = generate_report(run, tmp_path / "out")
    text = html.read_text()
    assert "no GPU telemetry (unavailable: NVML Shared Library Not Found)" in text
    names = {p.name for p in html.parent.glob("*.png")}
    assert "gpu_util.png" not in names and "temps.png" not in names and "memory.png" in names
    _offline(text)


def test_nan_losses(tmp_path: Path) -> None:
    run = build_run(tmp_path / "runs", oom=False, throttle=False, max_steps=60, sample_s=30, nan_at={20, 25})
    s = summarize(load_run(run))
    assert s["nan_losses"] == 2 and s["final_loss"] is not None and math.isfinite(s["final_loss"])
    text = generate_report(run, tmp_path / "out").read_text()
    assert re.search(r"NaN/inf losses</td><td>2<", text)


def test_single_step(tmp_path: Path) -> None:
    run = build_run(tmp_path / "runs", oom=False, throttle=False, max_steps=1, sample_s=30)
    s = summarize(load_run(run))
    assert s["step"] == 1 and s["final_loss"] is not None
    html = generate_report(run, tmp_path / "out")
    assert (html.parent / "loss.png").is_file()


def test_empty_run(tmp_path: Path) -> None:
    store = create_run(tmp_path / "runs", {"recipe": "tiny", "output_dir": str(tmp_path / "o")})
    store.db()
    store.close()
    text = generate_report(store.path, tmp_path / "out").read_text()
    assert "no training steps recorded" in text and "no telemetry samples recorded" in text
    _offline(text)


def test_not_a_run(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="not a qlora-watch run"):
        generate_report(tmp_path, tmp_path / "out")
    assert not (tmp_path / "db.sqlite").exists()


def test_ema_skips_non_finite() -> None:
    out = ema([2.0, float("nan"), None, 2.0, float("inf")])
    assert out == [2.0, 2.0, 2.0, 2.0, 2.0]
    assert ema([float("nan")]) == [None]

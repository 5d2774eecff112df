"""The preflight estimate against the peaks measured on an H200 (docs/benchmarks.md).

Pins the calibrated constants: every measured configuration within 10 % of NVML's peak.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "gpu" / "gpu_results_2026-11-28.json"


def test_every_measured_configuration_within_10_percent(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from bench.fit_estimator import table
    from supervisor.preflight import CALIBRATION

    rows = json.loads(RESULTS.read_text())["estimator"]
    got = table(rows, CALIBRATION, tmp_path)
    assert len(got) >= 6
    for name, measured, est, err in got:
        assert abs(err) <= 10.0, f"{name}: estimate {est:.0f} MiB vs measured {measured:.0f} MiB ({err:+.1f} %)"


@pytest.mark.parametrize("recipe, gib", [("8b", 16.5), ("70b", None)])  # 8b: LoRA dropout 0 since session 3
def test_recipe_estimates_are_stable(recipe: str, gib: float | None) -> None:
    from supervisor.preflight import estimate
    from supervisor.recipe import load_recipe

    rep = estimate(load_recipe(ROOT / f"recipes/{recipe}.toml"), gpu_mem_gib=24).to_dict()
    if gib is not None:
        assert rep["gpu_needed_bytes"] / 2**30 == pytest.approx(gib, abs=0.3)
        assert rep["exit_code"] == 0
    else:
        assert 35 <= rep["weights_gb"] <= 45 and rep["exit_code"] == 3


def test_unsloth_backend_estimate_within_10_percent_of_the_h200_peak() -> None:
    """docs/gpu/session3/peer_results.json: the 8B shape at full depth, recipes/8b.toml on the
    same data; Unsloth's peak is NVML 11,856 MiB (allocated 10,003), HF's 16,366 (13,755)."""
    from supervisor.preflight import estimate
    from supervisor.recipe import load_recipe

    rows = json.loads((ROOT / "docs/gpu/session3/peer_results.json").read_text())["rows"]
    measured = {r["backend"]: r["nvml_peak_mib"] for r in rows if r.get("variant") in ("auto", "hf")}
    need = {b: estimate(load_recipe(ROOT / "recipes/8b.toml", [f"model.backend={b}"]),
                        gpu_mem_gib=141).vram.need / 2**20 for b in ("hf", "unsloth")}
    for backend in ("hf", "unsloth"):
        err = 100 * (need[backend] - measured[backend]) / measured[backend]
        assert abs(err) <= 10.0, f"{backend}: estimate {need[backend]:.0f} MiB vs {measured[backend]:.0f} ({err:+.1f} %)"
    assert need["unsloth"] < 0.75 * need["hf"]

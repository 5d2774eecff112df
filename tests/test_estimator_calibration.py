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


@pytest.mark.parametrize("recipe, gib", [("8b", 17.6), ("70b", None)])
def test_recipe_estimates_are_stable(recipe: str, gib: float | None) -> None:
    from supervisor.preflight import estimate
    from supervisor.recipe import load_recipe

    rep = estimate(load_recipe(ROOT / f"recipes/{recipe}.toml"), gpu_mem_gib=24).to_dict()
    if gib is not None:
        assert rep["gpu_needed_bytes"] / 2**30 == pytest.approx(gib, abs=0.3)
        assert rep["exit_code"] == 0
    else:
        assert 35 <= rep["weights_gb"] <= 45 and rep["exit_code"] == 3

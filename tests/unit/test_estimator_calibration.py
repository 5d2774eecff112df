"""The preflight estimate against the peaks measured on an H200 (docs/benchmarks.md).

Full depth (docs/gpu/session3, 2026-12-02): the shipped 8B and 14B recipes at the 24 GB and
48 GB edges, NVML per-process peaks; every row within 5 % and inside the "tight" band.
Reduced depth (docs/gpu/gpu_results_2026-11-28.json, the earlier table): within 10 %.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.support import ROOT

RESULTS = ROOT / "docs" / "gpu" / "gpu_results_2026-11-28.json"
sys.path.insert(0, str(ROOT))

from bench.fit_estimator import MEASURED_WITH, full_depth_rows, full_depth_table  # noqa: E402

MIB = 2**20


def test_every_full_depth_row_within_5_percent_and_the_tight_band(tmp_path: Path) -> None:
    from supervisor.preflight.memory import CALIBRATION

    got = full_depth_table(full_depth_rows(), CALIBRATION, tmp_path)
    names = {n for n, *_ in got}
    # both shapes, both edges (the largest batch that fits 24 / 48 GB and one past it)
    assert {"8b-b8", "8b-b9", "8b-b20", "8b-b21", "14b-b4", "14b-b12", "14b-b13",
            "8b-b8x2-24gb-start"} <= names and len(got) == 11
    for name, measured, est, err in got:
        assert abs(err) <= 5.0, f"{name}: estimate {est:.0f} MiB vs measured {measured:.0f} MiB ({err:+.1f} %)"
        assert abs(err) <= 100 * CALIBRATION.estimate_error, f"{name}: {err:+.1f} % is outside the tight band"


def test_every_reduced_depth_configuration_within_10_percent(tmp_path: Path) -> None:
    from bench.fit_estimator import table
    from supervisor.preflight.memory import CALIBRATION

    rows = json.loads(RESULTS.read_text())["estimator"]
    got = table(rows, CALIBRATION, tmp_path)
    assert len(got) >= 6
    for name, measured, est, err in got:
        assert abs(err) <= 10.0, f"{name}: estimate {est:.0f} MiB vs measured {measured:.0f} MiB ({err:+.1f} %)"


def test_the_article_batch_on_24_gb_is_tight_not_refused() -> None:
    """`qlora-watch preflight recipes/8b.toml` as a user runs it (no config.json: the built-in
    shape; padded batches assumed) against the process measured on the rehearsed 24 GB card."""
    from supervisor.preflight.check import estimate
    from supervisor.recipe import load_recipe

    measured = {r["name"]: r["proc_peak_mib"] for r in full_depth_rows()}
    r = load_recipe(ROOT / "recipes/8b.toml", ["train.per_device_batch=8", "train.grad_accum=2",
                                                *MEASURED_WITH])
    rep = estimate(r, gpu_mem_gib=24, host_ram_gib=256, disk_free_gib=1000)
    assert "built-in table" in rep.shape.source
    assert rep.verdict == "tight" and rep.exit_code == 0
    assert rep.vram.need / MIB == pytest.approx(measured["8b-b8x2-24gb-start"], rel=0.05)
    assert measured["8b-b8x2-24gb-start"] <= 24_564  # and it did fit the card


def test_the_shipped_batch_4_x_4_within_5_percent() -> None:
    from supervisor.preflight.check import estimate
    from supervisor.recipe import load_recipe

    rep = estimate(load_recipe(ROOT / "recipes/8b.toml", MEASURED_WITH), gpu_mem_gib=24,
                   host_ram_gib=256, disk_free_gib=1000)
    assert rep.verdict == "fits"
    # issue 16's full-depth measurement of 4 x 4 (15,850 MiB per process), and this session's
    # 4 x 1 (15,126 MiB) plus the LoRA gradients that grad_accum 4 keeps alive (+320 MiB, the
    # 8 x 1 -> 8 x 2 step measured here)
    for measured in (15_850, 15_126 + 320):
        assert rep.vram.need / MIB == pytest.approx(measured, rel=0.05)


def test_built_in_shape_and_config_json_agree(tmp_path: Path) -> None:
    """The same full-depth shape from the built-in table and from a config.json: one answer."""
    from bench.fit_estimator import config_dir
    from supervisor.preflight.check import estimate
    from supervisor.recipe import load_recipe

    for recipe, shape, layers in (("8b", "llama-3.1-8b", 32), ("14b", "qwen-2.5-14b", 48)):
        built_in = load_recipe(ROOT / f"recipes/{recipe}.toml")
        local = load_recipe(ROOT / f"recipes/{recipe}.toml",
                            [f"model.name={config_dir(tmp_path, shape, layers)}"])
        a = estimate(built_in, gpu_mem_gib=24, host_ram_gib=256, disk_free_gib=1000)
        b = estimate(local, gpu_mem_gib=24, host_ram_gib=256, disk_free_gib=1000)
        assert "config.json" in b.shape.source and a.vram.need == pytest.approx(b.vram.need, rel=1e-6)


# The recipes as shipped (LoRA dropout 0 since session 3; with 0.05, as measured, 14B 4 x 4 was
# tight on 24 GB at 24.1 GiB: 23,538 MiB at 4 x 1 + 433 MiB of gradients at accum 4)
@pytest.mark.parametrize("recipe, gib, verdict", [("8b", 14.53, "fits"), ("14b", 22.89, "fits"),
                                                  ("70b", None, "does not fit")])
def test_recipe_estimates_are_stable(recipe: str, gib: float | None, verdict: str) -> None:
    from supervisor.preflight.check import estimate
    from supervisor.recipe import load_recipe

    rep = estimate(load_recipe(ROOT / f"recipes/{recipe}.toml"), gpu_mem_gib=24, host_ram_gib=256,
                   disk_free_gib=1000).to_dict()
    assert rep["verdict"] == verdict
    if gib is not None:
        assert rep["gpu_needed_bytes"] / 2**30 == pytest.approx(gib, abs=0.1)
        assert rep["exit_code"] == 0
    else:
        assert 35 <= rep["weights_gb"] <= 45 and rep["exit_code"] == 3


def test_recipes_catalog_names_the_card_with_the_same_tight_band() -> None:
    from supervisor.catalog import smallest_card

    mib = 2**20
    assert smallest_card(15_923 * mib, 0.03) == "24 GiB card (tight on 16)"  # 8B as shipped
    assert smallest_card(24_677 * mib, 0.03) == "48 GiB card (tight on 24)"  # 14B as shipped
    assert smallest_card(20_000 * mib, 0.03) == "24 GiB card"
    assert smallest_card(143_000 * mib, 0.03) == "140 GiB card, tight"


def test_unsloth_backend_estimate_within_10_percent_of_the_h200_peak() -> None:
    """docs/gpu/session3/peer_results.json: the 8B shape at full depth, recipes/8b.toml on the
    same data; Unsloth's peak is NVML 11,856 MiB (allocated 10,003), HF's 16,366 (13,755)."""
    from supervisor.preflight.check import estimate
    from supervisor.recipe import load_recipe

    rows = json.loads((ROOT / "docs/gpu/session3/peer_results.json").read_text())["rows"]
    measured = {r["backend"]: r["nvml_peak_mib"] for r in rows if r.get("variant") in ("auto", "hf")}
    need = {b: estimate(load_recipe(ROOT / "recipes/8b.toml", [f"model.backend={b}"]),
                        gpu_mem_gib=141).vram.need / 2**20 for b in ("hf", "unsloth")}
    for backend in ("hf", "unsloth"):
        err = 100 * (need[backend] - measured[backend]) / measured[backend]
        assert abs(err) <= 10.0, f"{backend}: estimate {need[backend]:.0f} MiB vs {measured[backend]:.0f} ({err:+.1f} %)"
    assert need["unsloth"] < 0.75 * need["hf"]

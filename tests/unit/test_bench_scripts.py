"""The bench scripts' pure parts: telemetry-truth pairing, the calibration's choice of edge batches.
(The scripts run as processes: tests/e2e/test_bench_scripts.py.)"""

from __future__ import annotations

import json
import sqlite3
import sys
from datetime import datetime
from pathlib import Path

import pytest

from tests.support import ROOT


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

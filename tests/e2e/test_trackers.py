"""train.report_to: W&B (offline) and MLflow (a local file store) get ONE tracker run per qlora-watch
run, across an OOM relaunch, with the supervisor's telemetry in the same run."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.support import fake_recipe, qlw, read_state

pytest.importorskip("wandb")
pytest.importorskip("mlflow")


def tracker_env(tmp_path: Path) -> dict[str, str]:
    """Offline W&B whose caches stay in tmp_path; MLflow on its default (the run's file store)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MLFLOW_"))}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_CACHE_DIR=str(tmp_path / "wcache"),
               WANDB_CONFIG_DIR=str(tmp_path / "wconfig"), WANDB_DATA_DIR=str(tmp_path / "wdata"))
    return env


def wandb_records(path: Path) -> list[Any]:
    """The records of a .wandb file: a ':W&B' header, then LevelDB-log framed protobufs."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a record header is padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # FULL, LAST
            rec = pb.Record()
            rec.ParseFromString(buf + chunk if kind == 4 else chunk)
            out.append(rec)
        buf = chunk if kind == 2 else buf + chunk if kind == 3 else b""
    return out


def wandb_history(run_dir: Path) -> list[dict[str, Any]]:
    [file] = run_dir.glob("run-*.wandb")
    return [{(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
            for r in wandb_records(file) if r.WhichOneof("record_type") == "history"]


def mlflow_metric(run_dir: Path, key: str) -> list[tuple[float, int]]:
    """(value, step) of one metric in a file-store run folder."""
    lines = (run_dir / "metrics" / key).read_text().split("\n")
    return [(float(v), int(s)) for _, v, s in (x.split() for x in lines if x.strip())]


def check_one_run_each(out: Path, run_id: str, oom_step: int, resumed_from: int, last: int,
                       telemetry: bool = True) -> None:
    """Both attempts' steps, and the supervisor's telemetry, in one W&B and one MLflow run."""
    runs = sorted((out / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 1, runs  # one W&B run directory for both attempts
    hist = wandb_history(runs[0])
    steps = [h for h in hist if "train/loss" in h]
    first = [h["train/global_step"] for h in steps if h["qlw/attempt"] == 1]
    second = [h["train/global_step"] for h in steps if h["qlw/attempt"] == 2]
    assert first and max(first) < oom_step and second
    assert min(second) > resumed_from and max(second) == last  # resumed, not restarted
    assert any("events/relaunch" in h for h in hist)
    if telemetry:
        assert any("host/mem_available_gib" in h for h in hist)  # the supervisor's telemetry
    [exp] = [d for d in (out / "mlruns").iterdir() if d.is_dir() and d.name != "0" and d.name != ".trash"]
    [mrun] = [d for d in exp.iterdir() if d.is_dir()]  # one MLflow run for both attempts
    attempts = {int(v) for v, _ in mlflow_metric(mrun, "qlw/attempt")}
    assert attempts == {1, 2}
    loss_steps = [s for _, s in mlflow_metric(mrun, "train/loss")]
    assert max(loss_steps) == last and min(loss_steps) <= resumed_from
    if telemetry:
        assert mlflow_metric(mrun, "host/mem_available_gib")
    ids = json.loads((out.parent / "home" / "runs" / run_id / "trackers.json").read_text())
    assert ids == {"mlflow_run_id": mrun.name}  # a restarted supervisor continues this run


@pytest.mark.timeout(180)
def test_one_tracker_run_across_an_oom_relaunch(qlw_home: Path, tmp_path: Path) -> None:
    """The scripted trainer: OOM at step 15, rung 1 resumes from checkpoint-10, done at 30."""
    recipe = fake_recipe(tmp_path, ["--steps", "30", "--step-time", "0.03", "--save-every", "10",
                                    "--oom-at", "15", "--oom-above-seq", "800"])
    text = recipe.read_text().replace("save_total_limit = 3",
                                      'save_total_limit = 3\nreport_to = ["wandb", "mlflow", "tensorboard"]')
    recipe.write_text(text)
    env = {**tracker_env(tmp_path), "QLORA_WATCH_HOME": str(qlw_home)}
    run_id = qlw("start", str(recipe), "--detach", env=env, check=True).stdout.strip().splitlines()[-1]
    assert qlw("wait", run_id, "--timeout", "150", env=env).returncode == 0
    st = read_state(qlw_home, run_id)
    assert st["attempt"] == 2 and st["state"] == "completed"
    check_one_run_each(tmp_path / "out", run_id, oom_step=15, resumed_from=10, last=30)
    log = (qlw_home / "runs" / run_id / "supervisor.log").read_text()
    assert "tracker disabled" not in log


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_tiny_recipe_one_tracker_run_across_an_oom_relaunch(qlw_home: Path, tmp_path: Path) -> None:
    """The real trainer on the tiny model: debug.raise_oom_above_seq_len fails at step 20 with
    max_seq_len 1024; rung 1 (768) resumes from checkpoint-20 and finishes at 30."""
    out = tmp_path / "out"
    env = {**tracker_env(tmp_path), "QLORA_WATCH_HOME": str(qlw_home)}
    res = qlw("start", "recipes/tiny.toml", "--detach", "--set", f'train.output_dir="{out}"',
              "--set", "train.max_steps=30", "--set", "train.save_steps=10",
              "--set", "debug.raise_oom_above_seq_len=800",
              "--set", 'train.report_to=["wandb", "mlflow"]', env=env, check=True)
    run_id = res.stdout.strip().splitlines()[-1]
    assert qlw("wait", run_id, "--timeout", "540", env=env).returncode == 0, qlw("logs", run_id, env=env).stdout
    assert read_state(qlw_home, run_id)["attempt"] == 2
    check_one_run_each(out, run_id, oom_step=21, resumed_from=20, last=30)
    assert not (out / "tensorboard").exists()  # report_to without tensorboard: none written

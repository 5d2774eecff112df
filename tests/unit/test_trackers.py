"""Trackers in-process: metric names, secrets kept out of the config, the run id for the trainer.
(One tracker run across a relaunch: tests/e2e/test_trackers.py.)"""

from __future__ import annotations

import json
from pathlib import Path

from supervisor.records import Step
from supervisor.sinks import trackers
from tests.support import fake_recipe


def test_step_metrics_use_the_trainer_callbacks_names() -> None:
    m = trackers.step_metrics(Step(t=1.0, step=7, attempt=2, loss=0.5, lr=1e-4, grad_norm=float("nan")))
    assert m == {"train/global_step": 7.0, "qlw/attempt": 2.0, "train/loss": 0.5,
                 "train/learning_rate": 1e-4}  # NaN grad norm left out, not logged


def test_the_tracker_config_keeps_secrets_out(tmp_path: Path) -> None:
    from supervisor.recipe import load_recipe

    recipe = fake_recipe(tmp_path, ["--token", "hf_abcdefghijklmnopqrstuvwxyz0123"],
                         extra='[notify]\nurls = ["ntfy://secret-topic-xyz"]\n')
    cfg = json.dumps(trackers.tracker_config(load_recipe(recipe)))
    assert "secret-topic-xyz" not in cfg and "hf_abcdefghijklmnopqrstuvwxyz0123" not in cfg
    assert '"urls": 1' in cfg


def test_trainer_env_maps_the_run_id(tmp_path: Path) -> None:
    assert trackers.trainer_env(["tensorboard"], "amber", tmp_path) == {}
    env = trackers.trainer_env(["wandb", "mlflow"], "amber", tmp_path)
    assert env == {"WANDB_RUN_ID": "amber", "WANDB_RESUME": "allow"}  # no MLflow run yet
    (tmp_path / trackers.IDS_FILE).write_text('{"mlflow_run_id": "abc"}')
    assert trackers.trainer_env(["mlflow"], "amber", tmp_path) == {"MLFLOW_RUN_ID": "abc"}

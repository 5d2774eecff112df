"""The trainer's launch command (argv lists) in-process; `start --auto-fit` and the CLI: tests/e2e/test_launch_cmd.py."""

from __future__ import annotations

import sys

from supervisor.procgroup import trainer_argv
from supervisor.recipe import load_recipe
from tests.support import ROOT


def test_one_gpu_runs_the_built_in_trainer() -> None:
    assert trainer_argv(load_recipe(RECIPE))[1:] == ["-m", "supervisor.runner.train"]


def test_two_gpus_use_accelerate_fsdp_and_accelerate_accepts_the_command() -> None:
    from accelerate.commands.launch import launch_command_parser

    argv = trainer_argv(load_recipe(RECIPE, ["hardware.gpus=2"]))
    assert argv[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    args = launch_command_parser().parse_args(argv[3:])
    assert args.num_processes == 2 and args.use_fsdp and args.module
    assert args.training_script == "supervisor.runner.train"
    assert args.fsdp_sharding_strategy == "FULL_SHARD" and args.fsdp_offload_params == "true"
    assert args.fsdp_use_orig_params == "false"  # QLoRA: NF4 and LoRA in one flat parameter


def test_user_command_is_an_argv_list_passed_as_is() -> None:
    r = load_recipe(RECIPE, ['trainer.command=["python3", "my_train.py", "$(touch /tmp/x)"]'])
    assert trainer_argv(r) == ["python3", "my_train.py", "$(touch /tmp/x)"]


RECIPE = ROOT / "recipes" / "70b.toml"

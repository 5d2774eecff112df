"""Slurm runs in-process: the batch script (requeue, USR1), the multi-node trainer command, node
lists. (Against a real single-node Slurm: tests/e2e/test_slurm.py.)"""

from __future__ import annotations

import sys
from pathlib import Path

from supervisor.slurm import commands as slurm
from supervisor.slurm.node import node_argv
from supervisor.slurm.script import SubmitOptions, render
from tests.support import ROOT

TINY = str(ROOT / "recipes" / "tiny.toml")


def test_script_runs_the_supervisor_in_the_batch_step_with_requeue_and_usr1(tmp_path: Path) -> None:
    from supervisor.recipe import load_recipe

    recipe = load_recipe(TINY, ["supervisor.stop_grace_s=30"])
    text = render(run_id="amber-fox", run_dir=tmp_path / "h" / "runs" / "amber-fox", home=tmp_path / "h",
                  cwd="/work dir", recipe=recipe,
                  opts=SubmitOptions(partition="gpu", gpus=2, time="1:00:00",
                                     sbatch_args=["--account=proj"]))
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash"
    for d in ("--requeue", "--signal=B:USR1@90", "--partition=gpu", "--time=1:00:00",
              "--gpus-per-node=2", "--account=proj", "--open-mode=append", "--nodes=1",
              f"--output={tmp_path}/h/runs/amber-fox/slurm-%j.out"):
        assert f"#SBATCH {d}" in lines, d
    assert f"export QLORA_WATCH_HOME={tmp_path}/h" in lines
    assert "cd '/work dir' || exit 1" in lines  # shell-quoted
    assert lines[-1] == f"exec {sys.executable} -m supervisor _slurm_job {tmp_path}/h/runs/amber-fox"


def test_multinode_trainer_is_srun_then_accelerate_with_each_nodes_rank() -> None:
    from supervisor.procgroup import trainer_argv
    from supervisor.recipe import load_recipe

    argv = trainer_argv(load_recipe(TINY, ["hardware.nodes=2", "hardware.gpus=4"]))
    assert argv[:4] == ["srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    inner = argv[argv.index("--") + 1:]
    assert inner[inner.index("--num_processes") + 1] == "8"
    assert inner[inner.index("--num_machines") + 1] == "2"
    task = node_argv(inner, {"SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "4242"})
    assert task[3:9] == ["--machine_rank", "1", "--main_process_ip", "gpu07", "--main_process_port", "29742"]
    assert task[-2:] == ["-m", "supervisor.runner.train"]
    one = trainer_argv(load_recipe(TINY, []))
    assert one[0] != "srun"  # one node: as before


def test_first_node_of_a_slurm_node_list() -> None:
    assert slurm.first_node("gpu[01-03,7],cpu1") == "gpu01"
    assert slurm.first_node("node5,node6") == "node5"
    assert slurm.first_node("a[10-11]-ib") == "a10-ib"
    assert slurm.first_node("") is None and slurm.first_node("(Resources)") is None
    assert slurm.is_local("localhost") and not slurm.is_local("some-other-node")

"""Multi-node training inside a Slurm job (`hardware.nodes > 1`): Slurm's and accelerate's job.

The supervisor runs in the batch step on the job's first node. Its trainer command is
`srun --nodes=N --ntasks-per-node=1 python -m supervisor.slurm.node -- ACCELERATE_ARGV`: one
task per node, each of which execs `accelerate launch` with that node's rank
(SLURM_NODEID), the machine count and the first node of SLURM_JOB_NODELIST as the main
process. srun forwards the supervisor's stop signal to every task; the events and checkpoint
folders are on the shared filesystem. Tested here: the argv (tests/test_slurm.py); not
tested here: a real run over several nodes (this machine is one node, no GPU).
"""

from __future__ import annotations

import os
import sys

from supervisor.slurm.commands import first_node

PORT_BASE = 29500


def srun_argv(recipe: object, one_node: list[str]) -> list[str]:
    """The trainer's argv in a job of hardware.nodes nodes (procgroup.trainer_argv, which
    passes the accelerate argv of one node)."""
    hw = recipe.hardware  # type: ignore[attr-defined]
    return ["srun", f"--nodes={hw.nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
            sys.executable, "-m", "supervisor.slurm.node", "--", *accelerate_argv(recipe, one_node)]


def accelerate_argv(recipe: object, one_node: list[str]) -> list[str]:
    """The single-node FSDP command with every node's processes counted; the per-node flags
    (rank, main process) are added by main() in each task."""
    hw = recipe.hardware  # type: ignore[attr-defined]
    argv = list(one_node)
    total = hw.gpus * hw.nodes
    i = argv.index("--num_processes")
    argv[i + 1] = str(total)
    j = argv.index("--num_machines")
    argv[j + 1] = str(hw.nodes)
    return argv


def node_argv(argv: list[str], env: dict[str, str]) -> list[str]:
    """argv (`python -m accelerate.commands.launch ...`) with this task's --machine_rank,
    --main_process_ip and --main_process_port, right after the launcher's name."""
    if argv[1:3] != ["-m", "accelerate.commands.launch"]:
        return list(argv)
    rank = env.get("SLURM_NODEID") or env.get("SLURM_PROCID") or "0"
    head = first_node(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "") or "127.0.0.1"
    job = env.get("SLURM_JOB_ID") or ""
    port = str(PORT_BASE + int(job) % 1000) if job.isdigit() else str(PORT_BASE)
    return [*argv[:3], "--machine_rank", rank, "--main_process_ip", head,
            "--main_process_port", port, *argv[3:]]


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        print("usage: python -m supervisor.slurm.node -- ACCELERATE_ARGV", file=sys.stderr)
        return 2
    cmd = node_argv(args, dict(os.environ))
    os.execv(cmd[0], cmd)
    return 127  # not reached


if __name__ == "__main__":
    raise SystemExit(main())

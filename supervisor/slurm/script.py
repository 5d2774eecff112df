"""The sbatch script of a Slurm run (`qlora-watch submit`), kept in the run folder as job.sbatch.

The batch step *is* the supervisor: the script `exec`s `python -m supervisor _slurm_job RUN_DIR`,
so the signals Slurm sends the batch shell (`--signal=B:USR1@grace` before the time limit,
SIGTERM on preemption, requeue or scancel) reach the supervisor itself, and the job ends when
the run does. `--requeue`: a preempted or requeued job starts again with the same script,
and `_slurm_job` resumes the same run from its newest complete checkpoint.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

# Seconds between the time-limit warning (USR1) and the kill: the trainer's graceful stop
# (checkpoint) plus room for the supervisor to record PREEMPTED and requeue the job.
GRACE_MARGIN_S = 60


class ScriptError(ValueError):
    pass


@dataclass
class SubmitOptions:
    partition: str | None = None
    gpus: int | None = None  # per node; None: the recipe's hardware.gpus
    time: str | None = None
    sbatch_args: list[str] = field(default_factory=list)
    job_name: str | None = None


def grace_s(stop_grace_s: float) -> int:
    return int(stop_grace_s) + GRACE_MARGIN_S


def _directive(value: str) -> str:
    if any(c in value for c in "\n\r\0"):
        raise ScriptError(f"sbatch option {value!r}: no line breaks")
    return f"#SBATCH {value}"


def render(*, run_id: str, run_dir: Path, home: Path, cwd: str, recipe: object,
           opts: SubmitOptions, python: str | None = None) -> str:
    """The script text. Values are shell-quoted in the body; #SBATCH lines are sbatch's."""
    hw = recipe.hardware  # type: ignore[attr-defined]
    nodes = getattr(hw, "nodes", 1)
    gpus = hw.gpus if opts.gpus is None else opts.gpus
    grace = grace_s(recipe.supervisor.stop_grace_s)  # type: ignore[attr-defined]
    lines = [
        "#!/bin/bash",
        f"# qlora-watch run {run_id} (recipe {recipe.name}): written by `qlora-watch submit`.",  # type: ignore[attr-defined]
        "# The batch step runs the run's supervisor in the foreground (exec); a requeued job",
        "# resumes the same run from its newest complete checkpoint, on whichever node it lands.",
        _directive(f"--job-name={opts.job_name or 'qlw-' + run_id}"),
        _directive(f"--output={run_dir}/slurm-%j.out"),
        _directive("--open-mode=append"),
        _directive("--requeue"),
        _directive(f"--signal=B:USR1@{grace}"),
        _directive(f"--nodes={nodes}"),
        _directive("--ntasks-per-node=1"),
    ]
    if gpus and gpus > 0:
        lines.append(_directive(f"--gpus-per-node={gpus}"))
    if opts.partition:
        lines.append(_directive(f"--partition={opts.partition}"))
    if opts.time:
        lines.append(_directive(f"--time={opts.time}"))
    for a in opts.sbatch_args:
        if not a.startswith("-"):
            raise ScriptError(f"--sbatch-arg {a!r}: expected an sbatch option such as --account=X")
        lines.append(_directive(a))
    q = shlex.quote
    lines += [
        "",
        "# the run store (records, state, sockets' names) on the shared filesystem",
        f"export QLORA_WATCH_HOME={q(str(home))}",
        f"cd {q(cwd)} || exit 1",
        f"exec {q(python or sys.executable)} -m supervisor _slurm_job {q(str(run_dir))}",
        "",
    ]
    return "\n".join(lines)

"""The trainer's environment is the run's: captured at `start`, used for every launch.

Without it, a relaunch after the supervisor was re-adopted (restarted by `status`, `wait` or
`attach` from another shell, cron or a Slurm step) ran the trainer with the environment of
whatever process restarted the supervisor: another CUDA_VISIBLE_DEVICES, no HF_TOKEN, another
PATH. The environment of the `start` (and of each `resume`, which may run on a new node) is
kept in the run folder as `env.json`, 0600 in the 0700 run folder: it holds the user's tokens,
as the trainer's own /proc/PID/environ does, and is never shown (`status`, the events and the
dashboard show no environment). Variables that only describe the starting terminal or the
`start` process itself are left out.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from supervisor.store import atomic_write

FILE = "env.json"
# per-session or per-process values that would be wrong in a later launch
SKIP = frozenset({"_", "OLDPWD", "SHLVL", "SSH_CLIENT", "SSH_CONNECTION", "SSH_TTY", "TERM_SESSION_ID",
                  "WINDOWID", "COLUMNS", "LINES", "PS1", "PS2", "PROMPT_COMMAND"})
# set by the supervisor for each launch
PER_LAUNCH = frozenset({"QLW_RECIPE", "QLW_EVENTS", "QLW_OUTPUT_DIR", "QLW_RESUME", "QLW_ATTEMPT",
                        "QLW_EXTERNAL_PRUNE", "QLW_RUN_ID"})


def capture(run_dir: Path, env: Mapping[str, str] | None = None) -> Path:
    """Write the environment to run_dir/env.json (0600, atomically)."""
    env = os.environ if env is None else env
    keep = {k: v for k, v in env.items() if k not in SKIP and k not in PER_LAUNCH}
    path = run_dir / FILE
    atomic_write(path, json.dumps(keep, sort_keys=True))  # 0600: it may hold secrets
    return path


def load(run_dir: Path) -> dict[str, str] | None:
    """The captured environment; None for a run from before capture (use the process's)."""
    try:
        data = json.loads((run_dir / FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    return {str(k): str(v) for k, v in data.items()}


def for_run(run_dir: Path) -> dict[str, str]:
    """What a launch starts from: the captured environment, else this process's."""
    got = load(run_dir)
    return got if got is not None else dict(os.environ)

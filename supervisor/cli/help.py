"""What each command's --help ends with: an example and the environment variables it reads;
and a parser whose errors never list the hidden (underscore) commands."""

from __future__ import annotations

import argparse
import difflib
from typing import Any

HOME = "QLORA_WATCH_HOME   where runs live (default: ~/.local/state/qlora-watch)"
RUNTIME = "(no variable)      control sockets: /tmp/qlora-watch-$UID/ (with QLORA_WATCH_HOME set: its sock/)"
PREEMPT = ("QLW_ON_SIGTERM     preempt: SIGTERM to the supervisor saves and ends the run PREEMPTED "
           "(the default under Slurm); detach: the trainer goes on. SIGUSR1 always preempts")
SSH = ("QLORA_WATCH_SSH    the ssh client for --ssh (default: ssh on PATH; ~/.ssh/config applies); "
       "QLORA_WATCH_REMOTE_CMD: qlora-watch's path on the remote box (--remote-cmd)")
TRAINER = ("HF_TOKEN, HF_HOME, CUDA_VISIBLE_DEVICES, PYTORCH_CUDA_ALLOC_CONF, WANDB_*, MLFLOW_*: "
           "passed to the trainer")

EXAMPLES: dict[str, tuple[list[str], list[str]]] = {
    # command: (examples, environment variables read)
    "start": (["qlora-watch start tiny", "qlora-watch start recipes/8b.toml --set data.path=train.jsonl",
               "qlora-watch start my-8b.toml --auto-fit --detach"], [HOME, RUNTIME, PREEMPT, TRAINER]),
    "run": (["qlora-watch run --output-dir out -- python train.py",
             "qlora-watch run --output-dir out --set train.max_seq_len=2048 -- python train.py --len {max_seq_len}",
             "qlora-watch run --output-dir out --stop-signal SIGINT -- axolotl train qlora.yml"],
            [HOME, RUNTIME, TRAINER]),
    "resume": (["qlora-watch resume", "qlora-watch resume amber --from checkpoint-200",
                "qlora-watch resume amber --set train.learning_rate=1e-4"], [HOME, RUNTIME, TRAINER]),
    "submit": (["qlora-watch submit 8b --set data.path=train.jsonl --partition gpu --time 24:00:00",
                "qlora-watch submit tiny --gpus 0 --dry-run",
                "qlora-watch submit my-8b.toml --sbatch-arg=--account=proj --sbatch-arg=--qos=low"],
               [HOME + " (on the shared filesystem: the job's node reads it)",
                "SLURM_CONF and the usual SBATCH_* variables: read by sbatch itself"]),
    "preflight": (["qlora-watch preflight 70b --gpu-mem 24"], [HOME]),
    "validate": (["qlora-watch validate my-8b.toml --set train.max_seq_len=768"], []),
    "recipes": (["qlora-watch recipes", "qlora-watch recipes cp 8b my-8b.toml",
                 "qlora-watch recipes schema > recipe.schema.json"], []),
    "doctor": (["qlora-watch doctor", "qlora-watch doctor --json"], [HOME, "HF_TOKEN, HF_HOME, "
               "HF_HUB_CACHE: the Hub token (never printed) and cache"]),
    "ls": (["qlora-watch ls", "qlora-watch ls --json"], [HOME]),
    "status": (["qlora-watch status", "qlora-watch status amber --json"], [HOME, RUNTIME]),
    "logs": (["qlora-watch logs -f", "qlora-watch logs amber -n 200"], [HOME]),
    "stop": (["qlora-watch stop", "qlora-watch stop amber --now"], [HOME, RUNTIME]),
    "wait": (["qlora-watch wait --timeout 3600 && echo done"], [HOME, RUNTIME]),
    "attach": (["qlora-watch attach", "qlora-watch attach --ssh me@gpu-box amber"], [HOME, RUNTIME, SSH]),
    "serve": (["qlora-watch serve --port 8566   # then ssh -L 8566:127.0.0.1:8566 gpu-box"],
              [HOME, RUNTIME]),
    "report": (["qlora-watch report", "qlora-watch report amber --compare falcon --out /tmp/r"], [HOME]),
    "rm": (["qlora-watch rm amber", "qlora-watch rm amber --checkpoints --yes"], [HOME]),
    "cache": (["qlora-watch cache ls", "qlora-watch cache rm 3e2c7c42 --yes", "qlora-watch cache rm --all"],
              [HOME]),
    "merge": (["qlora-watch merge amber --out merged/", "qlora-watch merge runs/x --checkpoint 200 --out m/"],
              [HOME, "HF_TOKEN, HF_HOME: to fetch the base model"]),
    "completion": (["qlora-watch completion bash > ~/.local/share/bash-completion/completions/qlora-watch",
                    "qlora-watch completion fish > ~/.config/fish/completions/qlora-watch.fish"], []),
}


def epilog(name: str) -> str | None:
    """'examples:' and 'environment:' blocks for `name`'s --help (None if it has none)."""
    if name not in EXAMPLES:
        return None
    examples, env = EXAMPLES[name]
    out = "examples:\n" + "\n".join(f"  {e}" for e in examples)
    out += "\n\nenvironment:\n" + ("\n".join(f"  {v}" for v in env) if env else "  (none)")
    return out


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose "unknown command" error lists only the public commands."""

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        if isinstance(action, argparse._SubParsersAction) and value not in (action.choices or {}):
            public = [c for c in action.choices or {} if not str(c).startswith("_")]
            close = difflib.get_close_matches(str(value), public, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise argparse.ArgumentError(
                action, f"unknown command {value!r}{hint}; commands: {', '.join(public)}")
        super()._check_value(action, value)

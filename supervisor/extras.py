"""Optional parts of the install: which extra brings which modules, and a one-line refusal
when a command needs one that is missing (the base install only watches runs)."""

from __future__ import annotations

import importlib.util
from typing import Any

EXTRAS: dict[str, tuple[str, ...]] = {
    "train": ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets",
              "tokenizers"),
    "gpu": ("liger_kernel",),
    "report": ("matplotlib",),
    "notify": ("apprise",),
    "wandb": ("wandb",),
    "mlflow": ("mlflow",),
    "trackio": ("trackio",),
}


class MissingExtra(Exception):
    """A command needs an extra that is not installed; the message says which (exit 2)."""


def installed(module: str) -> bool:
    """Whether `module` can be imported, without importing it (find_spec reads no torch)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken parent package, or a module with no spec
        return False


def missing(extra: str) -> list[str]:
    """The modules of `extra` that are not installed."""
    return [m for m in EXTRAS[extra] if not installed(m)]


def install_hint(extra: str) -> str:
    return f"pip install 'qlora-watch[{extra}]' (in a checkout: pip install -e '.[{extra}]')"


def require(extra: str, what: str) -> None:
    """Raise MissingExtra naming the extra when any of its modules is missing."""
    gone = missing(extra)
    if gone:
        raise MissingExtra(f"{what} needs {', '.join(gone)}, which the base install leaves out: "
                           f"{install_hint(extra)}")


def require_for_run(recipe: Any) -> None:
    """What starting `recipe` needs: the trainer stack for the built-in trainer (a script of
    your own brings its own), apprise for [notify] urls, each tracker in train.report_to."""
    if recipe.trainer.command is None:
        require("train", "start (the built-in trainer)")
    if recipe.notify.urls:
        require("notify", "[notify] urls")
    for tracker in sorted(set(recipe.train.report_to) - {"tensorboard"}):  # tensorboard: [train]
        require(tracker, f'train.report_to "{tracker}"')

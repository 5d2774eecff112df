"""Checkpoints and progress of a command that sends qlora-watch no events (`qlora-watch run`).

Its saves are found by scanning the output folder: a complete `checkpoint-N` (the rule in
docs/trainer-protocol.md) made since the run claimed the folder is marked as the run's, and
so becomes resumable and prunable. With neither our callback nor HF log lines to read, the
steps come from that checkpoint's `trainer_state.json` `log_history`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from supervisor.checkpoints import folders as checkpoints
from supervisor.checkpoints.folders import CheckpointInfo

ADAPTER_NAMES = (checkpoints.ADAPTER_FILE, checkpoints.ADAPTER_BIN)


def discover(output_dir: Path, run_id: str) -> tuple[list[CheckpointInfo], list[CheckpointInfo]]:
    """(checkpoints newly marked as the run's, checkpoints with no adapter weights file)."""
    adopted = set(checkpoints.adopt_checkpoints(output_dir, run_id, cached=True))
    infos = checkpoints.scan(output_dir, cached=True)
    new = [i for i in infos if i.name in adopted and i.complete]
    no_adapter = [i for i in infos if not i.complete and (i.reason or "").endswith(f"{ADAPTER_NAMES[0]} missing")]
    return new, no_adapter


def no_adapter_message(info: CheckpointInfo) -> str:
    return (f"{info.name} has no adapter file ({' or '.join(ADAPTER_NAMES)}): qlora-watch counts "
            "only checkpoints with LoRA adapter weights as complete, so it will neither resume "
            "from nor prune these (a full fine-tune's checkpoints are left to the trainer); "
            "see docs/trainer-protocol.md")


def history_steps(ckpt: Path | None, after: int) -> list[dict[str, Any]]:
    """Step records ({"event": "step", ...}) from a checkpoint's log_history, steps > after."""
    if ckpt is None:
        return []
    try:
        state = json.loads((Path(ckpt) / checkpoints.STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    hist = state.get("log_history") if isinstance(state, dict) else None
    out: list[dict[str, Any]] = []
    now = time.time()
    for e in hist if isinstance(hist, list) else []:
        if not isinstance(e, dict) or "loss" not in e or not isinstance(e.get("step"), int):
            continue
        if e["step"] <= after:
            continue
        out.append({"event": "step", "t": now, "step": e["step"], "max_steps": state.get("max_steps"),
                    "loss": e.get("loss"), "grad_norm": e.get("grad_norm"), "lr": e.get("learning_rate"),
                    "epoch": e.get("epoch"), "tokens": e.get("num_input_tokens_seen")})
    return out

"""`effective_settings()`: this attempt's settings for any training script (stdlib only).

    from supervisor.runner.settings import effective_settings
    s = effective_settings()          # {} values are None where qlora-watch set nothing
    max_len = s["max_seq_len"] or 2048

qlora-watch sets them per attempt (the OOM ladder lowers them); docs/trainer-protocol.md.
Reading them also tells the supervisor that this trainer follows the ladder.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

INTS = ("max_seq_len", "lora_r", "lora_alpha", "per_device_batch", "grad_accum")
_ANNOUNCED = {"done": False}


def _int(v: str | None) -> int | None:
    try:
        return int(v) if v not in (None, "") else None
    except ValueError:
        return None


def effective_settings(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """max_seq_len, lora_r, lora_alpha, target_modules, per_device_batch, grad_accum (None when
    not set), resume_from (a checkpoint folder or None), attempt, rung (0: as written), output_dir."""
    env = os.environ if environ is None else environ
    out: dict[str, Any] = {k: _int(env.get(f"QLW_{k.upper()}")) for k in INTS}
    tm = env.get("QLW_TARGET_MODULES") or None
    out["target_modules"] = tm if tm in (None, "all-linear") else tm.split(",")
    out["resume_from"] = env.get("QLW_RESUME_FROM") or env.get("QLW_RESUME") or None
    out["attempt"] = _int(env.get("QLW_ATTEMPT")) or 1
    out["rung"] = _int(env.get("QLW_RUNG")) or 0
    out["output_dir"] = env.get("QLW_OUTPUT_DIR") or None
    if environ is None:
        _announce(env.get("QLW_EVENTS"))
    return out


def _announce(path: str | None) -> None:
    """One `settings` event: the supervisor learns that the ladder reaches this trainer."""
    if not path or _ANNOUNCED["done"] or os.environ.get("RANK", "0") not in ("", "0"):
        return
    _ANNOUNCED["done"] = True
    line = json.dumps({"t": round(time.time(), 3), "event": "settings", "read": True}) + "\n"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
    except OSError:
        pass  # a full disk must not stop training


def pin_one_gpu(recipe: Any, env: Any = os.environ) -> str | None:
    """hardware.gpus = 1 on a machine with several GPUs: make one visible, before torch looks.
    transformers' Trainer refuses a single process that sees several GPUs (it would need
    nn.DataParallel): found on a 2 x H200 host. CUDA_VISIBLE_DEVICES set by the user wins."""
    if recipe.hardware.gpus != 1 or "CUDA_VISIBLE_DEVICES" in env or "LOCAL_RANK" in env:
        return None
    env["CUDA_VISIBLE_DEVICES"] = "0"
    return "0"

"""The exit classifier reads the whole tail the wrapper keeps, not only its last lines."""

from __future__ import annotations

from supervisor.guards.classify import CUDA_OOM, KEEP_LINES, classify_exit
from supervisor.wrapper import TAIL_LINES


def _deep_oom(frames: int) -> list[str]:
    """A gradient-checkpointing traceback `frames` frames deep, then noise after the exception."""
    lines = ["step 20", "Traceback (most recent call last):"]
    for i in range(frames):
        lines += [f'  File "/venv/lib/python3.11/site-packages/torch/utils/checkpoint.py", line {i}, in f{i}',
                  "    return fn(*args)"]
    lines.append("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
    lines += ["wandb: Waiting for W&B process to finish... (failed 1).", "wandb: Synced 5 W&B file(s)"]
    return lines


def test_a_deep_traceback_followed_by_noise_is_still_the_cudas_oom() -> None:
    tail = _deep_oom(90)  # 185 lines: the header is far above the last 50
    assert 50 < len(tail) <= TAIL_LINES
    cls = classify_exit(returncode=1, signal=None, stderr_tail=tail)
    assert cls.kind == CUDA_OOM and cls.exception == "torch.OutOfMemoryError"
    assert len(cls.stderr_tail) == KEEP_LINES  # what a FAILED message may quote stays short

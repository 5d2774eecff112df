"""Regressions found on the real GPU (docs/benchmarks.md), replayed on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

from supervisor.guards.classify import classify_exit

DATA = Path(__file__).parent / "data"


def test_real_h200_oom_tail_without_traceback_header_is_cuda_oom() -> None:
    """The wrapper's tail ended inside a 150-line traceback: only the exception line survived."""
    rec = json.loads((DATA / "h200_oom_tail.json").read_text())
    assert not any("Traceback" in line for line in rec["tail"])
    cls = classify_exit(returncode=rec["returncode"], signal=None, stderr_tail=rec["tail"])
    assert cls.kind == "cuda_oom", cls


def test_exception_line_alone_with_exit_0_is_not_an_oom() -> None:
    tail = ["torch.OutOfMemoryError: CUDA out of memory. (printed as data)"]
    assert classify_exit(returncode=0, signal=None, stderr_tail=tail).kind == "completed"


def test_other_exception_line_alone_is_a_crash() -> None:
    tail = ["    x = f()", "RuntimeError: something else"]
    assert classify_exit(returncode=1, signal=None, stderr_tail=tail).kind == "crash"


def test_event_writer_survives_a_full_disk() -> None:
    """ENOSPC on the events file drops the event; the trainer's progress report never kills it."""
    from supervisor.runner.callback import EventWriter

    w = EventWriter("/dev/full")
    w.emit("step", step=1)
    w.emit("step", step=2)
    assert w.dropped == 2
    w.close()

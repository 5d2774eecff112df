"""Regressions found on the real GPU (docs/benchmarks.md), replayed on the CPU."""

from __future__ import annotations

import json

from supervisor.guards.classify import classify_exit
from tests.support import DATA


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


def _accelerate_failure(rank_lines: dict[int, list[str]]) -> list[str]:
    """The tail of `accelerate launch` (torch elastic) when its ranks fail: the ranks'
    tracebacks with a '[rankN]:' prefix, then the launcher's own ChildFailedError and
    CalledProcessError tracebacks, which name no cause."""
    tail: list[str] = []
    for rank, lines in rank_lines.items():
        tail += [f"[rank{rank}]: {x}" for x in ["Traceback (most recent call last):",
                                              '  File "/w/supervisor/runner/train.py", line 400, in run',
                                              "    trainer.train()", *lines]]
    tail += [
        "E1128 12:50:01.000000 1234 torch/distributed/elastic/multiprocessing/api.py:900] failed (exitcode: 1)",
        "Traceback (most recent call last):",
        '  File "/usr/lib/python3.12/runpy.py", line 198, in _run_module_as_main',
        '  File "/opt/torch/lib/python3.12/site-packages/torch/distributed/run.py", line 150, in __call__',
        "    raise ChildFailedError(",
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ",
        "============================================================",
        "supervisor.runner.train FAILED",
        "------------------------------------------------------------",
        "Root Cause (first observed failure):",
        "[0]:",
        "  exitcode  : 1 (pid: 4242)",
        "  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html",
        "============================================================",
        "Traceback (most recent call last):",
        '  File "/opt/accelerate/commands/launch.py", line 1200, in launch_command',
        "    raise subprocess.CalledProcessError(returncode=process.returncode, cmd=cmd)",
        "subprocess.CalledProcessError: Command '['python3', '-m', 'supervisor.runner.train']' returned non-zero exit status 1.",
    ]
    return tail


def test_oom_on_one_rank_under_accelerate_is_cuda_oom() -> None:
    """Several GPUs: the final traceback is the launcher's; the ranks' tracebacks decide."""
    tail = _accelerate_failure({
        1: ["RuntimeError: NCCL communicator was aborted"],
        0: ["torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.75 GiB."],
    })
    cls = classify_exit(returncode=1, signal=None, stderr_tail=tail)
    assert cls.kind == "cuda_oom" and "OutOfMemoryError" in (cls.detail or ""), cls


def test_rank_config_error_and_rank_crash_under_accelerate() -> None:
    tail = _accelerate_failure({0: ["ModuleNotFoundError: No module named 'liger_kernel'"]})
    assert classify_exit(returncode=1, signal=None, stderr_tail=tail).kind == "config_error"
    tail = _accelerate_failure({0: ["RuntimeError: CUDA error: an illegal memory access"]})
    assert classify_exit(returncode=1, signal=None, stderr_tail=tail).kind == "crash"
    # no rank traceback at all: the launcher's error stands
    assert classify_exit(returncode=1, signal=None, stderr_tail=_accelerate_failure({})).kind == "crash"
    # ranks printed without the '[rankN]:' prefix: the last traceback before the launcher's
    tail = [x.split(": ", 1)[1] if x.startswith("[rank") else x for x in _accelerate_failure(
        {0: ["torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.75 GiB."]})]
    assert classify_exit(returncode=1, signal=None, stderr_tail=tail).kind == "cuda_oom"


def test_torchrun_tee_prefix_is_read_like_the_rank_prefix() -> None:
    """torchrun's --tee prints '[default0]:' where torch's excepthook prints '[rank0]:'."""
    tail = [x.replace("[rank0]:", "[default0]:") for x in _accelerate_failure(
        {0: ["torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.75 GiB."]})]
    assert any(x.startswith("[default0]:") for x in tail)
    assert classify_exit(returncode=1, signal=None, stderr_tail=tail).kind == "cuda_oom"

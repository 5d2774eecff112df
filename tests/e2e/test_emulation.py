"""The faithful 24 GB rehearsal: card totals, ballast sizing, the recipe, telemetry, lifecycle.

The helper's CUDA allocation is checked on the GPU machine (bench/calibrate_full_depth.py,
docs/benchmarks.md); here the real helper process runs with --no-cuda.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from supervisor.preflight.emulation import (
    card_total_mib,
)
from tests.support import ROOT

GIB = 1 << 30


# A stand-in trainer: starts the real helper (no CUDA here), says its pid, then waits or exits.
TRAINER = """
import sys, time
from supervisor.runner.emulate import start_ballast
proc, info = start_ballast(0, 24_564 << 20, timeout=30, no_cuda=True)
print(info["pid"], flush=True)
time.sleep(float(sys.argv[1]))
"""


def _trainer(wait_s: float) -> tuple[subprocess.Popen, int]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    p = subprocess.Popen([sys.executable, "-c", TRAINER, str(wait_s)], stdout=subprocess.PIPE,
                         text=True, env=env, start_new_session=True)  # as the launcher does
    line = p.stdout.readline()  # type: ignore[union-attr]
    assert line.strip().isdigit(), f"no ballast pid from the trainer: {line!r}"
    return p, int(line)


def _gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def test_ballast_sits_in_the_trainer_group_and_dies_with_it() -> None:
    trainer, ballast = _trainer(60)
    try:
        assert os.getpgid(ballast) == trainer.pid  # the supervisor's killpg reaches it
        assert psutil.Process(ballast).ppid() == trainer.pid
        os.killpg(trainer.pid, signal.SIGKILL)
        assert _gone(ballast), "the ballast outlived a killed trainer group"
    finally:
        trainer.kill()
        trainer.wait()


def test_ballast_exits_when_the_trainer_exits_on_its_own() -> None:
    trainer, ballast = _trainer(0.2)
    assert trainer.wait(timeout=30) == 0
    assert _gone(ballast), "the ballast outlived its trainer"


def test_emulated_card_reaches_the_samples(tmp_path: Path) -> None:
    """FakeNVML: an H200 with a 118 GB ballast and a 14 GB trainer reads as a 24 GB card
    holding the trainer; the ballast is neither used memory nor the trainer's."""
    from supervisor.telemetry.sampler import Sampler
    from tests.fakes.nvml import FakeNVML

    trainer, ballast = _trainer(60)
    try:
        idle = Sampler(FakeNVML(2))
        idle.emulate(card_total_mib(24))  # two GPUs, nothing held yet: neither is the run's
        assert [g.mem_total_mib for g in idle.sample(trainer.pid, None).gpus] == [143_771] * 2
        nv = FakeNVML(1)
        nv.hold([ballast], 118_700)
        nv.hold([trainer.pid], 14_000)
        s = Sampler(nv)
        plain = s.sample(trainer.pid, None).gpus[0]
        assert plain.mem_total_mib == 143_771 and plain.proc_mem_mib == 132_700
        s.emulate(card_total_mib(24))
        g = s.sample(trainer.pid, None).gpus[0]
        assert g.mem_total_mib == 24_564
        assert g.proc_mem_mib == 14_000
        assert g.mem_used_mib == 512 + 14_000  # the driver's own + the trainer, as on the card
        from supervisor.tui.gpu import vram_value

        assert vram_value(g.mem_used_mib, g.mem_total_mib) == "14.2/24.0 GiB"  # the GPU panel
        assert vram_value(plain.mem_used_mib, plain.mem_total_mib) == "130/140 GiB"
    finally:
        os.killpg(trainer.pid, signal.SIGKILL)
        trainer.wait()



"""RELIABILITY_PLAN D in-process: a follower across rotation, timers and the stall guard on the
monotonic clock, the ETA. (State files, logs and clocks of a real supervisor: tests/e2e/test_reliability_state.py.)"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support import (
    FakeClock,
)

pytestmark = pytest.mark.timeout(90)


def test_d4_follower_survives_rotation_and_truncation(tmp_path: Path) -> None:
    from supervisor.daemon.followers import LogFollower
    from supervisor.wrapper import RotatingLog

    path = tmp_path / "trainer.log"
    log = RotatingLog(path, max_bytes=100, backups=2)
    f = LogFollower(path)
    got: list[str] = []
    for i in range(30):
        log.write(f"line {i:03d}\n".encode())
        if i % 4 == 0:
            got += f.read()
    got += f.read()
    assert got == [f"line {i:03d}" for i in range(30)]  # nothing lost across rotations
    os.truncate(path, 0)  # `: > trainer.log` by a user
    log.write(b"after truncate\n")
    got = f.read()
    assert got[0] == "[qlora-watch: log file truncated]" or "after truncate" in got
    assert "after truncate" in got + f.read()


def test_d5_pure_timers_ignore_the_wall_clock() -> None:
    """Back-off is a pure function of the restart count; ETA and durations never go negative."""
    from supervisor.control import runs
    from supervisor.guards import backoff_delay
    from supervisor.recipe import CrashGuard
    from supervisor.tui.fmt import fmt_duration

    cfg = CrashGuard(backoff_base_s=10, backoff_max_s=600)
    assert [backoff_delay(n, cfg) for n in (0, 1, 2, 6, 10, 10**6, -5)] == [10, 20, 40, 600, 600, 600, 10]
    for bad in (-3600.0, float("nan"), float("-inf"), None):
        assert runs.fmt_duration(bad) == "-"
        assert fmt_duration(bad) in ("n/a", "0s")


def _eta_steps(steps: list[tuple[float, int]]):
    from supervisor.records import Step

    return [Step(t=t, step=s, attempt=1, max_steps=1000) for t, s in steps]


@pytest.mark.parametrize("times", [
    [(1.7e9 + i, i) for i in range(10)],  # steady
    [(1.7e9 - 3600 * (i > 4) + i, i) for i in range(10)],  # wall clock stepped back 1 h
    [(0.0, i) for i in range(10)],  # no clock at all
    [(1.7e9 + 3600 * (i > 4) + i, i) for i in range(10)],  # stepped forward 1 h
    [(1.7e9 - i, i) for i in range(10)],  # time running backwards
])
def test_d5_eta_is_never_negative_nor_a_division_by_zero(times) -> None:
    from supervisor.daemon.trainer_events import eta_s

    recent = _eta_steps(times)
    eta = eta_s(recent, recent[-1])
    assert eta is None or eta >= 0


def _stall_window(clock: FakeClock):
    """A run as the core's window builder sees it: training, the last step 10 s ago, step every 1 s."""
    from supervisor.daemon.guard_window import GuardClock, build_window
    from supervisor.recipe import Recipe
    from supervisor.records import Step
    from supervisor.status import RunStatus

    recipe = Recipe.model_validate({"model": {"name": "m"}, "data": {"path": "/d"},
                                    "train": {"output_dir": "/tmp/none"},
                                    "guards": {"stall": {"floor_s": 600, "step_factor": 10}}})
    steps = [Step(t=clock.time() - 10 - (20 - i), step=i, attempt=1) for i in range(20)]
    status = RunStatus.from_json({"state": "training", "phase": "training", "phase_since": steps[0].t,
                                  "attempt": 1})
    gclock = GuardClock((steps[-1].t, clock.monotonic() - 10))
    return lambda: build_window(status=status, recipe=recipe, samples=[], steps=steps,
                                output_dir=Path("/nonexistent"), clock=gclock, run_id="r", fired=set())


@pytest.mark.parametrize("jump", [3600.0, -3600.0, -1.7e9])
def test_d5_stall_guard_is_not_fooled_by_a_wall_clock_jump(monkeypatch, jump: float) -> None:
    """The stall limit here is 600 s. A wall-clock step of an hour (or to 1970) right after the
    last step neither fires the guard nor hides a real stall: idle time is monotonic."""
    from supervisor.daemon import guard_window as build
    from supervisor.guards import stall
    from supervisor.recipe import CrashGuard, StallGuard

    clock = FakeClock()
    monkeypatch.setattr(build, "time", clock.as_time_module())
    window = _stall_window(clock)
    cfg = StallGuard(floor_s=600, step_factor=10)
    assert stall.check(window(), cfg, CrashGuard()) == []
    clock.jump_wall(jump)
    assert stall.check(window(), cfg, CrashGuard()) == []  # 10 s idle, whatever the wall says
    clock.advance(700)  # a real stall: 710 s of monotonic time without a step
    actions = stall.check(window(), cfg, CrashGuard())
    assert [type(a).__name__ for a in actions] == ["CaptureStacks", "Relaunch"]

"""The core's parts built alone, from a RunIO (a real store, the status in memory): #12 item 2."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import pytest

from supervisor.daemon.actions import Actions
from supervisor.daemon.trainer_events import TrainerEvents
from supervisor.guards.base import Warn
from supervisor.states import RunState
from supervisor.store import RunStore
from tests.support.runio import memory_io


def _events(tmp_path: Path, status: dict) -> tuple[TrainerEvents, list]:
    recorded: list = []
    (tmp_path / "run").mkdir()
    io = memory_io(RunStore(tmp_path / "run"), status, recorded)
    recipe = SimpleNamespace(trainer=SimpleNamespace(command=None))
    tb = SimpleNamespace(add_steps=lambda steps: None)
    return TrainerEvents(io, recipe=recipe, tb=tb, mark_time=lambda t: None,
                         output_dir=lambda: tmp_path), recorded


def test_an_action_the_executor_does_not_know_is_not_dropped() -> None:
    life = SimpleNamespace(output_dir=lambda: Path("/nonexistent"))
    recorded: list = []
    ex = Actions(memory_io(None, {"state": "training"}, recorded), life)  # type: ignore[arg-type]
    with pytest.raises(AssertionError):
        asyncio.run(ex.execute([object()]))  # type: ignore[list-item]
    asyncio.run(ex.execute([Warn(guard="g", message="m", key="k"), Warn(guard="g", message="m", key="k")]))
    assert recorded == [("guard", "m", "warning")] and ex.fired == {"k"}  # announced once


@pytest.mark.parametrize("state,phase,after", [
    ("starting", "loading_model", RunState.LOADING),
    ("loading", "training", RunState.TRAINING),
    ("training", "saving", RunState.SAVING),
    ("backoff", "training", RunState.BACKOFF),  # a killed trainer's late line moves nothing
    ("stopping", "saving", RunState.STOPPING),
    ("failed", "training", RunState.FAILED),
])
def test_phases_move_the_run_only_while_a_trainer_is_up(tmp_path: Path, state: str, phase: str,
                                                         after: RunState) -> None:
    ev, _ = _events(tmp_path, {"state": state, "step": 3})
    ev.on_trainer_event({"event": "phase", "phase": phase})
    assert ev.io.status.state == after and ev.io.status.phase == phase


def test_steps_from_a_trainer_without_phases_mean_training(tmp_path: Path) -> None:
    ev, _ = _events(tmp_path, {"state": "starting", "attempt": 1, "lineage": 1})
    ev.take_steps([{"event": "step", "step": 1, "loss": 2.0, "max_steps": 10, "t": 1.0},
                   {"event": "step", "step": 2, "loss": 1.5, "max_steps": 10, "t": 2.0}], source="events")
    st = ev.io.status
    assert (st.state, st.step, st.last_loss, st.max_steps, st.eta_s) == (RunState.TRAINING, 2, 1.5, 10, 8.0)
    assert [r["step"] for r in ev.io.store.steps()] == [1, 2]
    ev.io.store.close()

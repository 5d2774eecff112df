"""The run's state machine (states.EDGES) and its status type (status.RunStatus): #12 item 1."""

from __future__ import annotations

import ast
import inspect
import json
import logging
from pathlib import Path

import pytest

from supervisor import states
from supervisor.states import EDGES, IllegalTransition, RunState
from supervisor.status import RunInfo, RunStatus, UnknownField

ROOT = Path(__file__).resolve().parents[2]


def test_every_state_has_its_edges_and_the_table_fits_one_screen() -> None:
    assert set(EDGES) == set(RunState) | {None}
    assert all(set(v) <= set(RunState) for v in EDGES.values())
    src = inspect.getsource(states).splitlines()
    start = next(i for i, line in enumerate(src) if line.startswith("EDGES"))
    end = next(i for i in range(start, len(src)) if src[i] == "}")
    assert end - start < 25
    # every ended run can be resumed; else only a requeued Slurm job's cancel leaves one (STOPPED)
    assert all(RunState.STARTING in EDGES[s] and EDGES[s] <= {RunState.STARTING, RunState.STOPPED}
               for s in states.TERMINAL)


@pytest.mark.parametrize("old,new", [
    (RunState.TRAINING, RunState.BACKOFF), (RunState.BACKOFF, RunState.STARTING),
    (RunState.STOPPING, RunState.PREEMPTED), (RunState.LOST, RunState.STARTING),
    (None, RunState.STARTING), (RunState.SAVING, RunState.TRAINING),
])
def test_edges_the_core_takes_are_allowed(old: RunState | None, new: RunState) -> None:
    st = RunStatus(state=old)
    assert st.change(new, why="test") == f"{old.value if old else 'new'} -> {new.value}"
    assert st.state == new


@pytest.mark.parametrize("old,new", [
    (RunState.COMPLETED, RunState.TRAINING), (RunState.BACKOFF, RunState.COMPLETED),
    (RunState.FAILED, RunState.BACKOFF), (None, RunState.TRAINING), (RunState.STOPPING, RunState.TRAINING),
])
def test_an_edge_not_in_the_table_raises_under_tests(old: RunState | None, new: RunState) -> None:
    st = RunStatus(state=old)
    with pytest.raises(IllegalTransition, match="illegal state change"):
        st.change(new, why="test")


def test_a_change_of_state_needs_a_reason() -> None:
    with pytest.raises(IllegalTransition, match="without a reason"):
        RunStatus(state=RunState.TRAINING).change(RunState.BACKOFF)
    st = RunStatus(state=RunState.TRAINING)
    assert st.change(RunState.TRAINING, step=5) is None and st.step == 5  # staying is not an edge


def test_in_production_an_illegal_edge_is_logged_and_the_run_goes_on(monkeypatch, caplog) -> None:
    monkeypatch.delenv(states.STRICT_ENV)
    caplog.set_level(logging.ERROR, logger="qlora-watch.status")
    st = RunStatus(state=RunState.COMPLETED)
    st.change(RunState.TRAINING, why="a bug")
    assert st.state == RunState.TRAINING
    assert "illegal state change completed -> training" in caplog.text
    st.update(no_such_field=1)
    assert st.extra == {"no_such_field": 1} and "no field 'no_such_field'" in caplog.text


def test_an_undeclared_field_is_an_error_under_tests() -> None:
    with pytest.raises(UnknownField, match="recipe_name"):
        RunStatus().update(recipe_name="x")


def test_the_supervisors_set_state_checks_the_table(tmp_path: Path) -> None:
    """Through the real core: an illegal edge raises and nothing is written."""
    from supervisor.daemon.core import Supervisor
    from supervisor.recipe import load_recipe, recipe_to_json
    from supervisor.store import create_run
    from tests.support import fake_recipe

    store = create_run(tmp_path / "runs", {"recipe": "fake", "output_dir": str(tmp_path / "out")})
    (store.path / "recipe.json").write_text(recipe_to_json(load_recipe(fake_recipe(tmp_path, []))))
    sup = Supervisor(store)
    sup.set_state(RunState.STARTING, why="a new run", attempt=0)
    sup.set_state(RunState.TRAINING, why="phase training")
    with pytest.raises(IllegalTransition):
        sup.set_state(RunState.STARTING, why="relaunch without a back-off")
    with pytest.raises(UnknownField):
        sup.set_state(trainer_pid=1)
    assert json.loads(store.state_path.read_text())["state"] == "training"
    store.close()


def test_every_change_of_state_in_the_package_names_its_reason() -> None:
    """`set_state(RunState.X, ...)` / `set_state(new, ...)` without why= anywhere in supervisor/."""
    missing = []
    for path in (ROOT / "supervisor").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "set_state" and node.args
                    and "why" not in {k.arg for k in node.keywords}):
                missing.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert missing == []


def test_old_state_files_load_and_keep_unknown_keys() -> None:
    """A state.json of an earlier version (and the recorded fixtures' keys) reads; unknown
    keys survive a rewrite; an unknown state value is never trusted."""
    old = {"run_id": "amber-falcon", "state": "training", "attempt": 2, "rung": 0, "restarts": 1,
           "wrapper": {"pid": 41872}, "trainer_pid": 41872, "host_ram_needed_mib": 6144,
           "overrides": ["lora.r=8"], "stop_state": None}
    st = RunStatus.from_json(old)
    assert (st.state, st.attempt, st.rung, st.wrapper, st.overrides) == (
        RunState.TRAINING, 2, 0, {"pid": 41872}, ["lora.r=8"])
    assert st.extra == {"trainer_pid": 41872, "host_ram_needed_mib": 6144}
    back = st.to_json()
    assert back == {k: v for k, v in old.items() if v is not None}
    assert RunStatus.from_json({"state": "levitating"}).state == RunState.LOST
    assert RunStatus.from_json({}).state is None and RunStatus.from_json(None).run_state == RunState.STARTING


def test_run_info_reads_the_recipe_under_either_name() -> None:
    assert RunInfo.from_json({"recipe_name": "llama-3.1-8b"}).recipe == "llama-3.1-8b"
    info = RunInfo.from_json({"recipe": "8b", "recipe_name": "8b", "output_dir": "/o", "future": 1})
    assert (info.recipe, info.output_dir, info.extra) == ("8b", "/o", {"future": 1})
    assert info.to_json() == {"recipe": "8b", "output_dir": "/o", "future": 1}

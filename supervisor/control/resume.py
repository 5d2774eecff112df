"""`qlora-watch resume`: continue an ended run in the same run (id, history, output folder).

A resume is a new attempt of the run: from the newest complete checkpoint of the run (or the
one named), with the settings the last attempt had (the ladder rung is kept) and any `--set`
on top, validated like the recipe. A `--set` that changes the adapter's shape (rank, target
modules) cannot load the old checkpoints: that is a fresh attempt in a new folder, as the
ladder does, and the old checkpoints are kept. `resume_run` is what the CLI calls and what a
requeued Slurm job calls.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from supervisor.checkpoints import folders as checkpoints
from supervisor.checkpoints.plan import step_of
from supervisor.control import runs
from supervisor.guards.relaunch import restarts_after
from supervisor.recipe import Recipe, RecipeError, apply_sets, recipe_from_json, recipe_to_json
from supervisor.states import RESUMABLE, RunState
from supervisor.store import RunStore, atomic_write


class ResumeError(Exception):
    """The run cannot be resumed as asked; the message says why and what to do instead."""


@dataclass
class ResumePlan:
    """What the next attempt will be."""

    run_id: str
    from_path: str | None  # the checkpoint folder, None: from scratch
    fresh: bool  # a new lineage in a new folder (adapter shape changed)
    overrides: list[str]
    recipe: Recipe  # the run's base recipe with the overrides

    def describe(self) -> str:
        if self.fresh:
            where = ("a fresh attempt in a new output folder: the --set changes the adapter's "
                     "shape, so the old checkpoints cannot be loaded (they are kept)")
        elif self.from_path:
            where = f"from {Path(self.from_path).name}"
        else:
            where = "from scratch (the run has no complete checkpoint)"
        sets = f" with {' '.join('--set ' + o for o in self.overrides)}" if self.overrides else ""
        return f"resuming {self.run_id} {where}{sets}"


def effective(base: Recipe, rung: int | None, overrides: list[str]) -> Recipe:
    """What an attempt runs: the base recipe at its ladder rung (ladder.effective), then every
    resume's --set (last, so that a --set wins over the rung it was given at)."""
    from supervisor import ladder

    return apply_sets(ladder.effective(base, rung), overrides)


def _shape(r: Recipe) -> tuple[Any, ...]:
    """What a checkpoint's adapter weights depend on (FIELD_NOTES 3)."""
    return (r.lora.r, tuple(r.lora.target_modules) if isinstance(r.lora.target_modules, list)
            else r.lora.target_modules)


def _pick(out: Path, run_id: str, from_ckpt: str | None) -> checkpoints.CheckpointInfo | None:
    infos = checkpoints.scan(out)
    if from_ckpt is None:
        return checkpoints.newest_complete(out, run_id=run_id)
    name = f"checkpoint-{from_ckpt}" if from_ckpt.isdigit() else Path(from_ckpt).name  # 20, a path
    if step_of(name) is None:
        raise ResumeError(f"--from {from_ckpt}: expected a checkpoint-N name")
    hit = next((i for i in infos if i.name == name), None)
    have = ", ".join(i.name for i in infos if i.complete and i.run_id == run_id) or "none"
    if hit is None:
        raise ResumeError(f"--from {name}: no such checkpoint in {out} (complete ones of this run: {have})")
    if not hit.complete:
        raise ResumeError(f"--from {name}: not complete ({hit.reason}); complete ones: {have}")
    if hit.run_id != run_id:
        raise ResumeError(f"--from {name}: it is not this run's checkpoint (marker: {hit.run_id or 'none'})")
    return hit


def _wait_while_stopping(store: RunStore) -> None:
    """`qlora-watch stop && qlora-watch resume`: the stop is still saving, or the supervisor of
    the ended run is still closing; let them finish (bounded) instead of refusing."""
    try:
        grace = recipe_from_json((store.path / "recipe.json").read_text()).supervisor.stop_grace_s
    except (OSError, ValueError):
        grace = 120.0
    deadline = time.monotonic() + grace + 30
    while store.read_state().get("state") == RunState.STOPPING.value and time.monotonic() < deadline:
        time.sleep(0.2)
    deadline = time.monotonic() + 15
    while (not runs.is_live(store) and runs.supervisor_running(store)
           and time.monotonic() < deadline):
        time.sleep(0.1)


def plan_resume(store: RunStore, from_ckpt: str | None = None,
                overrides: Iterable[str] = ()) -> ResumePlan:
    """Check that the run can be resumed as asked; raises ResumeError saying why not."""
    overrides = list(overrides)
    st = store.read_status()
    state = st.run_state.value
    rid = store.run_id
    if state not in {s.value for s in RESUMABLE | {RunState.COMPLETED}}:
        if runs.supervisor_running(store) or runs.is_live(store):
            raise ResumeError(f"run {rid} is still {state}; stop it first (`qlora-watch stop {rid}`)")
        raise ResumeError(f"run {rid} is {state}; it cannot be resumed")
    if runs.supervisor_running(store):
        raise ResumeError(f"run {rid} still has a supervisor; wait for it (`qlora-watch wait {rid}`)")
    base = recipe_from_json((store.path / "recipe.json").read_text(encoding="utf-8"))
    before = list(st.overrides)
    try:
        recipe = apply_sets(base, overrides)
        now = effective(base, st.rung, before + overrides)
        was = effective(base, st.rung, before)
    except RecipeError as e:
        raise ResumeError(str(e)) from None
    step = st.step or 0
    if state == RunState.COMPLETED.value:
        more = recipe.train.max_steps
        if not any(o.split("=", 1)[0].strip() == "train.max_steps" for o in overrides) or 0 < more <= step:
            raise ResumeError(
                f"run {rid} completed at step {step}: nothing to resume. To train it further, "
                f"`qlora-watch resume {rid} --set train.max_steps=N` with N above {step}; "
                "or start a new run")
    fresh = _shape(was) != _shape(now)
    if fresh and from_ckpt:
        raise ResumeError(f"--from {from_ckpt}: the --set changes the adapter's shape (LoRA rank or "
                          "target modules), so no earlier checkpoint can be loaded; drop --from "
                          "for a fresh attempt")
    out = Path(st.output_dir or store.run_info().output_dir or ".")
    ckpt = None if fresh else _pick(out, rid, from_ckpt)
    return ResumePlan(run_id=rid, from_path=str(ckpt.path) if ckpt else None, fresh=fresh,
                      overrides=overrides, recipe=recipe)


def request_resume(store: RunStore, from_ckpt: str | None = None,
                   overrides: Iterable[str] = ()) -> ResumePlan:
    """Plan and record the next attempt; the next supervisor of the run launches it (a job
    that runs `_supervise` itself calls this, then supervises). Raises ResumeError."""
    _wait_while_stopping(store)
    plan = plan_resume(store, from_ckpt, overrides)
    atomic_write(store.path / "recipe.json", recipe_to_json(plan.recipe))  # the settings from now on
    from supervisor import runenv

    runenv.capture(store.path)  # a resume may run elsewhere (a requeued job): its environment
    st = store.read_status()
    st.change(RunState.STARTING, why="qlora-watch resume: a new attempt", message=plan.describe(),
              exited=True,
              resume_request={"from": plan.from_path, "fresh": plan.fresh, "overrides": plan.overrides,
                              "requested_at": time.time(), "after": st.state.value if st.state else None},
              overrides=list(st.overrides) + plan.overrides,
              restarts_since_progress=restarts_after(st.restarts_since_progress or 0, "resume"),
              stop_state=None, ended_at=None, next_launch_in_s=None)
    store.write_status(st)
    from supervisor.records import Event, EventKind

    store.add_event(Event(t=time.time(), kind=EventKind.RESUME_REQUESTED, level="info", message=plan.describe(),
                          attempt=st.attempt,
                          evidence={"from": plan.from_path, "fresh": plan.fresh, "overrides": plan.overrides}))
    store.close()
    return plan


def resume_run(store: RunStore, from_ckpt: str | None = None, overrides: Iterable[str] = (),
               wait_s: float = 20.0) -> ResumePlan:
    """Plan, record and start the next attempt under a new supervisor; raises ResumeError."""
    plan = request_resume(store, from_ckpt, overrides)
    runs.spawn_supervisor(store)
    if not runs.wait_started(store, timeout=wait_s):
        raise ResumeError(f"the supervisor did not start; see {store.path / 'supervisor.out'}")
    return plan

"""`qlora-watch resume`: an ended run continues in the same run (real supervisor, real processes)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from supervisor.checkpoints.folders import checkpoint_status
from tests.support import (
    ROOT,
    events,
    fake_recipe,
    launches,
    qlw,
    read_state,
    start,
    wait_end,
    wait_for,
)


def _stop_after_checkpoint(home: Path, run_id: str, step: int, timeout: float = 60) -> dict:
    wait_for(lambda: (read_state(home, run_id).get("last_checkpoint_step") or 0) >= step,
             timeout=timeout, what=f"a checkpoint at step {step}")
    qlw("stop", run_id, check=True)
    assert wait_end(run_id) == 1
    return read_state(home, run_id)


def _steps(home: Path, run_id: str) -> list[tuple[int, int]]:
    db = sqlite3.connect(home / "runs" / run_id / "db.sqlite")
    try:
        return db.execute("SELECT attempt, step FROM steps ORDER BY attempt, step").fetchall()
    finally:
        db.close()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_tiny_recipe_stop_then_resume_is_one_run(qlw_home: Path, tmp_path: Path) -> None:
    """The real trainer: stop after a checkpoint, resume; same id, steps follow on, completes."""
    out = tmp_path / "tiny-out"
    run_id = qlw("start", "recipes/tiny.toml", "--detach", "--set", f'train.output_dir="{out}"',
                 "--set", "train.max_steps=20", "--set", "train.save_steps=10",
                 "--set", "train.logging_steps=1", "--set", "debug.step_sleep_s=0.25",
                 check=True).stdout.strip().splitlines()[-1]
    st = _stop_after_checkpoint(qlw_home, run_id, 10, timeout=120)
    assert st["state"] == "stopped" and f"qlora-watch resume {run_id}" in st["message"]
    ckpt = Path(st["last_checkpoint"])
    assert checkpoint_status(ckpt).complete
    res = qlw("resume", run_id, "--detach")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == run_id  # the same run, not a new one
    assert f"from {ckpt.name}" in res.stderr
    assert wait_end(run_id, timeout=240) == 0, qlw("logs", run_id).stdout
    st = read_state(qlw_home, run_id)
    assert st["state"] == "completed" and st["attempt"] == 2 and st["step"] == 20
    assert st["resume_from"] == str(ckpt)
    rows = _steps(qlw_home, run_id)
    second = [s for a, s in rows if a == 2]
    assert second[0] == checkpoint_status(ckpt).step + 1  # the new attempt follows on
    assert [s for a, s in rows if a == 1][-1] >= second[0] - 1  # attempt 1's rows are kept
    ls = json.loads(qlw("ls", "--json", check=True).stdout)
    assert [r["run_id"] for r in ls] == [run_id]  # one run
    report = qlw("report", run_id, "--out", str(tmp_path / "rep"), check=True)
    assert (tmp_path / "rep" / "report.html").is_file(), report.stdout
    from supervisor.report.data import load_run, summarize

    summary = summarize(load_run(qlw_home / "runs" / run_id))
    assert summary["attempts"] == 2 and summary["step"] == 20
    assert summary["relaunch_gap_s"] > 0  # the time between the attempts is a gap, not training


def test_resume_from_a_named_checkpoint_keeps_the_rung_and_takes_set(qlw_home: Path, tmp_path: Path) -> None:
    """OOM -> rung 1 (768); stop; `resume --from checkpoint-10 --set train.grad_accum=2`: the
    rung is kept, the --set applies (effective batch changes: the user asked), rows kept."""
    rec = tmp_path / "record.jsonl"
    recipe = fake_recipe(tmp_path, ["--steps", "40", "--save-every", "5", "--step-time", "0.1",
                                    "--oom-at", "8", "--oom-above-seq", "768", "--record", str(rec)])
    run_id = start(recipe, "--set", "train.save_total_limit=20")  # checkpoint-10 stays, however late the stop
    wait_for(lambda: read_state(qlw_home, run_id).get("rung") == 1, timeout=30, what="rung 1")
    st = _stop_after_checkpoint(qlw_home, run_id, 15)
    assert st["rung"] == 1
    res = qlw("resume", run_id, "--from", "checkpoint-10", "--set", "train.grad_accum=2", "--detach")
    assert res.returncode == 0, res.stderr
    assert wait_end(run_id, timeout=60) == 0
    third = launches(rec)[-1]
    assert third["resume"].endswith("/checkpoint-10") and third["max_seq_len"] == 768
    assert third["grad_accum"] == 2 and third["attempt"] == "3"
    assert read_state(qlw_home, run_id)["rung"] == 1
    rows = _steps(qlw_home, run_id)
    assert min(s for a, s in rows if a == 3) == 11 and max(s for a, s in rows if a == 2) >= 15
    assert any(e["kind"] == "resume" for e in events(qlw_home, run_id))
    # a completed run: says so, and what to do instead
    res = qlw("resume", run_id)
    assert res.returncode == 2
    assert "completed at step 40" in res.stderr and "--set train.max_steps=N" in res.stderr
    assert "new run" in res.stderr
    assert qlw("resume", run_id, "--set", "train.max_steps=30").returncode == 2  # not more steps
    res = qlw("resume", run_id, "--set", "train.max_steps=80", "--detach")  # more steps: continues
    assert res.returncode == 0 and "from checkpoint-40" in res.stderr
    assert wait_end(run_id, timeout=60) == 0 and launches(rec)[-1]["resume"].endswith("/checkpoint-40")


def test_resume_with_a_new_rank_is_a_fresh_attempt(qlw_home: Path, tmp_path: Path) -> None:
    rec = tmp_path / "record.jsonl"
    recipe = fake_recipe(tmp_path, ["--steps", "30", "--save-every", "5", "--step-time", "0.05",
                                    "--record", str(rec)])
    run_id = start(recipe)
    _stop_after_checkpoint(qlw_home, run_id, 5)
    bad = qlw("resume", run_id, "--from", "checkpoint-5", "--set", "lora.r=4")
    assert bad.returncode == 2 and "adapter's shape" in bad.stderr
    assert qlw("resume", run_id, "--set", "lora.nope=4").returncode == 2  # validated like the recipe
    res = qlw("resume", run_id, "--set", "lora.r=4", "--detach")
    assert res.returncode == 0 and "fresh attempt" in res.stderr
    assert wait_end(run_id, timeout=60) == 0
    first, second = launches(rec)
    assert second["resume"] is None and second["lora_r"] == 4
    assert second["output_dir"].endswith("attempt-2")
    assert list(Path(first["output_dir"]).glob("checkpoint-*"))  # the old ones are kept


def test_start_into_a_stopped_runs_folder_is_refused_before_detaching(qlw_home: Path, tmp_path: Path) -> None:
    recipe = fake_recipe(tmp_path, ["--steps", "40", "--save-every", "5", "--step-time", "0.05"])
    run_id = start(recipe)
    _stop_after_checkpoint(qlw_home, run_id, 5)
    res = qlw("start", str(recipe), "--detach")
    assert res.returncode == 2 and not res.stdout.strip()  # no run id printed
    assert "refusing to mix runs" in res.stderr and f"qlora-watch resume {run_id}" in res.stderr
    assert len(list((qlw_home / "runs").iterdir())) == 1  # nothing was created


def test_resume_of_a_live_run_or_unknown_checkpoint_says_why(qlw_home: Path, tmp_path: Path) -> None:
    recipe = fake_recipe(tmp_path, ["--steps", "400", "--save-every", "5", "--step-time", "0.05"])
    run_id = start(recipe)
    res = qlw("resume", run_id)
    assert res.returncode == 2 and f"qlora-watch stop {run_id}" in res.stderr
    _stop_after_checkpoint(qlw_home, run_id, 5)
    res = qlw("resume", run_id, "--from", "checkpoint-999")
    assert res.returncode == 2 and "no such checkpoint" in res.stderr
    assert "complete ones of this run: checkpoint-" in res.stderr


def test_stop_then_resume_at_once_waits_for_the_save(qlw_home: Path, tmp_path: Path) -> None:
    """`qlora-watch stop && qlora-watch resume`: resume waits while the stop is saving."""
    recipe = fake_recipe(tmp_path, ["--steps", "15", "--save-every", "5", "--step-time", "0.05",
                                    "--save-slowly", "0.2"])
    run_id = start(recipe)
    wait_for(lambda: (read_state(qlw_home, run_id).get("last_checkpoint_step") or 0) >= 5, timeout=30,
             what="checkpoint-5")
    qlw("stop", run_id, check=True)
    res = qlw("resume", run_id, "--detach")
    assert res.returncode == 0, res.stderr
    assert wait_end(run_id, timeout=60) == 0 and read_state(qlw_home, run_id)["attempt"] == 2


def test_resume_run_is_callable_without_the_cli(qlw_home: Path, tmp_path: Path) -> None:
    """The function a requeued job calls (Slurm): same effect as the command."""
    from supervisor import paths
    from supervisor.control.resume import resume_run
    from supervisor.store import RunStore

    recipe = fake_recipe(tmp_path, ["--steps", "20", "--save-every", "5", "--step-time", "0.05"])
    run_id = start(recipe)
    _stop_after_checkpoint(qlw_home, run_id, 5)
    plan = resume_run(RunStore(paths.run_dir(run_id)))
    assert plan.run_id == run_id and plan.from_path and not plan.fresh
    assert wait_end(run_id, timeout=60) == 0


def test_readme_names_resume_and_run() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "qlora-watch resume" in readme and "qlora-watch run" in readme

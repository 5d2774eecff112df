"""The real trainer as a subprocess: `python -m supervisor.runner.train` on recipes/tiny.toml
(random tiny Llama, NF4 on CPU) with few steps, about 10-15 s each on 2 cores, mostly imports:
a full run, resume from a checkpoint, SIGTERM while training and while loading, the debug OOM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support import ROOT, jsonl, tiny_recipe_json, wait_for_events

OOM_LINE = "torch.OutOfMemoryError: CUDA out of memory"


# ------------------------------------------------------------------------------ helpers


def trainer_env(recipe: Path, events: Path, out: Path, cache: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QLW_", "TENSORBOARD_"))}
    env.update(
        QLW_RECIPE=str(recipe), QLW_EVENTS=str(events), QLW_OUTPUT_DIR=str(out),
        QLW_ATTEMPT="1", QLW_TINY_CACHE=str(cache),
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        OMP_NUM_THREADS="1",  # the recipe's [env]; the launcher would set it
    )
    env.update(extra)
    return env


def run_trainer(env: dict[str, str], *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "supervisor.runner.train", *args],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
    )


def of(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == kind]


def phases(events: list[dict[str, Any]]) -> list[str]:
    return [e["phase"] for e in of(events, "phase")]


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny-cache")


@pytest.fixture(scope="module")
def e2e(tmp_path_factory: pytest.TempPathFactory, tiny_cache: Path) -> dict[str, Any]:
    """One complete 12-step run (checkpoints at 4, 8, 12), shared by the e2e and resume tests."""
    root = tmp_path_factory.mktemp("e2e")
    recipe = tiny_recipe_json(root, "train.max_steps=12", "train.save_steps=4", "train.logging_steps=1")
    events, out = root / "events.jsonl", root / "out"
    proc = run_trainer(trainer_env(recipe, events, out, tiny_cache))
    return {"proc": proc, "events": jsonl(events), "out": out, "recipe": recipe}


# ------------------------------------------------------------------------------ the real trainer


@pytest.mark.slow
def test_end_to_end(e2e: dict[str, Any]) -> None:
    proc, events, out = e2e["proc"], e2e["events"], e2e["out"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    ph = phases(events)
    assert ph[:3] == ["loading_model", "tokenising", "training"]
    assert "saving" in ph and ph[-1] == "finished"
    steps = of(events, "step")
    assert [s["step"] for s in steps] == list(range(1, 13))
    assert all(s["max_steps"] == 12 for s in steps)
    assert steps[-1]["loss"] < 0.8 * steps[0]["loss"], [s["loss"] for s in steps]
    tokens = [s["tokens"] for s in steps]
    assert tokens == sorted(tokens) and tokens[0] > 0
    assert all(s["tokens_per_s"] > 0 and s["step_time_s"] > 0 and s["lr"] is not None for s in steps)
    ckpts = of(events, "checkpoint")
    assert [c["step"] for c in ckpts] == [4, 8, 12]
    for c in ckpts:
        assert Path(c["path"]).is_absolute() and c["path"] == str(out / f"checkpoint-{c['step']}")
        state = json.loads((Path(c["path"]) / "trainer_state.json").read_text())
        assert state["global_step"] == c["step"]
    (fin,) = of(events, "finished")
    adapter = Path(fin["adapter_path"])
    assert fin["step"] == 12 and adapter == out / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
    notes = " | ".join(e["message"] for e in of(events, "notice"))
    assert "4-bit nf4, double quant" in notes and "trainable of" in notes
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_resume_continues_from_checkpoint(e2e: dict[str, Any], tmp_path: Path, tiny_cache: Path) -> None:
    assert e2e["proc"].returncode == 0
    ckpt = e2e["out"] / "checkpoint-4"
    # A new attempt folder, as the supervisor does it; external prune: nothing is rotated away.
    recipe = tiny_recipe_json(tmp_path, "train.max_steps=12", "train.save_steps=4", "train.logging_steps=1",
                          "train.save_total_limit=1")
    events, out = tmp_path / "events.jsonl", tmp_path / "out"
    env = trainer_env(recipe, events, out, tiny_cache, QLW_RESUME=str(ckpt), QLW_EXTERNAL_PRUNE="1")
    proc = run_trainer(env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ev = jsonl(events)
    steps = of(ev, "step")
    assert steps[0]["step"] == 5 and steps[-1]["step"] == 12
    assert steps[0]["tokens"] > of(e2e["events"], "step")[3]["tokens"]  # the count resumes too
    assert [c["step"] for c in of(ev, "checkpoint")] == [8, 12]
    assert (out / "checkpoint-8").is_dir() and (out / "checkpoint-12").is_dir()  # limit 1 ignored
    assert of(ev, "finished")[0]["step"] == 12 and phases(ev)[-1] == "finished"
    # Same data order and optimizer state: the resumed losses match the uninterrupted run.
    first = {s["step"]: s["loss"] for s in of(e2e["events"], "step")}
    assert steps[-1]["loss"] == pytest.approx(first[12], rel=0.05)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_stops(tmp_path: Path, tiny_cache: Path) -> None:
    recipe = tiny_recipe_json(tmp_path, "train.max_steps=200", "train.save_steps=100",
                          "train.logging_steps=1", "debug.step_sleep_s=0.3")
    events, out = tmp_path / "events.jsonl", tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "supervisor.runner.train"], env=trainer_env(recipe, events, out, tiny_cache),
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_for_events(events, lambda ev: of(ev, "step"), proc)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 0, proc.stderr.read()[-3000:]
    ev = jsonl(events)
    (ck,) = of(ev, "checkpoint")
    last_step = of(ev, "step")[-1]["step"]
    assert 1 <= ck["step"] < 100 and ck["step"] == last_step
    state = json.loads((Path(ck["path"]) / "trainer_state.json").read_text())
    assert state["global_step"] == ck["step"]
    assert phases(ev)[-1] == "stopped" and not of(ev, "finished")
    assert not (out / "adapter").exists()


@pytest.mark.slow
def test_sigterm_while_loading_stops_at_once(tmp_path: Path, tiny_cache: Path) -> None:
    recipe = tiny_recipe_json(tmp_path)
    events, out = tmp_path / "events.jsonl", tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "supervisor.runner.train"], env=trainer_env(recipe, events, out, tiny_cache),
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_for_events(events, lambda ev: "loading_model" in phases(ev), proc)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 0, proc.stderr.read()[-3000:]
    ev = jsonl(events)
    assert phases(ev)[-1] == "stopped" and "training" not in phases(ev)
    assert not list(out.glob("checkpoint-*"))


@pytest.mark.slow
def test_debug_oom_exits_1_like_a_real_oom(tmp_path: Path, tiny_cache: Path) -> None:
    # Through the CLI arguments this time (the env vars' alternatives).
    recipe = tiny_recipe_json(tmp_path, "train.max_steps=12", "train.save_steps=2",
                          "debug.raise_oom_above_seq_len=800")
    events, out = tmp_path / "events.jsonl", tmp_path / "out"
    env = {k: v for k, v in trainer_env(recipe, events, out, tiny_cache).items()
           if k not in ("QLW_RECIPE", "QLW_EVENTS", "QLW_OUTPUT_DIR", "QLW_ATTEMPT")}
    proc = run_trainer(env, "--recipe", str(recipe), "--events", str(events),
                       "--output-dir", str(out), "--attempt", "2")
    assert proc.returncode == 1
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert last.startswith(OOM_LINE), proc.stderr[-2000:]
    assert "Traceback (most recent call last)" in proc.stderr
    ev = jsonl(events)
    assert [c["step"] for c in of(ev, "checkpoint")] == [2, 4]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not of(ev, "finished") and "stopped" not in phases(ev)

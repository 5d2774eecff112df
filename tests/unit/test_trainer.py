"""The built-in trainer: unit tests of data/tiny/callback, then the real trainer as a subprocess.

The slow tests run `python -m supervisor.runner.train` on recipes/tiny.toml (random tiny Llama,
NF4 on CPU) with few steps: about 10-15 s each on 2 cores, mostly imports.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from supervisor.recipe import load_recipe, recipe_to_json
from supervisor.runner.data import DataError, detect_format, load_records
from tests.support import ROOT, jsonl, wait_for_events

TINY = ROOT / "recipes" / "tiny.toml"
DATA = ROOT / "recipes" / "data"
OOM_LINE = "torch.OutOfMemoryError: CUDA out of memory"


# ------------------------------------------------------------------------------ helpers


def write_recipe(folder: Path, *overrides: str) -> Path:
    """The tiny recipe with overrides, resolved to JSON as the supervisor writes it."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.json"
    path.write_text(recipe_to_json(load_recipe(TINY, list(overrides))))
    return path


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
    recipe = write_recipe(root, "train.max_steps=12", "train.save_steps=4", "train.logging_steps=1")
    events, out = root / "events.jsonl", root / "out"
    proc = run_trainer(trainer_env(recipe, events, out, tiny_cache))
    return {"proc": proc, "events": jsonl(events), "out": out, "recipe": recipe}


# ------------------------------------------------------------------------------ data formats


def test_shipped_text_and_prompt_completion_load() -> None:
    text, fmt = load_records(DATA / "tiny-text.jsonl")
    assert fmt == "text" and len(text) == 64 and set(text[0]) == {"text"}
    pc, fmt = load_records(DATA / "tiny-prompt-completion.jsonl", "auto", max_samples=10)
    assert fmt == "prompt_completion" and len(pc) == 10
    assert set(pc[0]) == {"prompt", "completion"}
    chat, fmt = load_records(DATA / "tiny-chat.jsonl", "messages")
    assert fmt == "messages" and chat[0]["messages"][-1]["role"] == "assistant"


def test_text_formats_become_datasets() -> None:
    from supervisor.runner.data import to_dataset

    for name, cols in [("tiny-text.jsonl", ["text"]), ("tiny-prompt-completion.jsonl", ["prompt", "completion"])]:
        ds = to_dataset(load_records(DATA / name)[0])
        assert sorted(ds.column_names) == sorted(cols) and len(ds) == 64


def test_detect_format() -> None:
    assert detect_format({"messages": []}) == "messages"
    assert detect_format({"prompt": "a", "completion": "b"}) == "prompt_completion"
    assert detect_format({"text": "a"}) == "text"
    with pytest.raises(ValueError, match="keys: foo"):
        detect_format({"foo": 1})


@pytest.mark.parametrize(
    "lines, fmt, where, message",
    [
        (['{"text": "a"}', "{oops"], "auto", ":2:2:", "invalid JSON"),
        (['{"text": "a"}', '{"prompt": "p", "completion": "c"}'], "auto", ":2:", '"text" must be a string'),
        (['{"text": "a"}', "", '{"text": 3}'], "text", ":3:", '"text" must be a string'),
        (['{"messages": [{"role": "user", "content": "hi"}]}'], "auto", ":1:", "no assistant turn"),
        (['{"messages": [{"role": "bot", "content": "hi"}]}'], "auto", ":1:", "role must be one of"),
        (['{"prompt": "p"}'], "prompt_completion", ":1:", '"completion" must be a string'),
        (["[1, 2]"], "auto", ":1:", "must be a JSON object"),
    ],
)
def test_bad_record_names_file_and_line(tmp_path: Path, lines: list[str], fmt: str, where: str, message: str) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as e:
        load_records(p, fmt)
    assert str(e.value).startswith(f"{p}{where}") and message in str(e.value)


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such data file"):
        load_records(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no records"):
        load_records(tmp_path / "empty.jsonl")


# ------------------------------------------------------------------------------ units


def test_event_writer_lines_and_nan(tmp_path: Path) -> None:
    from supervisor.runner.callback import EventWriter

    w = EventWriter(tmp_path / "sub" / "ev.jsonl")
    w.emit("step", step=1, loss=float("nan"), grad_norm=float("inf"))
    w.phase("training")
    w.close()
    raw = (tmp_path / "sub" / "ev.jsonl").read_text()
    assert raw.endswith("\n") and "NaN" in raw and "Infinity" in raw
    first, second = [json.loads(x) for x in raw.splitlines()]
    assert math.isnan(first["loss"]) and first["event"] == "step" and "t" in first
    assert second == {"t": second["t"], "event": "phase", "phase": "training"}


def test_one_gpu_recipe_sees_one_gpu() -> None:
    """Trainer refuses one process seeing several GPUs (nn.DataParallel): pin GPU 0 unless the
    user chose; several-GPU recipes and accelerate's ranks are left alone."""
    from supervisor.runner.train import pin_one_gpu

    one, two = load_recipe(TINY), load_recipe(TINY, ["hardware.gpus=2"])
    env: dict[str, str] = {}
    assert pin_one_gpu(one, env) == "0" and env == {"CUDA_VISIBLE_DEVICES": "0"}
    env = {"CUDA_VISIBLE_DEVICES": "1"}
    assert pin_one_gpu(one, env) is None and env == {"CUDA_VISIBLE_DEVICES": "1"}
    assert pin_one_gpu(two, {}) is None and pin_one_gpu(one, {"LOCAL_RANK": "0"}) is None


def test_liger_is_skipped_with_a_notice_where_it_cannot_run() -> None:
    """The GPU recipes turn liger-kernel on; on a CPU (or without the package) training goes on
    without it and says so, instead of transformers' ImportError at trainer start."""
    from supervisor.runner.train import liger_usable, sft_config

    class Notes:
        def __init__(self) -> None:
            self.lines: list[str] = []

        def notice(self, message: str, **_: Any) -> None:
            self.lines.append(message)

    gpu_recipe = load_recipe(ROOT / "recipes" / "8b.toml")
    assert gpu_recipe.train.use_liger_kernel and not gpu_recipe.train.packing
    notes = Notes()
    assert liger_usable(gpu_recipe, notes) is False  # this machine has no CUDA
    assert len(notes.lines) == 1 and "training without them" in notes.lines[0]
    tiny = load_recipe(TINY)
    assert liger_usable(tiny, notes) is False and len(notes.lines) == 1  # off: no notice
    from supervisor.runner.train import load_context, parse_args

    ctx = load_context(parse_args(["--set", "train.use_liger_kernel=true"]),
                       {"QLW_RECIPE": str(TINY), "QLW_OUTPUT_DIR": "/tmp/qlw-liger-test"})
    assert ctx.recipe.train.use_liger_kernel
    assert sft_config(ctx, use_liger=False).use_liger_kernel is False


def test_only_rank_zero_writes_events(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under accelerate launch every rank runs the trainer: one step stream, from rank 0."""
    from supervisor.runner.callback import EventWriter

    for rank in ("1", "0"):
        monkeypatch.setenv("RANK", rank)
        w = EventWriter(tmp_path / "ev.jsonl")
        w.emit("step", step=int(rank))
        w.close()
    assert [json.loads(x)["step"] for x in (tmp_path / "ev.jsonl").read_text().splitlines()] == [0]


def test_callback_stop_request_saves_then_stops(tmp_path: Path) -> None:
    from transformers import TrainerControl, TrainerState

    from supervisor.runner.callback import QloraWatchCallback

    cb = QloraWatchCallback(tmp_path / "ev.jsonl", handle_sigterm=False)
    state, control = TrainerState(), TrainerControl()
    state.global_step, state.max_steps = 7, 100
    cb.on_step_end(None, state, control)
    assert not control.should_save and not control.should_training_stop
    cb.request_stop(signal.SIGTERM, None)
    cb.on_step_end(None, state, control)
    assert control.should_save and control.should_training_stop and cb.stopped_at == 7


def test_attention_fallback_and_vram_notice_on_cpu() -> None:
    import importlib.util

    from supervisor.runner.train import cap_vram, pick_attention

    class W:
        def __init__(self) -> None:
            self.notes: list[str] = []

        def notice(self, m: str) -> None:
            self.notes.append(m)

    w = W()

    if importlib.util.find_spec("flash_attn") is None:
        assert pick_attention("flash_attention_2", w) == "sdpa"
        assert w.notes[-1] == "flash-attn not installed; using sdpa"
    assert pick_attention("eager", w) == "eager"
    r = load_recipe(TINY, ["hardware.emulate_vram_gib=24"])
    import torch

    if not torch.cuda.is_available():
        cap_vram(r, w)
        assert "emulate_vram_gib=24" in w.notes[-1] and "no CUDA" in w.notes[-1]


def test_sft_config_uses_current_names(tmp_path: Path) -> None:
    from supervisor.runner.train import load_context, parse_args, sft_config

    recipe = write_recipe(tmp_path, "train.warmup_ratio=0.1")
    env = {"QLW_RECIPE": str(recipe), "QLW_OUTPUT_DIR": str(tmp_path / "o"), "QLW_EXTERNAL_PRUNE": "1"}
    ctx = load_context(parse_args([]), env)
    cfg = sft_config(ctx)
    assert cfg.max_length == 1024 and cfg.warmup_steps == 0.1 and cfg.save_total_limit is None
    assert cfg.logging_nan_inf_filter is False and cfg.activation_checkpointing is True
    assert cfg.activation_checkpointing_kwargs == {"use_reentrant": False}
    assert cfg.optim == "paged_adamw_8bit" and cfg.report_to == ["tensorboard"]
    ctx = load_context(parse_args(["--output-dir", str(tmp_path / "p")]), {"QLW_RECIPE": str(recipe)})
    assert sft_config(ctx).save_total_limit == 3 and ctx.output_dir == tmp_path / "p"


def test_tiny_build_is_cached_and_has_a_chat_template(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from supervisor.runner.tiny import build_tiny

    r = load_recipe(TINY)
    folder, cached = build_tiny(r.model.tiny, r.data.path, tmp_path)
    assert not cached and (folder / "config.json").is_file()
    assert build_tiny(r.model.tiny, r.data.path, tmp_path) == (folder, True)
    tok = AutoTokenizer.from_pretrained(folder)
    msgs = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 = 5"}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == "<s><|user|>What is 2 + 3?<|end|><|assistant|>2 + 3 = 5<|end|>"
    ids = tok(text)["input_ids"]
    assert tok.unk_token_id not in ids and tok.decode(ids) == text


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
    recipe = write_recipe(tmp_path, "train.max_steps=12", "train.save_steps=4", "train.logging_steps=1",
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
    recipe = write_recipe(tmp_path, "train.max_steps=200", "train.save_steps=100",
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
    recipe = write_recipe(tmp_path)
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
    recipe = write_recipe(tmp_path, "train.max_steps=12", "train.save_steps=2",
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

"""The built-in trainer in-process: data formats, the tiny model, the callback, its settings.
The trainer as a subprocess is tests/e2e/test_trainer.py."""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path
from typing import Any

import pytest

from supervisor.recipe import load_recipe
from supervisor.runner.data import DataError, detect_format, load_records
from tests.support import ROOT, tiny_recipe_json

TINY = ROOT / "recipes" / "tiny.toml"
DATA = ROOT / "recipes" / "data"


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
    from supervisor.runner.settings import pin_one_gpu

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

    recipe = tiny_recipe_json(tmp_path, "train.warmup_ratio=0.1")
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

"""Errors no relaunch can fix end the run at once, after one attempt, with the trainer's message."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support import ROOT, events, qlw, read_state, recipe_file, wait_end


def _garbage_copy(tmp_path: Path, line: int = 201) -> Path:
    lines = (ROOT / "recipes" / "data" / "tiny-chat.jsonl").read_text().splitlines()
    lines[line - 1] = '{"messages": [ this is not json'
    p = tmp_path / "garbage.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_validate_reads_every_data_line_and_names_it(tmp_path: Path) -> None:
    data = _garbage_copy(tmp_path, line=500)  # far past what a quick peek would read
    res = qlw("validate", "recipes/tiny.toml", "--set", f'data.path="{data}"')
    assert res.returncode == 2
    assert f"{data}:500:" in res.stderr and "invalid JSON" in res.stderr and "Traceback" not in res.stderr
    bad_field = tmp_path / "fields.jsonl"
    bad_field.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    res = qlw("validate", "recipes/tiny.toml", "--set", f'data.path="{bad_field}"')
    assert res.returncode == 2 and f"{bad_field}:1:" in res.stderr and "assistant" in res.stderr
    ok = qlw("validate", "recipes/tiny.toml")
    assert ok.returncode == 0 and "512 records" in ok.stdout


def test_max_steps_zero_is_rejected() -> None:
    res = qlw("validate", "recipes/tiny.toml", "--set", "train.max_steps=0")
    assert res.returncode == 2 and "train.max_steps" in res.stderr and "trains nothing" in res.stderr


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_garbage_jsonl_fails_after_exactly_one_attempt(qlw_home: Path, tmp_path: Path) -> None:
    """The real trainer reports file:line; the run is FAILED with that message, not relaunched."""
    data = _garbage_copy(tmp_path)
    res = qlw("start", "recipes/tiny.toml", "--detach", "--set", f'data.path="{data}"',
              "--set", f'train.output_dir="{tmp_path / "out"}"', check=True)
    run_id = res.stdout.strip().splitlines()[-1]
    assert wait_end(run_id, timeout=200) == 1
    st = read_state(qlw_home, run_id)
    assert st["state"] == "failed" and st["attempt"] == 1
    assert "garbage.jsonl:201:" in st["message"] and "invalid JSON" in st["message"]
    assert "not retryable" in st["message"]
    kinds = [e["kind"] for e in events(qlw_home, run_id)]
    assert kinds.count("launch") == 1 and "relaunch" not in kinds
    assert sorted(p.name for p in (qlw_home / "runs" / run_id / "attempts").iterdir()) == ["1"]


@pytest.mark.parametrize("content", [b"[model\n", b"\xff\xfe", b"name = 1\n"])
def test_cli_exits_2_and_starts_nothing(tmp_path: Path, content: bytes) -> None:
    p = recipe_file(tmp_path, content)
    home = tmp_path / "home"
    for cmd in (["validate", str(p)], ["start", str(p), "--detach"], ["preflight", str(p)]):
        res = qlw(*cmd, timeout=60, env={**os.environ, "QLORA_WATCH_HOME": str(home)})
        assert res.returncode == 2, (cmd, res.stderr)
        assert str(p) in res.stderr
    assert not (home / "runs").exists() or not any((home / "runs").iterdir())

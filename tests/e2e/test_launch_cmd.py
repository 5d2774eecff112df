"""How the trainer is launched: one GPU, several GPUs (FSDP-QLoRA), a user's own command."""

from __future__ import annotations

import json
from pathlib import Path

from tests.support import fake_recipe, qlw, read_state


def shaped_8b_recipe(tmp_path: Path, fake_args: list[str], gpu_mem_gib: int, train: str) -> Path:
    """The fake trainer's recipe, estimated as the full 8B shape with these [train] sizes."""
    recipe = fake_recipe(tmp_path, fake_args, extra=f"[hardware]\ngpu_mem_gib = {gpu_mem_gib}\n")
    text = recipe.read_text().replace('name = "fake-model"', 'name = "fake-model"\nshape = "llama-3.1-8b"')
    text = text.replace("[model.tiny]\nhidden_size = 32\nnum_layers = 1\nnum_heads = 2\nnum_kv_heads = 1\n"
                        "intermediate_size = 64\n", "")
    recipe.write_text(text.replace("max_seq_len = 1024\nper_device_batch = 2\ngrad_accum = 4", train))
    return recipe


def test_auto_fit_starts_at_the_first_rung_that_fits(qlw_home: Path, tmp_path: Path) -> None:
    """8B shape at seq 4096 x batch 1 needs ~9.8 GiB; on an 8 GiB card the 768 rung fits."""
    rec = tmp_path / "rec.jsonl"
    recipe = shaped_8b_recipe(tmp_path, ["--steps", "3", "--record", str(rec)], 8,
                              "max_seq_len = 4096\nper_device_batch = 1\ngrad_accum = 8")
    assert qlw("start", str(recipe), "--detach").returncode == 3  # does not fit: refused
    res = qlw("start", str(recipe), "--detach", "--auto-fit", check=True)
    run_id = res.stdout.strip().splitlines()[-1]
    assert "rung 1" in res.stdout
    assert qlw("wait", run_id, "--timeout", "60").returncode == 0
    first = json.loads(rec.read_text().splitlines()[0])
    assert first["max_seq_len"] == 768  # a known OOM is never paid for
    assert read_state(qlw_home, run_id)["rung"] == 1


def test_a_tight_estimate_starts_with_the_margin_said(qlw_home: Path, tmp_path: Path) -> None:
    """The article's 8B batch 8 x 2 x 4096 on a 24 GB card: tight, started (exit 0), not refused."""
    recipe = shaped_8b_recipe(tmp_path, ["--steps", "3"], 24, "max_seq_len = 4096\nper_device_batch = 8\n"
                              "grad_accum = 2\nuse_liger_kernel = true")
    recipe.write_text(recipe.read_text() + '\n[env]\nPYTORCH_CUDA_ALLOC_CONF = "expandable_segments:True"\n')
    pre = qlw("preflight", str(recipe))
    assert pre.returncode == 0 and "Verdict: TIGHT" in pre.stdout
    res = qlw("start", str(recipe), "--detach", check=True)
    assert "qlora-watch: note: the estimate is tight (" in res.stderr and "measured error of 3 %" in res.stderr
    assert "per_device_batch 4 x grad_accum 4" in res.stderr
    run_id = res.stdout.strip().splitlines()[-1]
    assert qlw("wait", run_id, "--timeout", "60").returncode == 0


def test_report_and_rm_from_the_cli(qlw_home: Path, tmp_path: Path) -> None:
    recipe = fake_recipe(tmp_path, ["--steps", "20", "--save-every", "5"])
    run_id = qlw("start", str(recipe), "--detach", check=True).stdout.strip().splitlines()[-1]
    assert qlw("wait", run_id, "--timeout", "60").returncode == 0
    out = tmp_path / "report"
    res = qlw("report", run_id, "--out", str(out), check=True)
    html = (out / "report.html").read_text()
    assert "http://" not in html and "https://" not in html  # opens offline
    assert any(p.stat().st_size > 1000 for p in out.glob("*.png"))
    ls = json.loads(qlw("ls", "--json", check=True).stdout)
    assert ls[0]["state"] == "completed" and ls[0]["last_loss"] is not None and ls[0]["wall_s"] > 0
    assert qlw("rm", run_id).returncode == 2  # no terminal and no --yes: nothing deleted
    assert (qlw_home / "runs" / run_id).exists()
    qlw("rm", run_id, "--yes", check=True)
    assert not (qlw_home / "runs" / run_id).exists()
    assert list((tmp_path / "out").glob("checkpoint-*"))  # checkpoints kept without --checkpoints
    assert res.returncode == 0

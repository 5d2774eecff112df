"""`qlora-watch run -- COMMAND`: any training command under the supervisor (real processes)."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

from supervisor.checkpoints.folders import checkpoint_status
from tests.support import FAKE, ROOT, events, launches, qlw, read_state, wait_end, wait_for

HF_SCRIPT = ROOT / "tests" / "fakes" / "hf_plain_script.py"


def run(*args: str, command: list[str]) -> str:
    res = qlw("run", "--detach", *args, "--", *command)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip().splitlines()[-1]


def status(run_id: str) -> dict:
    return json.loads(qlw("status", run_id, "--json", check=True).stdout)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_plain_hf_trainer_script_oom_ladder_retention_stop_resume(qlw_home: Path, tmp_path: Path) -> None:
    """A plain transformers Trainer script, no qlora-watch import, `--seq-len {max_seq_len}`:
    one CUDA OOM at 1024, relaunch at 768 resuming from its checkpoint; status --json shows its
    steps and loss (from its log lines); retention keeps 2; stop gets a complete checkpoint;
    resume continues it to the end."""
    text = HF_SCRIPT.read_text()
    assert "import supervisor" not in text and "from supervisor" not in text
    out = tmp_path / "hf-out"
    # 32 steps of >= 0.3 s after checkpoint-8: the stop lands mid-run even on a loaded machine (at
    # 24 x 0.1 s it once arrived after the last step, and the resume then had nothing to train)
    cmd = [sys.executable, str(HF_SCRIPT), "--output-dir", str(out), "--max-steps", "40",
           "--save-steps", "4", "--step-sleep", "0.3", "--seq-len", "{max_seq_len}",
           "--oom-above", "768", "--resume", "{resume_from}"]
    run_id = run("--name", "plain-hf", "--output-dir", str(out), "--save-total-limit", "2",
                 "--set", "train.max_seq_len=1024", command=cmd)
    wait_for(lambda: read_state(qlw_home, run_id).get("attempt") == 2, timeout=120, what="the relaunch")
    seen = wait_for(lambda: (lambda d: d if (d.get("step") or 0) >= 6 and d.get("last_loss") else None)(status(run_id)),
                    timeout=90, what="steps and loss in status --json")
    assert seen["state"] == "training" and seen["max_steps"] == 40 and seen["rung"] == 1
    assert 3.0 < seen["last_loss"] < 6.0  # the Trainer's printed loss (log(128) ~ 4.85)
    assert seen["resume_from"].endswith("checkpoint-4")
    evs = events(qlw_home, run_id)
    assert [e["evidence"]["class"] for e in evs if e["kind"] == "trainer_exited"] == ["cuda_oom"]
    assert "seq_len 1024 > 768" in (qlw_home / "runs" / run_id / "trainer.log").read_text()
    wait_for(lambda: (read_state(qlw_home, run_id).get("last_checkpoint_step") or 0) >= 8, timeout=90,
             what="checkpoint-8")
    qlw("stop", run_id, check=True)
    assert wait_end(run_id) == 1
    st = read_state(qlw_home, run_id)
    assert st["state"] == "stopped" and f"qlora-watch resume {run_id}" in st["message"]
    stopped_at = st["last_checkpoint_step"]
    assert 8 <= stopped_at < 40, "the stop must land before the last step for this test to mean anything"
    complete = [c for c in out.glob("checkpoint-*") if checkpoint_status(c).complete]
    assert len(complete) <= 2 and checkpoint_status(out / f"checkpoint-{stopped_at}").complete
    assert any(e["kind"] == "checkpoint_pruned" for e in events(qlw_home, run_id))
    res = qlw("resume", run_id, "--detach")
    assert res.returncode == 0, res.stderr
    assert wait_end(run_id, timeout=120) == 0, qlw("logs", run_id).stdout
    st = read_state(qlw_home, run_id)
    assert st["state"] == "completed" and st["attempt"] == 3 and st["step"] == 40 and st["rung"] == 1
    import sqlite3

    db = sqlite3.connect(qlw_home / "runs" / run_id / "db.sqlite")
    first3 = db.execute("SELECT MIN(step) FROM steps WHERE attempt = 3").fetchone()[0]
    assert first3 == stopped_at + 1  # continued from the checkpoint's step
    assert len([c for c in out.glob("checkpoint-*") if checkpoint_status(c).complete]) <= 2


def test_foreign_oom_through_the_env_var_and_a_trainer_the_ladder_cannot_reach(qlw_home: Path,
                                                                             tmp_path: Path) -> None:
    rec = tmp_path / "rec.jsonl"
    cmd = [sys.executable, str(FAKE), "--steps", "20", "--save-every", "5", "--oom-at", "7",
           "--oom-above-seq", "768", "--seq-from-env", "--no-events", "--record", str(rec)]
    run_id = run("--output-dir", str(tmp_path / "env-out"), "--set", "train.max_seq_len=1024", command=cmd)
    assert wait_end(run_id, timeout=60) == 0
    first, second = launches(rec)
    assert first["qlw_env"]["QLW_MAX_SEQ_LEN"] == "1024" and first["seq"] == 1024
    assert second["qlw_env"]["QLW_MAX_SEQ_LEN"] == "768" and second["qlw_env"]["QLW_RUNG"] == "1"
    assert second["qlw_env"]["QLW_RESUME_FROM"].endswith("checkpoint-5")
    assert second["qlw_env"]["QLW_ATTEMPT"] == "2"
    assert "QLW_LORA_R" not in first["qlw_env"]  # never invented: the script's own default stands
    assert read_state(qlw_home, run_id)["last_checkpoint_step"] == 20  # found by scanning

    # A command that reads no setting: one OOM, and the ladder says why it cannot help.
    oom = ("import sys; sys.stderr.write('Traceback (most recent call last):\\n"
           "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\\n'); sys.exit(1)")
    run_id = run("--output-dir", str(tmp_path / "deaf-out"), command=[sys.executable, "-c", oom])
    assert wait_end(run_id, timeout=60) == 1
    st = read_state(qlw_home, run_id)
    assert st["state"] == "failed" and st["attempt"] == 1
    assert "cannot help" in st["message"] and "--oom-relaunch-unchanged" in st["message"]
    run_id = run("--output-dir", str(tmp_path / "deaf2-out"), "--oom-relaunch-unchanged",
                 "--set", "guards.crash.backoff_base_s=0.05", "--set", "guards.crash.max_restarts=1",
                 command=[sys.executable, "-c", oom])
    assert wait_end(run_id, timeout=60) == 1
    st = read_state(qlw_home, run_id)
    assert st["attempt"] == 2 and "crash loop" in st["message"]  # relaunched unchanged, as allowed


AXOLOTL_YAML = """\
base_model: NousResearch/Meta-Llama-3.1-8B
adapter: qlora
load_in_4bit: true
datasets:
  - path: data.jsonl
    type: chat_template
sequence_len: 2048
sample_packing: true
lora_r: 16
lora_alpha: 32
lora_target_modules:
  - q_proj
  - k_proj
  - v_proj
micro_batch_size: 2
gradient_accumulation_steps: 4
output_dir: ./somewhere-else
resume_from_checkpoint:
"""


def test_axolotl_config_is_rewritten_per_attempt(qlw_home: Path, tmp_path: Path) -> None:
    """Each attempt runs a copy of the config with its rung's values (axolotl's key names)."""
    import yaml

    cfg = tmp_path / "qlora.yml"
    cfg.write_text(AXOLOTL_YAML)
    rec = tmp_path / "rec.jsonl"
    out = tmp_path / "ax-out"
    cmd = [sys.executable, str(FAKE), "train", str(cfg), "--steps", "12", "--save-every", "5",
           "--oom-at", "7", "--once-file", str(tmp_path / "once"), "--record", str(rec)]
    run_id = run("--output-dir", str(out), "--ladder", "train.max_seq_len=1024",
                 "--ladder", "lora.r=8", command=cmd)
    assert wait_end(run_id, timeout=60) == 0
    first, second = launches(rec)
    a1 = yaml.safe_load(Path(first["argv"][2]).read_text())
    a2 = yaml.safe_load(Path(second["argv"][2]).read_text())
    assert Path(first["argv"][2]) == qlw_home / "runs" / run_id / "attempts" / "1" / "axolotl-qlora.yml"
    assert (a1["sequence_len"], a1["lora_r"], a1["resume_from_checkpoint"]) == (2048, 16, None)
    assert a1["output_dir"] == str(out) and a1["datasets"] == yaml.safe_load(AXOLOTL_YAML)["datasets"]
    assert (a2["sequence_len"], a2["lora_r"]) == (1024, 16)
    assert a2["resume_from_checkpoint"].endswith("checkpoint-5")
    assert a2["micro_batch_size"] == 2 and a2["gradient_accumulation_steps"] == 4
    assert a2["lora_target_modules"] == ["q_proj", "k_proj", "v_proj"]
    assert yaml.safe_load(cfg.read_text())["sequence_len"] == 2048  # the user's file is untouched
    assert any(e["kind"] == "config_rewritten" for e in events(qlw_home, run_id))


def test_stop_signal_no_adapter_warning_and_a_trainer_only_recipe(qlw_home: Path, tmp_path: Path) -> None:
    sigs = tmp_path / "signals.txt"
    cmd = [sys.executable, str(FAKE), "--steps", "400", "--save-every", "5", "--step-time", "0.05",
           "--stop-on-sigint", "--record-signals", str(sigs), "--no-adapter", "--no-events"]
    run_id = run("--output-dir", str(tmp_path / "sig-out"), "--stop-signal", "SIGINT", command=cmd)
    wait_for(lambda: any(e["kind"] == "checkpoint_no_adapter" for e in events(qlw_home, run_id)),
             timeout=30, what="the no-adapter warning")
    qlw("stop", run_id, check=True)
    assert wait_end(run_id) == 1
    assert sigs.read_text().split()[0] == "SIGINT"
    evs = events(qlw_home, run_id)
    assert [e["kind"] for e in evs].count("checkpoint_no_adapter") == 1  # said once
    assert any(e["kind"] == "stop" and "SIGINT sent" in e["message"] for e in evs)
    assert read_state(qlw_home, run_id)["exit_code"] == 0  # it saved and exited on SIGINT

    recipe = tmp_path / "mine.toml"
    recipe.write_text(textwrap.dedent(f"""
        name = "mine"
        [trainer]
        command = {json.dumps([sys.executable, str(FAKE), "--steps", "6", "--save-every", "3"])}
        output_dir = "{tmp_path / 'toml-out'}"
        save_total_limit = 1
    """))
    assert qlw("validate", str(recipe)).returncode == 0
    run_id = qlw("start", str(recipe), "--detach", check=True).stdout.strip().splitlines()[-1]
    assert wait_end(run_id, timeout=60) == 0
    assert [p.name for p in (tmp_path / "toml-out").glob("checkpoint-*")] == ["checkpoint-6"]


def test_run_refuses_bad_input_with_one_line(qlw_home: Path, tmp_path: Path) -> None:
    res = qlw("run", "--output-dir", str(tmp_path / "o"), "--", "python", "t.py", "--len", "{max_seq_len}")
    assert res.returncode == 2 and "--set train.max_seq_len=" in res.stderr and "Traceback" not in res.stderr
    res = qlw("run", "--output-dir", str(tmp_path / "o"))
    assert res.returncode == 2 and "give the command after --" in res.stderr
    res = qlw("run", "--output-dir", str(tmp_path / "o"), "--ladder", "train.max_seq_lenn=768", "--", "x")
    assert res.returncode == 2 and "oom_ladder[0]" in res.stderr
    assert not (qlw_home / "runs").exists() or not list((qlw_home / "runs").iterdir())


def test_callback_and_settings_need_only_transformers(tmp_path: Path) -> None:
    """In a user's script: importing the callback and the settings helper pulls in none of the
    supervisor's own dependencies (pydantic, psutil, textual...), only transformers."""
    code = textwrap.dedent("""
        import importlib.abc, sys
        BANNED = ("textual", "pynvml", "apprise", "platformdirs")  # ours, not transformers' deps
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in BANNED:
                    raise ImportError(f"{name} is not installed here")
        sys.meta_path.insert(0, Block())
        from supervisor.runner import QloraWatchCallback, effective_settings
        cb = QloraWatchCallback(events_path=sys.argv[1])
        s = effective_settings()
        cb.writer.phase("training")
        print("ok", s["attempt"], sorted(m for m in sys.modules if m.split(".")[0] == "supervisor"))
    """)
    import subprocess

    res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "ev.jsonl")], capture_output=True,
                         text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split(" ", 2)[:2] == ["ok", "1"], res.stdout
    loaded = json.loads(res.stdout.split(" ", 2)[2].replace("'", '"'))
    assert set(loaded) <= {"supervisor", "supervisor.runner", "supervisor.runner.callback",
                           "supervisor.runner.settings"}  # none of the core (pydantic, psutil users)
    assert json.loads((tmp_path / "ev.jsonl").read_text().splitlines()[0])["phase"] == "training"

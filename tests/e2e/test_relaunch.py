"""Guards acting for real: the supervisor, real processes, the scripted fake trainer."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from tests.support import events, fake_recipe, launches, qlw, read_state, start, wait_for


def test_cuda_oom_relaunches_at_768_and_resumes(qlw_home: Path, tmp_path: Path) -> None:
    rec = tmp_path / "record.jsonl"
    recipe = fake_recipe(tmp_path, ["--steps", "60", "--save-every", "10", "--oom-at", "35",
                                    "--oom-above-seq", "768", "--record", str(rec)])
    run_id = start(recipe, force=False)
    assert qlw("wait", run_id, "--timeout", "90").returncode == 0
    first, second = launches(rec)
    assert first["max_seq_len"] == 1024 and first["resume"] is None
    assert second["max_seq_len"] == 768 and second["resume"].endswith("checkpoint-30")
    # the effective batch is kept across the relaunch
    assert first["per_device_batch"] * first["grad_accum"] == second["per_device_batch"] * second["grad_accum"]
    st = read_state(qlw_home, run_id)
    assert st["state"] == "completed" and st["attempt"] == 2 and st["rung"] == 1
    assert "max_seq_len 1024 -> 768" in st["rung_desc"]
    evs = events(qlw_home, run_id)
    assert any(e["kind"] == "trainer_exited" and "CUDA" in e["message"] for e in evs)
    assert any(e["kind"] == "relaunch" for e in evs)


def test_oom_on_every_rung_fails_with_a_message(qlw_home: Path, tmp_path: Path) -> None:
    rec = tmp_path / "record.jsonl"
    recipe = fake_recipe(tmp_path, ["--steps", "60", "--save-every", "2", "--oom-at", "5",
                                    "--record", str(rec)])
    run_id = start(recipe, force=False)
    assert qlw("wait", run_id, "--timeout", "90").returncode == 1
    st = read_state(qlw_home, run_id)
    assert st["state"] == "failed"
    assert "CUDA OOM" in st["message"] and "minimum" in st["message"]
    runs = launches(rec)
    assert [(r["max_seq_len"], r["lora_r"]) for r in runs] == [(1024, 16), (768, 16), (768, 8), (768, 8)]
    assert runs[1]["resume"] is not None  # same shapes: resumes
    assert runs[2]["resume"] is None and runs[3]["resume"] is None  # new shapes: fresh attempts
    assert runs[2]["output_dir"] != runs[0]["output_dir"]  # in a folder of its own
    assert list(Path(runs[0]["output_dir"]).glob("checkpoint-*"))  # earlier checkpoints kept
    time.sleep(1.0)
    assert len(launches(rec)) == 4  # no further launches


def test_oom_before_any_checkpoint_starts_fresh(qlw_home: Path, tmp_path: Path) -> None:
    rec = tmp_path / "record.jsonl"
    recipe = fake_recipe(tmp_path, ["--steps", "20", "--save-every", "10", "--oom-at", "3",
                                    "--oom-above-seq", "768", "--record", str(rec)])
    run_id = start(recipe, force=False)
    assert qlw("wait", run_id, "--timeout", "60").returncode == 0
    runs = launches(rec)
    assert len(runs) == 2 and runs[1]["resume"] is None and runs[1]["max_seq_len"] == 768


def test_sigkill_without_oom_kill_delta_is_killed_by_signal_9(qlw_home: Path, tmp_path: Path) -> None:
    """The kernel's oom_kill count did not move: "killed by signal 9", not "possible host OOM"
    (issue #14); relaunched by the generic policy, and counted in `restarts`."""
    rec = tmp_path / "record.jsonl"
    recipe = fake_recipe(tmp_path, ["--steps", "100000", "--step-time", "0.02", "--save-every", "20",
                                    "--record", str(rec)])
    run_id = start(recipe, force=False)
    wait_for(lambda: (read_state(qlw_home, run_id).get("step") or 0) > 25, what="steps")
    pid = launches(rec)[0]["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: len(launches(rec)) == 2, timeout=30, what="a relaunch")
    exited = [e["message"] for e in events(qlw_home, run_id) if e["kind"] == "trainer_exited"]
    assert "killed by signal 9" in exited[0] and "OOM" not in exited[0], exited
    assert "CUDA" not in exited[0]
    st = read_state(qlw_home, run_id)
    assert st["restarts"] == 1  # the relaunch the report counts
    assert __import__("json").loads(qlw("status", run_id, "--json", check=True).stdout)["restarts"] == 1
    assert launches(rec)[1]["max_seq_len"] == 1024  # the generic policy: same rung, no ladder
    qlw("stop", run_id, "--now", check=True)
    qlw("wait", run_id, "--timeout", "30")


def test_killed_mid_save_is_neither_resumed_nor_counted(qlw_home: Path, tmp_path: Path) -> None:
    rec = tmp_path / "record.jsonl"
    out = tmp_path / "out"
    recipe = fake_recipe(tmp_path, ["--steps", "40", "--step-time", "0.02", "--save-every", "10",
                                    "--save-slowly", "0.6", "--record", str(rec),
                                    "--once-file", str(tmp_path / "once")])
    run_id = start(recipe, force=False)
    # wait for checkpoint-20 to be half written: adapter present, trainer_state.json not yet
    wait_for(lambda: (out / "checkpoint-20" / "adapter_model.safetensors").exists(), what="mid-save")
    assert not (out / "checkpoint-20" / "trainer_state.json").exists()
    os.kill(launches(rec)[0]["pid"], signal.SIGKILL)
    assert qlw("wait", run_id, "--timeout", "60").returncode == 0
    second = launches(rec)[1]
    assert second["resume"].endswith("checkpoint-10")
    assert list(out.glob("checkpoint-20.incomplete-*")) or (out / "checkpoint-20" / "trainer_state.json").exists()


def test_stale_checkpoint_from_another_run_is_never_preferred(qlw_home: Path, tmp_path: Path) -> None:
    rec = tmp_path / "record.jsonl"
    out = tmp_path / "out"
    recipe = fake_recipe(tmp_path, ["--steps", "40", "--step-time", "0.05", "--save-every", "10",
                                    "--oom-at", "25", "--oom-above-seq", "768", "--record", str(rec)])
    run_id = start(recipe, force=False)
    wait_for(lambda: (out / "checkpoint-10" / "trainer_state.json").exists(), what="checkpoint-10")
    stale = out / "checkpoint-5000"  # complete, but written by someone else
    stale.mkdir()
    header = b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    (stale / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    (stale / "trainer_state.json").write_text(json.dumps({"global_step": 5000}))
    assert qlw("wait", run_id, "--timeout", "60").returncode == 0
    assert launches(rec)[1]["resume"].endswith("checkpoint-20")


def test_nan_stops_the_run_as_diverged(qlw_home: Path, tmp_path: Path) -> None:
    recipe = fake_recipe(tmp_path, ["--steps", "1000", "--step-time", "0.03", "--save-every", "10",
                                    "--nan-from", "25"])
    run_id = start(recipe, force=False)
    assert qlw("wait", run_id, "--timeout", "60").returncode == 1
    st = read_state(qlw_home, run_id)
    assert st["state"] == "diverged"
    assert "checkpoint-20" in st["message"], st["message"]


def test_a_hang_is_handled_as_a_stall(qlw_home: Path, tmp_path: Path) -> None:
    rec = tmp_path / "record.jsonl"
    recipe = fake_recipe(
        tmp_path,
        ["--steps", "30", "--step-time", "0.02", "--save-every", "5", "--hang-at", "12",
         "--record", str(rec), "--once-file", str(tmp_path / "once")],
        extra="[guards.stall]\nfloor_s = 2\nstep_factor = 3\n",
    )
    run_id = start(recipe, force=False)
    assert qlw("wait", run_id, "--timeout", "90").returncode == 0
    runs = launches(rec)
    assert len(runs) == 2 and runs[1]["resume"].endswith("checkpoint-10")
    assert any(e["kind"] == "relaunch" and "stalled" in e["message"] for e in events(qlw_home, run_id))


def test_crash_loop_backs_off_then_fails(qlw_home: Path, tmp_path: Path) -> None:
    rec = tmp_path / "record.jsonl"
    recipe = fake_recipe(tmp_path, ["--steps", "10", "--crash-at", "1", "--record", str(rec)])
    run_id = start(recipe, force=False)
    assert qlw("wait", run_id, "--timeout", "60").returncode == 1
    st = read_state(qlw_home, run_id)
    assert st["state"] == "failed" and "fake crash" in st["message"]
    assert len(launches(rec)) == 4  # 1 + max_restarts 3
    db = sqlite3.connect(qlw_home / "runs" / run_id / "db.sqlite")
    delays = [json.loads(r[0])["delay_s"] for r in
              db.execute("SELECT evidence FROM events WHERE kind='relaunch' ORDER BY id")]
    assert delays == [0.05, 0.1, 0.2]  # exponential, capped at backoff_max_s
    time.sleep(1.0)
    assert len(launches(rec)) == 4  # no further launches


class _Hook(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server API
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        _Hook.received.append(json.loads(body or b"{}"))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *a: object) -> None:
        pass


@pytest.fixture
def webhook():
    _Hook.received = []
    srv = HTTPServer(("127.0.0.1", 0), _Hook)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    yield f"json://127.0.0.1:{srv.server_address[1]}/hook", _Hook.received
    srv.shutdown()


def test_notifier_reaches_a_local_endpoint(webhook) -> None:
    from supervisor.sinks.notify import Notifier

    url, received = webhook
    n = Notifier([url], ["completed"], "amber-falcon")
    assert n.send("qlora-watch amber-falcon: completed", "token hf_" + "a" * 34 + " done")
    wait_for(lambda: received, timeout=20, what="the webhook")
    n.close()
    assert "amber-falcon" in received[0]["title"]
    assert "hf_aaaa" not in received[0]["message"]  # redacted


def test_run_completion_is_notified(qlw_home: Path, tmp_path: Path, webhook) -> None:
    url, received = webhook
    recipe = fake_recipe(tmp_path, ["--steps", "5"], extra=f'[notify]\nurls = ["{url}"]\n')
    run_id = start(recipe, force=False)
    assert qlw("wait", run_id, "--timeout", "60").returncode == 0
    wait_for(lambda: any("completed" in r.get("title", "") for r in received), timeout=20,
             what="the completion notification")


def test_prelaunch_host_ram_warning_is_recorded(qlw_home: Path, tmp_path: Path) -> None:
    """Before launch, the estimate's host-RAM need is compared with what is available."""
    recipe = fake_recipe(tmp_path, ["--steps", "3"], extra="[guards.host_ram]\nmin_available_gib = 100000\n")
    run_id = start(recipe)
    assert qlw("wait", run_id, "--timeout", "60").returncode == 0
    msgs = [e["message"] for e in events(qlw_home, run_id) if e["kind"] == "guard" and e["level"] == "warning"]
    assert any(m.startswith("host RAM: the trainer needs about") for m in msgs), msgs

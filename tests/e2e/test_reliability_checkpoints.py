"""RELIABILITY_PLAN C: checkpoints and retention, at the supervisor level.

The folder-level rows are covered in tests/unit/test_checkpoints.py (C2, C3, C4 hypothesis, C6,
C7 symlinks and swaps, C8 EACCES as nobody) and tests/e2e/test_relaunch.py (C1); see
docs/reliability.md. Here: what the running supervisor does with them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from pathlib import Path

import pytest

from tests.support import (
    FAKE,
    events,
    fake_recipe,
    launches,
    make_ckpt,
    qlw,
    run_in_tmpfs,
    start,
    stop_now,
    supervisor_pid,
    wait_end,
    wait_for,
    wait_step,
)

pytestmark = pytest.mark.timeout(90)
# ------------------------------------------------------------------------------ C3


def test_c3_incomplete_checkpoint_reason_is_an_event(tmp_path: Path) -> None:
    """A `checkpoint` event for a corrupt folder: a warning naming the reason (shown in the
    TUI's events), never counted as progress."""
    from supervisor.daemon.trainer_events import TrainerEvents
    from supervisor.store import RunStore
    from tests.support.runio import memory_io

    recorded: list[tuple[str, str, str]] = []
    io = memory_io(RunStore(tmp_path / "r1"), {"restarts_since_progress": 2}, recorded)
    runner = TrainerEvents(io, recipe=None, tb=None, mark_time=lambda t: None, output_dir=lambda: tmp_path)
    bad = make_ckpt(tmp_path, 40, adapter="tensor")
    (bad / "trainer_state.json").write_text(json.dumps({"global_step": 39}))
    runner.on_trainer_event({"event": "checkpoint", "step": 40, "path": str(bad)})
    assert recorded == [("checkpoint_incomplete", "checkpoint-40: global_step 39 != 40", "warning")]
    assert io.status.restarts_since_progress == 2 and io.status.last_checkpoint is None
    good = make_ckpt(tmp_path, 50, adapter="tensor")
    runner.on_trainer_event({"event": "checkpoint", "step": 50, "path": str(good)})
    assert recorded[-1][0] == "checkpoint_saved" and io.status.restarts_since_progress == 0


# ------------------------------------------------------------------------------ C5


def test_c5_start_refuses_an_output_dir_with_another_runs_checkpoints(qlw_home: Path, tmp_path: Path) -> None:
    recipe = fake_recipe(tmp_path, ["--steps", "5"])
    make_ckpt(tmp_path / "out", 5000, adapter="tensor")
    res = qlw("start", str(recipe), "--detach", "--force")
    assert res.returncode == 2
    assert "holds checkpoint-5000 from no qlora-watch run" in res.stderr and "refusing to mix runs" in res.stderr
    assert not (qlw_home / "runs").exists() or not list((qlw_home / "runs").iterdir())


# ------------------------------------------------------------------------------ C7


def test_c7_swapped_output_dir_stops_retention(qlw_home: Path, tmp_path: Path) -> None:
    """The output dir is replaced by another folder mid-run: the supervisor notices that it is
    not the folder this run opened (st_dev/st_ino) and deletes nothing in it."""
    out = tmp_path / "out"
    recipe = fake_recipe(tmp_path, ["--steps", "100000", "--step-time", "0.03", "--save-every", "5"])
    run_id = start(recipe)
    wait_for(lambda: (out / "checkpoint-5" / "trainer_state.json").exists(), what="checkpoint-5")
    out.rename(tmp_path / "out-moved")
    out.mkdir()
    canaries = [make_ckpt(out, s, adapter="tensor") for s in (1, 2, 3, 4)]  # someone else's, unmarked
    wait_for(lambda: any(e["kind"] == "prune_failed" for e in events(qlw_home, run_id)), timeout=30,
             what="a refused prune")
    failed = [e for e in events(qlw_home, run_id) if e["kind"] == "prune_failed"]
    assert "not the one this run opened" in failed[0]["message"]
    stop_now(run_id)
    assert all((c / "trainer_state.json").exists() for c in canaries)


# ------------------------------------------------------------------------------ C8 + C11


UNDELETABLE = r"""
import json, os, signal, subprocess, sys, time
from pathlib import Path
from tests.support import fake_recipe, qlw, read_state, wait_for
from tests.support import events, kinds, supervisor_pid
mnt = Path(sys.argv[0]).parent / "mnt"
home = Path(os.environ["QLORA_WATCH_HOME"])
out = mnt / "out"
recipe = fake_recipe(mnt, ["--steps", "100000", "--step-time", "0.05", "--save-every", "10"])
run_id = qlw("start", str(recipe), "--detach", "--force", "--set", "guards.checkpoints.min_free_gib=0",
             check=True).stdout.split()[-1]
wait_for(lambda: (out / "checkpoint-10" / "trainer_state.json").exists(), what="checkpoint-10")
locked = out / "checkpoint-10" / "pinned"
locked.mkdir()
subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=4k", "tmpfs", str(locked)], check=True)
wait_for(lambda: "prune_failed" in kinds(home, run_id), timeout=40, what="prune failure")
time.sleep(1.5)  # guards run every second: a failure must not be re-announced every tick
res = {"events1": events(home, run_id), "entries1": sorted(os.listdir(out)),
       "state1": read_state(home, run_id)["state"],
       "audit": [json.loads(x) for x in (home / "runs" / run_id / "deletions.log").read_text().splitlines()]}
pending = [n for n in os.listdir(out) if n.startswith("checkpoint-10.deleting-")]
subprocess.run(["umount", str(out / pending[0] / "pinned")], check=True)
os.kill(supervisor_pid(home, run_id), signal.SIGKILL)
qlw("status", run_id, check=True)  # the user's next command restarts the supervisor
wait_for(lambda: not [n for n in os.listdir(out) if ".deleting-" in n], timeout=20, what="finished")
res["events2"] = events(home, run_id)
qlw("stop", run_id, "--now")
res["wait"] = qlw("wait", run_id, "--timeout", "30").returncode
print(json.dumps(res))
"""


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare")
def test_c8_c11_undeletable_checkpoint_is_reported_then_finished_on_restart(qlw_home: Path, tmp_path: Path) -> None:
    """checkpoint-10 holds a busy mount point, so its delete fails (EBUSY) even for root. The
    prune failure is one event, the checkpoint is not reported deleted, the supervisor goes
    on. The half-done delete is left as checkpoint-10.deleting-<ts> (never resumable); the
    next supervisor start finishes it once it can. (As nobody: tests/unit/test_checkpoints.py.)"""
    got = run_in_tmpfs(tmp_path / "mnt", "64m", UNDELETABLE)
    failed = [e for e in got["events1"] if e["kind"] == "prune_failed"]
    assert len(failed) == 1 and "EBUSY" in failed[0]["message"], failed
    assert not any(e["kind"] == "checkpoint_pruned" and "checkpoint-10 " in e["message"]
                   for e in got["events1"])
    assert [n for n in got["entries1"] if n.startswith("checkpoint-10.deleting-")]
    assert "checkpoint-10" not in got["entries1"]
    assert got["state1"] in ("training", "saving")
    assert any(a["name"] == "checkpoint-10" and not a["deleted"] and a["pending"] for a in got["audit"])
    assert any(e["kind"] == "checkpoint_pruned" and "interrupted delete of checkpoint-10.deleting" in e["message"]
               for e in got["events2"])
    assert got["wait"] == 1


def test_c11_sigkill_mid_delete_leaves_nothing_resumable(tmp_path: Path) -> None:
    """SIGKILL during phase 2 of a slow delete (a checkpoint of 20,000 files): what remains is
    a `.deleting-` folder that nothing resumes from or counts; finishing it removes it."""
    from supervisor.checkpoints.folders import (
        finish_pending_deletes,
        newest_complete,
        safe_delete,
        scan,
    )

    out = tmp_path / "out"
    make_ckpt(out, 10, files=20000, adapter="tensor")
    make_ckpt(out, 20, adapter="tensor")
    pid = os.fork()
    if pid == 0:
        try:
            safe_delete(out, ["checkpoint-10"], None)
        finally:
            os._exit(0)
    wait_for(lambda: any(".deleting-" in n for n in os.listdir(out)), timeout=20, interval=0.001,
             what="phase 1 (rename)")
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    names = os.listdir(out)
    pending = [n for n in names if ".deleting-" in n]
    assert len(pending) == 1 and "checkpoint-10" not in names
    if os.path.exists(out / pending[0]):
        assert len(os.listdir(out / pending[0])) < 20003  # it was killed part-way (usually)
    assert [i.name for i in scan(out)] == ["checkpoint-20"]
    assert newest_complete(out).name == "checkpoint-20"
    results = finish_pending_deletes(out)
    assert all(r.deleted for r in results) and os.listdir(out) == ["checkpoint-20"]


def test_c11_supervisor_restart_finishes_pending_deletes(qlw_home: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    recipe = fake_recipe(tmp_path, ["--steps", "100000", "--step-time", "0.03", "--save-every", "5"])
    run_id = start(recipe)
    wait_step(qlw_home, run_id, 3)
    os.kill(supervisor_pid(qlw_home, run_id), signal.SIGKILL)
    # what a SIGKILL between phase 1 and the end of phase 2 leaves behind
    half = make_ckpt(out, 2, files=50, adapter="tensor").rename(out / "checkpoint-2.deleting-1700000000000000")
    for f in list(half.iterdir())[:20]:
        f.unlink()
    qlw("status", run_id, check=True)
    wait_for(lambda: not half.exists(), timeout=20, what="the pending delete finished")
    assert any(e["kind"] == "checkpoint_pruned" and "checkpoint-2.deleting" in e["message"]
               for e in events(qlw_home, run_id))
    stop_now(run_id)


# ------------------------------------------------------------------------------ C9


def test_c9_one_retention_owner(qlw_home: Path, tmp_path: Path) -> None:
    """qlora-watch owns deletion: the trainer is told so (QLW_EXTERNAL_PRUNE=1, and the built-in
    trainer then passes save_total_limit=None); a second `keep` knob does not exist."""
    from supervisor.recipe import RecipeError, load_recipe

    rec = tmp_path / "rec.jsonl"
    recipe = fake_recipe(tmp_path, ["--steps", "30", "--step-time", "0.01", "--save-every", "5",
                                    "--record", str(rec)])
    run_id = start(recipe)
    assert wait_end(run_id, 30) == 0
    assert launches(rec)[0]["qlw_env"]["QLW_EXTERNAL_PRUNE"] == "1"
    assert sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*")) == [
        "checkpoint-20", "checkpoint-25", "checkpoint-30"]
    src = (FAKE.parents[2] / "supervisor" / "runner" / "train.py").read_text()
    assert re.search(r"save_total_limit=None if ctx\.external_prune", src)
    for extra in ("[guards.checkpoints]\nkeep = 3\n", "[guards.checkpoints]\nsave_total_limit = 3\n"):
        bad = tmp_path / "two-owners.toml"
        bad.write_text(recipe.read_text().replace("[guards.crash]", extra + "[guards.crash]"))
        with pytest.raises(RecipeError, match="unknown key"):
            load_recipe(bad)


# ------------------------------------------------------------------------------ C10


DISK_FULL = r"""
import json, os, subprocess, sys, time
from pathlib import Path
from tests.support import fake_recipe, qlw, read_state
mnt = Path(sys.argv[0]).parent / "{mnt}"
home = Path(os.environ["QLORA_WATCH_HOME"])
(mnt / "w").mkdir()
recipe = fake_recipe(mnt / "w", {args})
text = recipe.read_text().replace('output_dir = "' + str(mnt / "w" / "out"),
                                  'output_dir = "' + str(mnt / "out"))
recipe.write_text(text + {extra!r})
res = qlw("start", str(recipe), "--detach", "--force", check=True)
run_id = res.stdout.split()[-1]
w = qlw("wait", run_id, "--timeout", "60", timeout=90)
st = read_state(home, run_id)
import sqlite3
db = sqlite3.connect(home / "runs" / run_id / "db.sqlite")
evs = [r for r in db.execute("SELECT kind, message FROM events ORDER BY id")]
from supervisor.checkpoints.folders import newest_complete, scan
newest = newest_complete(mnt / "out")
print(json.dumps({{"wait": w.returncode, "state": st, "events": evs,
                  "newest": newest.name if newest else None,
                  "complete": [i.name for i in scan(mnt / "out") if i.complete],
                  "entries": sorted(os.listdir(mnt / "out"))}}))
"""


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare")
def test_c10_enospc_during_a_save_is_disk_full_and_not_retried(qlw_home: Path, tmp_path: Path) -> None:
    """Output dir on a 1 MiB tmpfs, 300 KB checkpoints, the disk guard (and with it retention)
    off: the trainer dies with ENOSPC mid-save. Classified disk_full, FAILED, no relaunch, the
    complete checkpoints kept; the cut one is never the newest complete."""
    mnt = tmp_path / "mnt"
    script = DISK_FULL.format(mnt="mnt", args=["--steps", "1000", "--step-time", "0.01", "--save-every", "5",
                                               "--ckpt-bytes", "300000"],
                              extra="\n[guards.checkpoints]\nenabled = false\n")
    got = run_in_tmpfs(mnt, "1m", script)
    st = got["state"]
    assert got["wait"] == 1 and st["state"] == "failed", st
    assert "disk_full" in st["message"] and "not retryable" in st["message"]
    assert [k for k, _ in got["events"]].count("launch") == 1
    assert not [k for k, _ in got["events"] if k == "relaunch"]
    assert got["newest"] is not None and got["complete"]  # kept
    cut = [n for n in got["entries"] if n.startswith("checkpoint-") and n not in got["complete"]]
    step = lambda n: int(n.split("-")[1])  # noqa: E731
    assert cut and max(map(step, cut)) > step(got["newest"])  # the cut save is not the newest complete
    named = re.search(r"newest complete: (checkpoint-\d+)", st["message"])
    if named:  # (when the disk filled before the supervisor could mark any, none is named)
        assert named.group(1) in got["complete"]


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare")
def test_c10_disk_guard_stops_before_the_disk_fills(qlw_home: Path, tmp_path: Path) -> None:
    """The same disk with the checkpoint guard on: retention keeps 3 and the run stops itself,
    gracefully and with a final complete checkpoint, before a save could hit ENOSPC."""
    mnt = tmp_path / "mnt"
    script = DISK_FULL.format(mnt="mnt", args=["--steps", "1000", "--step-time", "0.1", "--save-every", "15",
                                               "--ckpt-bytes", "200000"],
                              extra="\n[guards.checkpoints]\nmin_free_gib = 0.0002\n")
    got = run_in_tmpfs(mnt, "1m", script)
    st = got["state"]
    assert got["wait"] == 1 and st["state"] == "stopped", (st, got["events"])
    assert "stopping before the disk fills" in st["message"]
    assert not [k for k, _ in got["events"] if k in ("relaunch", "failed")]
    assert got["newest"] is not None and len(got["complete"]) <= 3

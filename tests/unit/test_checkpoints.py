"""Checkpoints on a real filesystem: completeness, run markers, retention, safe deletion."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor.checkpoints.folders import (
    OutputDirError,
    SafeDir,
    adopt_checkpoints,
    best_checkpoint,
    checkpoint_status,
    claim_output_dir,
    dir_size,
    finish_pending_deletes,
    mark_checkpoint,
    newest_complete,
    output_dir_owner,
    quarantine,
    safe_delete,
    scan,
)
from supervisor.checkpoints.plan import CheckpointInfo, in_progress, newest_complete_of, prune_plan
from tests.support import NOBODY, as_nobody, make_ckpt

# ---------------------------------------------------------------------------- completeness


@pytest.mark.parametrize("kw, reason", [
    ({}, None),
    ({"adapter": "bin"}, None),
    ({"state": "missing"}, "trainer_state.json missing (killed mid-save?)"),
    ({"state": "truncated"}, "trainer_state.json truncated or not JSON"),
    ({"global_step": 90}, "global_step 90 != 100"),
    ({"sentinel": True}, "checkpoint-is-incomplete.txt present (save did not finish)"),
    ({"adapter": "truncated"}, "adapter header truncated"),
    ({"adapter": "badjson"}, "adapter header is not valid JSON"),
    ({"adapter": "emptybin"}, "adapter_model.bin is empty"),
    ({"adapter": None}, "adapter_model.safetensors missing"),
    ({"adapter": "fsdp"}, None),  # multi-GPU: shards, no adapter file (seen on the H200 pair)
    ({"adapter": "fsdp-unfinished"}, "pytorch_model_fsdp_0/.metadata missing (sharded save did not finish)"),
    ({"adapter": "fsdp-empty"}, "pytorch_model_fsdp_0/.metadata is empty or not a file"),
])
def test_checkpoint_status(tmp_path, kw, reason):
    info = checkpoint_status(make_ckpt(tmp_path, 100, **kw))
    assert info.step == 100 and info.reason == reason and info.complete is (reason is None)
    assert info.size_bytes > 1000 and info.mtime > 0


def test_tiny_adapter_file_is_truncated(tmp_path):
    d = make_ckpt(tmp_path, 5)
    (d / "adapter_model.safetensors").write_bytes(b"\1\2\3")
    assert checkpoint_status(d).reason == "adapter header truncated"


def test_inner_symlink_is_not_followed(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    d = make_ckpt(tmp_path / "out", 3, state="missing")
    (d / "trainer_state.json").symlink_to(outside / "trainer_state.json")
    info = checkpoint_status(d)
    assert not info.complete and info.reason == "trainer_state.json is a symlink"


def test_scan_numeric_order_and_only_direct_checkpoint_dirs(tmp_path):
    for s in (10000, 9900, 500):
        make_ckpt(tmp_path, s)
    (tmp_path / "checkpoint-abc").mkdir()
    (tmp_path / "checkpoint-7.tmp").mkdir()
    (tmp_path / "runs").mkdir()
    make_ckpt(tmp_path / "runs", 99999)  # nested: not ours to list
    (tmp_path / "checkpoint-42").write_text("a file")
    infos = scan(tmp_path)
    assert [i.name for i in infos] == ["checkpoint-42", "checkpoint-500", "checkpoint-9900", "checkpoint-10000"]
    assert infos[0].reason == "not a folder"
    assert newest_complete(tmp_path).name == "checkpoint-10000"


def test_symlinked_checkpoint_reported_not_followed(tmp_path):
    canary = make_ckpt(tmp_path / "elsewhere", 7)
    out = tmp_path / "out"
    out.mkdir()
    make_ckpt(out, 5)
    (out / "checkpoint-7").symlink_to(canary)
    infos = {i.name: i for i in scan(out)}
    assert infos["checkpoint-7"].complete is False and infos["checkpoint-7"].reason == "symlink"
    assert newest_complete(out).name == "checkpoint-5"


def test_dir_size(tmp_path):
    (tmp_path / "a").write_bytes(b"x" * 100)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b").write_bytes(b"x" * 50)
    big = tmp_path.parent / "big"
    big.write_bytes(b"x" * 10_000)
    (tmp_path / "link").symlink_to(big)
    assert 150 <= dir_size(tmp_path) < 1000  # the link counts as a link, not its target


# ---------------------------------------------------------------------------- runs and owners


def test_stale_checkpoint_from_another_run_never_preferred(tmp_path):
    out = tmp_path / "out"
    make_ckpt(out, 5000)
    mark_checkpoint(out / "checkpoint-5000", "old-run")
    mark_checkpoint(make_ckpt(out, 100), "new-run")
    make_ckpt(out, 200)  # just saved, `checkpoint` event not handled yet: unmarked
    assert newest_complete(out, run_id="new-run").name == "checkpoint-100"
    assert newest_complete(out).name == "checkpoint-5000"  # without a run id, numbers decide
    plan = prune_plan(scan(out), keep=1, run_id="new-run")
    assert "checkpoint-5000" not in [p.name for p in plan]


def test_claim_output_dir(tmp_path):
    out = tmp_path / "new" / "out"
    claim_output_dir(out, "run-a")
    assert output_dir_owner(out) == "run-a" and oct(out.stat().st_mode & 0o777) == "0o700"
    claim_output_dir(out, "run-a")  # resuming the same run
    make_ckpt(out, 100)
    with pytest.raises(OutputDirError, match="checkpoint-100 from run run-a"):
        claim_output_dir(out, "run-b")


def test_claim_refuses_foreign_checkpoints_without_manifest(tmp_path):
    make_ckpt(tmp_path / "out", 5000)
    with pytest.raises(OutputDirError, match="no qlora-watch run"):
        claim_output_dir(tmp_path / "out", "run-a")
    assert output_dir_owner(tmp_path / "out") is None


def test_claim_refuses_symlink_and_file(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(OutputDirError, match="symlink"):
        claim_output_dir(tmp_path / "link", "r")
    (tmp_path / "f").write_text("")
    with pytest.raises(OutputDirError, match="not a folder"):
        claim_output_dir(tmp_path / "f", "r")


def test_claim_non_empty_without_checkpoints_is_fine(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    claim_output_dir(tmp_path, "r")
    assert output_dir_owner(tmp_path) == "r"


def test_mark_checkpoint_refuses_symlink(tmp_path):
    target = make_ckpt(tmp_path / "elsewhere", 7)
    (tmp_path / "checkpoint-7").symlink_to(target)
    with pytest.raises(OSError):
        mark_checkpoint(tmp_path / "checkpoint-7", "r")
    assert not (target / ".qlora-watch-run").exists()


def test_adopt_checkpoints_after_supervisor_restart(tmp_path):
    out = tmp_path / "out"
    make_ckpt(out, 50)
    os.utime(out / "checkpoint-50" / "trainer_state.json", (1, 1))  # long before the claim
    (out / ".qlora-watch-run").write_text(json.dumps({"run_id": "r", "claimed_at": 1000.0}))
    make_ckpt(out, 100)
    assert adopt_checkpoints(out, "r") == ["checkpoint-100"]
    assert newest_complete(out, run_id="r").name == "checkpoint-100"
    assert adopt_checkpoints(out, "someone-else") == []


def test_best_checkpoint(tmp_path):
    make_ckpt(tmp_path, 100)
    make_ckpt(tmp_path, 200, best="checkpoint-100")
    assert best_checkpoint(tmp_path).name == "checkpoint-100"
    assert best_checkpoint(tmp_path).best_metric is None  # the best metric lives in the newer state
    shutil.rmtree(tmp_path / "checkpoint-100")
    assert best_checkpoint(tmp_path) is None
    (tmp_path / "x").mkdir()
    assert best_checkpoint(tmp_path / "x") is None


# ---------------------------------------------------------------------------- safe delete


def audit_lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_safe_delete_two_phase_with_audit(tmp_path):
    out = tmp_path / "out"
    for s in (1, 2, 3):
        make_ckpt(out, s)
    log = tmp_path / "deletions.jsonl"
    (r,) = safe_delete(out, ["checkpoint-1"], log, reason="retention: keep 2")
    assert r.deleted and r.error is None and r.step == 1 and r.size_bytes > 1000
    assert sorted(os.listdir(out)) == ["checkpoint-2", "checkpoint-3"]
    (line,) = audit_lines(log)
    assert line["name"] == "checkpoint-1" and line["step"] == 1 and line["reason"] == "retention: keep 2"
    assert line["size_bytes"] == r.size_bytes and line["deleted"] is True
    assert oct(log.stat().st_mode & 0o777) == "0o600"


@pytest.mark.parametrize("name", ["trainer_state.json", "../out", "checkpoint-2/optimizer.pt", "checkpoint-x",
                                  ".", "", "checkpoint-2.deleting-5", "CHECKPOINT-2"])
def test_safe_delete_refuses_other_names(tmp_path, name):
    make_ckpt(tmp_path / "out", 2)
    (r,) = safe_delete(tmp_path / "out", [name], None)
    assert not r.deleted and r.error
    assert checkpoint_status(tmp_path / "out" / "checkpoint-2").complete


def test_symlink_checkpoint_only_the_link_goes(tmp_path):
    canary = make_ckpt(tmp_path / "outside", 7)
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoint-7").symlink_to(canary)
    (r,) = safe_delete(out, ["checkpoint-7"], tmp_path / "log")
    assert r.deleted and r.unlinked_symlink
    assert not (out / "checkpoint-7").exists() and not (out / "checkpoint-7").is_symlink()
    assert checkpoint_status(canary).complete and len(os.listdir(canary)) == 4


def test_inner_symlink_not_followed_on_delete(tmp_path):
    canary = tmp_path / "canary"
    canary.mkdir()
    (canary / "precious").write_text("keep me")
    d = make_ckpt(tmp_path / "out", 3)
    (d / "link-to-canary").symlink_to(canary)
    (d / "sub").mkdir()
    (d / "sub" / "link-file").symlink_to(canary / "precious")
    (r,) = safe_delete(tmp_path / "out", ["checkpoint-3"], None)
    assert r.deleted
    assert (canary / "precious").read_text() == "keep me"


def test_swapped_output_dir_refused(tmp_path):
    out = tmp_path / "out"
    make_ckpt(out, 1)
    sd = SafeDir.open(out)
    out.rename(tmp_path / "moved")
    decoy = tmp_path / "decoy"
    make_ckpt(decoy, 1)
    out.symlink_to(decoy)  # the path now leads somewhere else
    (r,) = sd.delete(["checkpoint-1"], tmp_path / "log")
    assert not r.deleted and "replaced" in r.error
    assert checkpoint_status(decoy / "checkpoint-1").complete
    assert checkpoint_status(tmp_path / "moved" / "checkpoint-1").complete
    out.unlink()
    make_ckpt(out, 1)  # a real dir again, but another inode
    (r,) = sd.delete(["checkpoint-1"], None)
    assert not r.deleted and "replaced" in r.error and (out / "checkpoint-1").exists()
    sd.close()
    # The one-shot form: the identity recorded at run start no longer matches.
    (r,) = safe_delete(out, ["checkpoint-1"], None, expect=(sd.dev, sd.ino))
    assert not r.deleted and (out / "checkpoint-1").exists()
    # And a symlinked output dir is refused outright (O_NOFOLLOW).
    (tmp_path / "link").symlink_to(out)
    (r,) = safe_delete(tmp_path / "link", ["checkpoint-1"], None)
    assert not r.deleted and (out / "checkpoint-1").exists()


def test_finish_pending_deletes(tmp_path):
    out = tmp_path / "out"
    make_ckpt(out, 4).rename(out / "checkpoint-4.deleting-1700000000")
    make_ckpt(out, 5)
    results = finish_pending_deletes(out, tmp_path / "log")
    assert [r.name for r in results] == ["checkpoint-4.deleting-1700000000"] and results[0].deleted
    assert os.listdir(out) == ["checkpoint-5"]
    assert audit_lines(tmp_path / "log")[0]["reason"] == "finish interrupted delete"


def test_root_will_not_delete_a_foreign_owned_checkpoint(tmp_path):
    d = make_ckpt(tmp_path / "out", 8)
    os.chown(d, NOBODY, NOBODY)
    (r,) = safe_delete(tmp_path / "out", ["checkpoint-8"], None)
    assert not r.deleted and "owned by uid 65534" in r.error and d.exists()


def test_quarantine_then_prune_then_delete(tmp_path):
    out = tmp_path / "out"
    make_ckpt(out, 100)
    make_ckpt(out, 150, state="missing")  # killed mid-save; the trainer is gone now
    (q,) = quarantine(out, ["checkpoint-150"])
    assert q.error is None and q.renamed_to.startswith("checkpoint-150.incomplete-")
    assert [i.name for i in scan(out)] == ["checkpoint-100"]  # nothing can resume from it
    infos = scan(out, include_quarantined=True)
    plan = prune_plan(infos, keep=3)
    assert [p.name for p in plan] == [q.renamed_to]
    (r,) = safe_delete(out, [p.name for p in plan], None)
    assert r.deleted and os.listdir(out) == ["checkpoint-100"]


# ---------------------------------------------------------------------------- as an unprivileged user


@pytest.fixture
def shared_tmp():
    """A folder `nobody` can reach (pytest's tmp_path sits under a 0700 root-only folder)."""
    d = tempfile.mkdtemp(prefix="qlw-perm-")
    os.chmod(d, 0o755)
    yield Path(d)
    for root, dirs, _files in os.walk(d):
        for x in dirs:
            os.chmod(os.path.join(root, x), 0o755)
    shutil.rmtree(d)


def _chown_tree(p: Path) -> None:
    for root, dirs, files in os.walk(p):
        for x in [root] + [os.path.join(root, y) for y in dirs + files]:
            os.chown(x, NOBODY, NOBODY)


def test_eacces_in_phase_two_returned_not_raised(shared_tmp):
    out = shared_tmp / "out"
    d = make_ckpt(out, 5)
    (d / "ro").mkdir()
    (d / "ro" / "f").write_text("x")
    _chown_tree(out)
    os.chmod(d / "ro", 0o555)  # nobody cannot unlink inside it

    def child():
        return [r.__dict__ for r in safe_delete(out, ["checkpoint-5"], shared_tmp / "out" / "audit.log")]

    (res,) = as_nobody(child)
    assert res["deleted"] is False and "EACCES" in res["error"]
    assert res["pending"].startswith("checkpoint-5.deleting-")
    assert not (out / "checkpoint-5").exists()  # never resumable half-deleted
    os.chmod(out / res["pending"] / "ro", 0o755)
    (as_root,) = finish_pending_deletes(out)  # root does not delete nobody's files
    assert not as_root.deleted and "owned by uid 65534" in as_root.error
    done = as_nobody(lambda: [r.deleted for r in finish_pending_deletes(out)])
    assert done == [True] and os.listdir(out) == ["audit.log"]


def test_eacces_on_rename_leaves_checkpoint_intact(shared_tmp):
    out = shared_tmp / "out"
    d = make_ckpt(out, 6)
    _chown_tree(d)  # the checkpoint is nobody's, but the output dir is root's 0755

    def child():
        return [r.__dict__ for r in safe_delete(out, ["checkpoint-6"], None)]

    (res,) = as_nobody(child)
    assert res["deleted"] is False and "EACCES" in res["error"] and res["pending"] is None
    assert checkpoint_status(d).complete


# ---------------------------------------------------------------------------- prune_plan properties


@st.composite
def checkpoint_sets(draw):
    steps = draw(st.lists(st.integers(0, 5000), unique=True, max_size=12))
    infos = []
    for s in steps:
        complete = draw(st.booleans())
        infos.append(CheckpointInfo(
            name=f"checkpoint-{s}", step=s, complete=complete, size_bytes=draw(st.integers(0, 10)),
            mtime=float(draw(st.integers(0, 10**6))), run_id=draw(st.sampled_from([None, "me", "other"])),
            quarantined=(not complete) and draw(st.booleans()),
        ))
    complete_names = [i.name for i in infos if i.complete]
    best = draw(st.sampled_from(complete_names)) if complete_names and draw(st.booleans()) else None
    for i in infos:
        i.best_checkpoint = best if i.complete else None
    protect = set(draw(st.lists(st.sampled_from([i.name for i in infos]), max_size=3))) if infos else set()
    return infos, best, protect


@settings(max_examples=400, deadline=None)
@given(data=checkpoint_sets(), keep=st.integers(1, 5), run_id=st.sampled_from([None, "me"]))
def test_prune_plan_invariants(data, keep, run_id):
    infos, best, protect = data
    plan = prune_plan(infos, keep, protect, run_id=run_id)
    names = [p.name for p in plan]
    assert len(names) == len(set(names))
    ours = [i for i in infos if run_id is None or i.run_id in (None, run_id)]
    assert all(p in ours for p in plan)  # never another run's checkpoint
    newest = newest_complete_of(ours)
    if newest:
        assert newest.name not in names  # never the newest complete
    if best and newest and newest.best_checkpoint == best:
        assert best not in names  # never the best
    assert not protect & set(names)
    assert not [p for p in plan if in_progress(p, newest)]  # never one being written
    complete = sorted((i for i in ours if i.complete and not i.quarantined), key=lambda i: i.step)
    guarded = protect | {best} | ({newest.name} if newest else set())
    eligible = [i for i in complete if i.name not in guarded]
    deleted_complete = [p for p in plan if p.complete]
    need = max(0, len(complete) - keep)
    assert len(deleted_complete) == min(need, len(eligible))  # never more than needed
    assert deleted_complete == eligible[: len(deleted_complete)]  # the oldest go first
    remaining = len(complete) - len(deleted_complete)
    assert remaining <= keep + len([i for i in complete if i.name in guarded])
    garbage = [i for i in ours if (not i.complete or i.quarantined) and i.name not in guarded
               and not in_progress(i, newest)]
    assert sorted(g.name for g in garbage) == sorted(p.name for p in plan if not p.complete)


def test_adapter_named_folder_is_incomplete_not_an_error(tmp_path):
    d = make_ckpt(tmp_path, 7, adapter=None)
    (d / "adapter_model.safetensors").mkdir()
    info = checkpoint_status(d)
    assert info.complete is False
    assert info.reason == "adapter_model.safetensors is not a regular file"
    assert [i.name for i in scan(tmp_path) if not i.complete] == ["checkpoint-7"]


@pytest.mark.timeout(20)
def test_adapter_named_fifo_does_not_hang(tmp_path):
    d = make_ckpt(tmp_path, 8, adapter=None)
    os.mkfifo(d / "adapter_model.safetensors")
    info = checkpoint_status(d)  # a blocking open would wait here for a writer forever
    assert info.complete is False
    assert info.reason == "adapter_model.safetensors is not a regular file"

"""Fast relaunch (#20): the quantised-weight cache and the warm standby, on the CPU.

What these cover: the cache key's inputs; truncated and corrupted cache files caught and never
loaded (a notice, the original weights instead); the standby's imports leaving CUDA alone and its
env as given; the real tiny trainer's first-step loss identical cold, from the cache and in a warm
standby. bitsandbytes quantises to NF4 on this CPU too (FIELD_NOTES section 2), so the cache holds
real pre-quantised 4-bit weights here. What they cannot cover: a CUDA machine (the NVML answers to
bitsandbytes' import-time queries, cuInit, GPU memory) - bench/relaunch.py on the H200 does.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from supervisor.recipe import load_recipe
from supervisor.runner import qcache

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable


from tests.support import RecordingWriter as Writer  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny recipe and its locally built model folder (built once for the module)."""
    from supervisor.runner.tiny import build_tiny

    recipe = load_recipe(str(ROOT / "recipes" / "tiny.toml"))
    folder, _ = build_tiny(recipe.model.tiny, ROOT / recipe.data.path,
                           tmp_path_factory.mktemp("tiny"), recipe.data.format)
    return recipe, folder


# ------------------------------------------------------------------------------ the key


def test_cache_key_changes_when_any_input_changes(tmp_path):
    recipe = load_recipe(str(ROOT / "recipes" / "tiny.toml"))
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    (model / "model.safetensors").write_bytes(b"x" * 10)
    versions = {"torch": "2.13", "transformers": "5.24", "bitsandbytes": "0.50.2", "peft": "0.21"}

    def key(r=recipe, backend="hf", device="cpu", v=versions, rev=None):
        return qcache.cache_key(qcache.key_inputs(r, str(model), backend, device, v, rev))

    def with_(**sets):
        data = recipe.model_dump(mode="python")
        for dotted, value in sets.items():
            sec, name = dotted.split("__")
            data[sec][name] = value
        return type(recipe).model_validate(data)

    base = key()
    assert key() == base  # deterministic
    variants = {
        "dtype": key(with_(model__dtype="float16")),
        "quant_type": key(with_(quant__quant_type="fp4")),
        "double_quant": key(with_(quant__double_quant=False)),
        "compute_dtype": key(with_(quant__compute_dtype="float16")),
        "trust_remote_code": key(with_(model__trust_remote_code=True)),
        "backend": key(backend="unsloth"),
        "device": key(device="cuda"),
        "hub_commit_a": key(rev={"kind": "hub", "repo": "org/m", "commit": "a" * 40}),
        "hub_commit_b": key(rev={"kind": "hub", "repo": "org/m", "commit": "b" * 40}),
    }
    for lib in versions:
        variants[f"version:{lib}"] = key(v={**versions, lib: versions[lib] + ".post1"})
    (model / "config.json").write_text('{"model_type": "llama", "x": 1}')
    variants["config bytes"] = key()
    (model / "model.safetensors").write_bytes(b"x" * 11)
    variants["file size"] = key()
    os.utime(model / "model.safetensors", ns=(1, 1))
    variants["file mtime"] = key()
    keys = list(variants.values())
    assert base not in keys and len(set(keys)) == len(keys), variants
    assert qcache.key_inputs(with_(quant__load_in_4bit=False), str(model), "hf", "cpu", versions) is None


def test_hub_model_revision_is_the_snapshot_commit(tmp_path, monkeypatch):
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--tiny"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert qcache.model_revision("org/tiny") == {"kind": "hub", "repo": "org/tiny", "commit": commit}
    assert qcache.model_revision("org/not-downloaded") is None  # no key: the cache is skipped


# ------------------------------------------------------------------------------ bad files


def _entry(tmp_path, tiny):
    from supervisor.runner.backends import Backend, load_base

    recipe, folder = tiny
    root = tmp_path / "qc"
    w = Writer()
    model, _ = qcache.load_base_cached(Backend("hf", "test"), recipe, str(folder), "sdpa", w, "cpu",
                                       root=str(root), load_base=load_base)
    entries = [p for p in root.iterdir() if (p / qcache.MANIFEST).is_file()]
    assert len(entries) == 1 and any("saved the quantised base model" in m for m in w.messages())
    return recipe, folder, root, entries[0], model.state_dict()


def _reload(recipe, folder, root):
    from supervisor.runner.backends import Backend, load_base

    w = Writer()
    model, _ = qcache.load_base_cached(Backend("hf", "test"), recipe, str(folder), "sdpa", w, "cpu",
                                       root=str(root), load_base=load_base)
    sources = [e.get("source") for e in w.events if e.get("phase") == "model_load"]
    return model, w, sources


def _same(a, b) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_cache_file_is_detected_and_never_loaded(tmp_path, tiny, damage):
    recipe, folder, root, entry, cold = _entry(tmp_path, tiny)
    model, w, sources = _reload(recipe, folder, root)
    assert sources == ["cache"] and _same(model.state_dict(), cold)  # sound entry: used

    st = entry / "model.safetensors"
    data = bytearray(st.read_bytes())
    if damage == "truncate":
        st.write_bytes(bytes(data[: len(data) - 100]))
        manifest = json.loads((entry / qcache.MANIFEST).read_text())
        manifest["files"]["model.safetensors"]["size"] = len(data) - 100  # even a matching size
        (entry / qcache.MANIFEST).write_text(json.dumps(manifest))
        why = "truncated"
    else:
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + n])
        big = max((v for k, v in header.items() if k != "__metadata__"),
                  key=lambda v: v["data_offsets"][1] - v["data_offsets"][0])
        data[8 + n + big["data_offsets"][0] + 3] ^= 0xFF  # packed NF4 weights: loads fine, wrong model
        # same size, same header: only the sha256 can tell
        st.write_bytes(bytes(data))
        why = "sha256"
    model, w, sources = _reload(recipe, folder, root)
    assert sources == ["original"], w.events  # the original weights, not the damaged ones
    assert _same(model.state_dict(), cold)
    fallback = [e for e in w.events if e.get("cache_fallback")]
    assert fallback and why in fallback[0]["cache_fallback"]
    assert list(root.glob(f"{entry.name}.bad-*")), "the damaged entry is set aside"
    assert (root / entry.name / qcache.MANIFEST).is_file(), "and a fresh one saved"


def _hashed(w: Writer) -> list[bool]:
    return [e.get("hashed") for e in w.events if e.get("phase") == "cache_verify"]


def test_unchanged_entry_skips_the_sha256_and_a_changed_one_is_hashed(tmp_path, tiny, monkeypatch):
    recipe, folder, root, entry, cold = _entry(tmp_path, tiny)
    model, w, sources = _reload(recipe, folder, root)  # as saved: the save's own hashes stand
    assert sources == ["cache"] and _hashed(w) == [False] and _same(model.state_dict(), cold)
    assert any("unchanged since their sha256 passed" in m for m in w.messages())

    monkeypatch.setenv(qcache.ENV_VERIFY, "always")  # the opt-in to hash at every load
    _, w, sources = _reload(recipe, folder, root)
    assert sources == ["cache"] and _hashed(w) == [True]
    monkeypatch.delenv(qcache.ENV_VERIFY)

    # The same bytes written again (a copy back, a restore): another ctime, so hashed once,
    # passes, and is recorded: the load after that trusts the files again.
    st = entry / "model.safetensors"
    st.write_bytes(st.read_bytes())
    _, w, sources = _reload(recipe, folder, root)
    assert sources == ["cache"] and _hashed(w) == [True]
    assert (entry / qcache.VERIFIED).is_file()
    _, w, sources = _reload(recipe, folder, root)
    assert sources == ["cache"] and _hashed(w) == [False]


def test_damage_hidden_behind_the_old_mtime_is_still_hashed_and_caught(tmp_path, tiny):
    """A flipped byte, same size, mtime set back to the saved one: ctime still moved."""
    recipe, folder, root, entry, cold = _entry(tmp_path, tiny)
    st = entry / "model.safetensors"
    before = st.stat()
    data = bytearray(st.read_bytes())
    n = int.from_bytes(data[:8], "little")
    data[8 + n + 64] ^= 0xFF
    st.write_bytes(bytes(data))
    os.utime(st, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert st.stat().st_mtime_ns == before.st_mtime_ns and st.stat().st_size == before.st_size
    model, w, sources = _reload(recipe, folder, root)
    assert sources == ["original"] and _same(model.state_dict(), cold)
    assert any("sha256" in (e.get("cache_fallback") or "") for e in w.events)


def test_entry_for_other_inputs_is_not_used(tmp_path, tiny):
    recipe, folder, root, entry, _ = _entry(tmp_path, tiny)
    manifest = json.loads((entry / qcache.MANIFEST).read_text())
    manifest["inputs"]["versions"]["torch"] = "0.0"  # e.g. copied in from another machine
    (entry / qcache.MANIFEST).write_text(json.dumps(manifest))
    _, w, sources = _reload(recipe, folder, root)
    assert sources == ["original"] and any("other inputs (versions)" in m for m in w.messages())


# ------------------------------------------------------------------------------ the standby


def _start_standby(folder: Path, env: dict[str, str], parent: str | None = None) -> subprocess.Popen:
    argv = [PY, "-m", "supervisor.runner.standby", "--dir", str(folder)]
    if parent:
        argv += ["--parent", parent]
    return subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _wait_file(path: Path, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            try:
                return json.loads(path.read_text())
            except ValueError:
                pass
        time.sleep(0.05)
    raise AssertionError(f"{path} not written in {timeout} s")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CUDA_", "QLW_"))}
    env.update(PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **extra)
    return env


def _steps(events: Path) -> list[dict]:
    return [json.loads(x) for x in events.read_text().splitlines() if '"event": "step"' in x]


def _train_argv(out: Path, events: Path) -> list[str]:
    return [PY, "-m", "supervisor.runner.train", "--recipe", str(ROOT / "recipes" / "tiny.toml"),
            "--set", "train.max_steps=1", "--set", "train.logging_steps=1",
            "--set", "train.save_steps=1000", "--events", str(events), "--output-dir", str(out)]


def test_standby_imports_leave_cuda_alone_and_exit_with_their_parent(tmp_path):
    folder = tmp_path / "sb"
    folder.mkdir()
    proc = _start_standby(folder, _env(), parent=f"{os.getpid()}:1.0")  # a start time that never matches
    try:
        ready = _wait_file(folder / "ready.json")
        assert ready["usable"] is True and ready["cuda_initialized"] is False
        assert ready["cuda_init_by"] is None and ready["libcuda_loaded"] is False
        assert ready["cuda_env"] == {}, "the standby sets no CUDA variable of its own"
        assert "transformers.trainer" in ready["modules"] and "bitsandbytes" in ready["modules"]
        assert proc.wait(timeout=30) == 3  # its supervisor "is gone": it leaves, unused
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_first_step_loss_identical_cold_cached_and_warm(tmp_path):
    """One real tiny trainer cold (saves both caches), then the same attempt in a warm standby
    (imports done before it got the attempt, weights and tokens from the caches): the same
    first-step loss."""
    env = _env(QLW_QCACHE_DIR=str(tmp_path / "qc"), QLW_DCACHE_DIR=str(tmp_path / "dc"),
               QLW_TINY_CACHE=str(tmp_path / "tiny"))
    cold_events = tmp_path / "cold.jsonl"
    subprocess.run(_train_argv(tmp_path / "o1", cold_events), env=env, cwd=ROOT, check=True,
                   capture_output=True, timeout=240)

    folder = tmp_path / "sb"
    folder.mkdir()
    proc = _start_standby(folder, _env())  # the attempt's env arrives with go.json
    try:
        ready = _wait_file(folder / "ready.json")
        assert ready["usable"] and not ready["cuda_initialized"]
        warm_events = tmp_path / "warm.jsonl"
        go = {"env": env, "cwd": str(ROOT), "argv": _train_argv(tmp_path / "o2", warm_events)}
        (folder / ".go.tmp").write_text(json.dumps(go))
        os.replace(folder / ".go.tmp", folder / "go.json")
        out, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, out.decode(errors="replace")[-2000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    cold, warm = _steps(cold_events), _steps(warm_events)
    assert cold and warm and cold[0]["loss"] == warm[0]["loss"]
    timing = {e["phase"]: e for e in map(json.loads, warm_events.read_text().splitlines())
              if e.get("event") == "timing"}
    assert timing["imports"]["warm"] is True and timing["model_load"]["source"] == "cache"
    assert "dataset_cache_load" in timing  # and the tokens from the dataset cache
    cold_timing = {e["phase"]: e for e in map(json.loads, cold_events.read_text().splitlines())
                   if e.get("event") == "timing"}
    assert cold_timing["model_load"]["source"] == "original" and "cache_save" in cold_timing
    assert "dataset_cache_save" in cold_timing


def test_standby_is_only_for_the_builtin_trainer():
    from supervisor.daemon.standby import StandbyManager, env_difference, is_our_trainer

    recipe = load_recipe(str(ROOT / "recipes" / "tiny.toml"))
    assert is_our_trainer([PY, "-m", "supervisor.runner.train"])
    assert not is_our_trainer(["python3", "train.py"])
    assert not is_our_trainer(["/other/python", "-m", "supervisor.runner.train"])
    assert StandbyManager.off_reason(recipe, ["bash", "run.sh"]) == "the command is not the built-in trainer"
    assert StandbyManager.off_reason(recipe, [PY, "-m", "supervisor.runner.train"]) is None
    off = recipe.model_copy(update={"supervisor": recipe.supervisor.model_copy(update={"warm_standby": False})})
    assert StandbyManager.off_reason(off, [PY, "-m", "supervisor.runner.train"]) is not None
    # per-attempt keys may differ; anything an import could have read may not (names only, no values)
    assert env_difference({"A": "1", "QLW_X": "1"}, {"A": "1", "QLW_X": "2", "CUDA_VISIBLE_DEVICES": "1"}) == []
    assert env_difference({"HF_HUB_OFFLINE": "1"}, {"HF_HUB_OFFLINE": "0"}) == ["HF_HUB_OFFLINE"]


def test_oom_ladder_relaunch_takes_the_warm_standby_and_the_cache(qlw_home, tmp_path, monkeypatch):
    """The real supervisor and the tiny trainer: an (injected) OOM at step 2, rung 1 relaunched
    into the warm standby with the weights from the run's cache; no standby outlives the run."""
    from tests.support import events, run_dir, start, wait_end

    monkeypatch.setenv("QLW_TINY_CACHE", str(tmp_path / "tiny"))
    run_id = start(ROOT / "recipes" / "tiny.toml", "--set", "debug.raise_oom_above_seq_len=800",
                   "--set", "train.max_steps=4", "--set", "train.save_steps=1",
                   "--set", f"train.output_dir={tmp_path}/out-{{run_id}}")
    assert wait_end(run_id, timeout=240) == 0
    evs = events(qlw_home, run_id)
    launch = [e for e in evs if e["kind"] == "launch"]
    assert len(launch) == 2 and not launch[0]["evidence"]["warm_standby"]
    assert launch[1]["evidence"]["warm_standby"], [e["message"] for e in evs if e["kind"] == "standby"]
    assert any("loaded the quantised base model" in e["message"] for e in evs)
    a2 = run_dir(qlw_home, run_id) / "attempts" / "2"
    timing = [json.loads(x) for x in (a2 / "events.jsonl").read_text().splitlines() if '"timing"' in x]
    assert {t["phase"]: t for t in timing}["imports"]["warm"] is True
    assert json.loads((a2 / "exit.json").read_text())["returncode"] == 0  # the wrapper's exit file
    assert (run_dir(qlw_home, run_id) / "qcache").is_dir()  # removed with the run (`qlora-watch rm`)
    phases = {t["phase"] for t in timing}
    assert "dataset_cache_load" in phases  # the tokens from the run's dcache/, made by attempt 1
    assert (run_dir(qlw_home, run_id) / "dcache").is_dir()


def test_dataset_cache_dir_only_for_the_builtin_trainer_and_data_cache(tmp_path):
    from supervisor.daemon.attempts import dataset_cache_dir

    recipe = load_recipe(str(ROOT / "recipes" / "tiny.toml"))
    assert dataset_cache_dir(recipe, tmp_path) == tmp_path / "dcache"
    off = load_recipe(str(ROOT / "recipes" / "tiny.toml"), ["data.cache=false"])
    assert dataset_cache_dir(off, tmp_path) is None
    mine = load_recipe(str(ROOT / "recipes" / "tiny.toml"), ['trainer.command=["python3", "train.py"]'])
    assert dataset_cache_dir(mine, tmp_path) is None


def test_cache_ls_and_rm(qlw_home):
    """`qlora-watch cache ls` lists the shared and per-run entries; `rm` deletes only entries."""
    from tests.support import qlw

    for root in (qlw_home / "qcache", qlw_home / "runs" / "amber" / "qcache"):
        entry = root / "abc123"
        entry.mkdir(parents=True)
        (entry / "model.safetensors").write_bytes(b"\0" * 1000)
        (entry / qcache.MANIFEST).write_text(json.dumps({"inputs": {"model": {"path": "/m"}, "backend": "hf"},
                                                         "created_at": 1.0}))
    listed = json.loads(qlw("cache", "ls", "--json", check=True).stdout)
    assert sorted(e["owner"] for e in listed) == ["amber", "shared"]
    assert all(e["bytes"] > 1000 and e["state"] == "ok" for e in listed)
    assert qlw("cache", "rm", "abc").returncode == 2  # no terminal, no --yes: nothing deleted
    qlw("cache", "rm", "--run", "amber", "--yes", check=True)
    assert not (qlw_home / "runs" / "amber" / "qcache" / "abc123").exists()
    assert (qlw_home / "qcache" / "abc123").is_dir()
    assert qlw("cache", "rm", "nope", "--yes").returncode == 1


def test_idle_standby_wrapper_holds_no_log_that_the_running_one_rotates(tmp_path):
    """Two wrappers on the run's log (the attempt's and an idle standby's): the standby opens
    the file at its first line, so what it writes after a rotation lands in the live log."""
    from supervisor.wrapper import RotatingLog

    path = tmp_path / "trainer.log"
    running, standby = RotatingLog(path, 100, 2), RotatingLog(path, 100, 2)
    for i in range(20):
        running.write(f"attempt 1 line {i:02d}\n".encode())  # rotates several times
    standby.write(b"attempt 2 line 00\n")
    assert "attempt 2 line 00" in path.read_text()

"""Checkpoint folders on disk: completeness, run markers, ownership of the output dir.

transformers writes `checkpoint-N` in place with `trainer_state.json` last and resumes from
the highest number without checking it (FIELD_NOTES 3), so qlora-watch decides for itself
what is complete. Reading only; deletion lives in `safedelete.py`, decisions in `prune.py`.
Files inside a checkpoint are opened relative to its folder fd with O_NOFOLLOW: an inner
symlink makes the checkpoint incomplete instead of being followed.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import stat
import struct
import time
from pathlib import Path
from typing import Any

from supervisor.checkpoints.delete import (
    DeleteResult,
    SafeDir,
    UnsafeDirError,
    finish_pending_deletes,
    quarantine,
    safe_delete,
    tree_size,
)
from supervisor.checkpoints.plan import (
    CHECKPOINT_RE,
    QUARANTINED_RE,
    CheckpointInfo,
    as_infos,
    best_name_of,
    newest_complete_of,
    prune_plan,
    step_of,
)

__all__ = [
    "CheckpointInfo", "DeleteResult", "OutputDirError", "SafeDir", "UnsafeDirError",
    "adopt_checkpoints", "best_checkpoint", "check_output_dir", "checkpoint_status", "claim_output_dir",
    "dir_size", "finish_pending_deletes", "mark_checkpoint", "newest_complete",
    "output_dir_owner", "prune_plan", "quarantine", "read_marker", "safe_delete", "scan",
]

RUN_MARKER = ".qlora-watch-run"
SENTINEL = "checkpoint-is-incomplete.txt"
STATE_FILE = "trainer_state.json"
MAX_STATE_BYTES = 256 << 20  # log_history grows with the run; bounded so /dev/zero can't hang us
MAX_ST_HEADER = 100 << 20  # safetensors itself refuses headers above 100 MB
MAX_MARKER_BYTES = 64 << 10


class OutputDirError(Exception):
    """The output folder cannot be used by this run (another run's checkpoints, a symlink...)."""


# ---------------------------------------------------------------------------- reading


class NotRegularFileError(OSError):
    """A name inside a checkpoint is a folder, FIFO, socket or device, not a file."""


def _open_regular(dir_fd: int, name: str) -> int:
    """An fd of the regular file `name` in dir_fd. Raises OSError: ELOOP for a symlink (not
    followed), NotRegularFileError for anything else; O_NONBLOCK so a FIFO cannot hang us."""
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFileError(errno.EINVAL, "not a regular file", name)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read_at(dir_fd: int, name: str, limit: int) -> bytes:
    """Read a regular file in dir_fd without following a symlink; at most `limit` bytes."""
    fd = _open_regular(dir_fd, name)
    try:
        chunks, total = [], 0
        while total < limit:
            chunk = os.read(fd, min(1 << 20, limit - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _why(e: OSError, name: str) -> str:
    if isinstance(e, NotRegularFileError):
        return f"{name} is not a regular file"
    if e.errno == errno.ENOENT:
        return f"{name} missing"
    if e.errno == errno.ELOOP:
        return f"{name} is a symlink"
    return f"{name} unreadable ({e.strerror or e})"


ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_BIN = "adapter_model.bin"
FSDP_MODEL_DIR = "pytorch_model_fsdp_0"  # accelerate's SHARDED_STATE_DICT folder (FSDP_MODEL_NAME_0)


def _check_safetensors(dir_fd: int, st: os.stat_result) -> str | None:
    """None if the safetensors header is intact JSON, else why not."""
    if stat.S_ISLNK(st.st_mode):
        return f"{ADAPTER_FILE} is a symlink"
    try:
        fd = _open_regular(dir_fd, ADAPTER_FILE)
    except OSError as e:
        return _why(e, ADAPTER_FILE)
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, 8, 0)
        if len(head) < 8:
            return "adapter header truncated"
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            return "adapter header truncated"
        if n > MAX_ST_HEADER:
            return f"adapter header implausibly large ({n} bytes)"
        raw = os.pread(fd, n, 8)
    finally:
        os.close(fd)
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return "adapter header is not valid JSON"
    return None if isinstance(header, dict) else "adapter header is not a JSON object"


def _check_bin(dir_fd: int, st: os.stat_result) -> str | None:
    """None if adapter_model.bin is a non-empty regular file."""
    if not stat.S_ISREG(st.st_mode):
        return f"{ADAPTER_BIN} is not a regular file"
    return None if st.st_size > 0 else f"{ADAPTER_BIN} is empty"


def _check_fsdp_shards(dir_fd: int, st: os.stat_result) -> str | None:
    """A multi-GPU (FSDP, SHARDED_STATE_DICT) checkpoint holds no adapter file: the weights are
    torch.distributed.checkpoint shards, whose `.metadata` the coordinator writes after every
    rank's shard is on disk. None when that folder and its non-empty .metadata are there."""
    if not stat.S_ISDIR(st.st_mode):
        return f"{FSDP_MODEL_DIR} is not a folder"
    try:
        sub = os.open(FSDP_MODEL_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                      dir_fd=dir_fd)
    except OSError as e:
        return _why(e, FSDP_MODEL_DIR)
    try:
        meta = os.stat(".metadata", dir_fd=sub, follow_symlinks=False)
    except FileNotFoundError:
        return f"{FSDP_MODEL_DIR}/.metadata missing (sharded save did not finish)"
    finally:
        os.close(sub)
    if not stat.S_ISREG(meta.st_mode) or meta.st_size == 0:
        return f"{FSDP_MODEL_DIR}/.metadata is empty or not a file"
    return None


# The weights, in the order looked for: the first one present decides.
_WEIGHTS = ((ADAPTER_FILE, _check_safetensors), (ADAPTER_BIN, _check_bin),
            (FSDP_MODEL_DIR, _check_fsdp_shards))


def _check_weights(dir_fd: int) -> str | None:
    """None if the adapter weights (safetensors, else .bin, else FSDP shards) look intact,
    else why not."""
    for name, check in _WEIGHTS:
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            continue
        return check(dir_fd, st)
    return f"{ADAPTER_FILE} missing"


def dir_size(path: str | os.PathLike[str]) -> int:
    """Bytes of the files under path, symlinks not followed (their own size counts)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        try:
            return os.lstat(path).st_size
        except OSError:
            return 0
    try:
        return tree_size(fd)
    finally:
        os.close(fd)


def checkpoint_status(path: str | os.PathLike[str]) -> CheckpointInfo:
    """Inspect one checkpoint folder; `complete` only when resuming from it should work."""
    p = Path(path)
    name = p.name
    step = step_of(name)
    info = CheckpointInfo(name=name, step=step if step is not None else -1, complete=False,
                          path=p.absolute(), quarantined=QUARANTINED_RE.match(name) is not None)
    if step is None:
        info.reason = "not a checkpoint-N name"
        return info
    try:
        st = os.lstat(p)
    except OSError as e:
        info.reason = _why(e, name)
        return info
    info.mtime = st.st_mtime
    if stat.S_ISLNK(st.st_mode):
        info.reason = "symlink"
        info.size_bytes = st.st_size
        return info
    if not stat.S_ISDIR(st.st_mode):
        info.reason = "not a folder"
        return info
    try:
        dfd = os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        info.reason = _why(e, name)
        return info
    try:
        info.size_bytes = tree_size(dfd)
        info.run_id = _marker_run_id(dfd)
        info.reason = _completeness(dfd, step, info)
    finally:
        os.close(dfd)
    if info.quarantined and info.reason is None:
        info.reason = "set aside as incomplete"
    info.complete = info.reason is None
    return info


def _completeness(dfd: int, step: int, info: CheckpointInfo) -> str | None:
    """None when complete; fills mtime and best_* from trainer_state.json on the way."""
    try:
        os.stat(SENTINEL, dir_fd=dfd, follow_symlinks=False)
        return f"{SENTINEL} present (save did not finish)"
    except FileNotFoundError:
        pass
    try:
        raw = _read_at(dfd, STATE_FILE, MAX_STATE_BYTES)
        info.mtime = os.stat(STATE_FILE, dir_fd=dfd, follow_symlinks=False).st_mtime
    except OSError as e:
        if e.errno == errno.ENOENT:
            return f"{STATE_FILE} missing (killed mid-save?)"
        return _why(e, STATE_FILE)
    try:
        state = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return f"{STATE_FILE} truncated or not JSON"
    if not isinstance(state, dict):
        return f"{STATE_FILE} is not a JSON object"
    gs = state.get("global_step")
    if not isinstance(gs, int) or isinstance(gs, bool):
        return f"{STATE_FILE} has no global_step"
    if gs != step:
        return f"global_step {gs} != {step}"
    bm = state.get("best_metric")
    info.best_metric = float(bm) if isinstance(bm, (int, float)) and not isinstance(bm, bool) else None
    bmc = state.get("best_model_checkpoint")
    info.best_checkpoint = os.path.basename(str(bmc).rstrip("/")) if bmc else None
    return _check_weights(dfd)


_CACHE: dict[str, tuple[tuple[Any, ...], CheckpointInfo]] = {}
_CACHE_MAX = 4096


def _status_key(path: str) -> tuple[Any, ...] | None:
    """Changes whenever a save, a marker, a sentinel or a rename touches the checkpoint."""
    try:
        d = os.lstat(path)
    except OSError:
        return None
    try:
        s = os.stat(os.path.join(path, STATE_FILE), follow_symlinks=False)
        sk: tuple[int, ...] | None = (s.st_ino, s.st_size, s.st_mtime_ns)
    except OSError:
        sk = None
    return (d.st_mode, d.st_ino, d.st_mtime_ns, sk)


def _status_cached(path: str) -> CheckpointInfo:
    # trainer_state.json grows with log_history (MBs on long runs): parse it once per save,
    # not once per supervisor tick.
    key = _status_key(path)
    hit = _CACHE.get(path)
    if key is not None and hit is not None and hit[0] == key:
        return dataclasses.replace(hit[1])
    info = checkpoint_status(path)
    if key is not None and key == _status_key(path):
        if len(_CACHE) >= _CACHE_MAX:
            _CACHE.clear()
        _CACHE[path] = (key, info)
    return dataclasses.replace(info)


def scan(output_dir: str | os.PathLike[str], include_quarantined: bool = False,
         cached: bool = False) -> list[CheckpointInfo]:
    """Every `checkpoint-N` directly in output_dir, numeric order; symlinks reported, not followed.

    include_quarantined: also `checkpoint-N.incomplete-<ts>` (for prune plans).
    cached: reuse an earlier verdict while the folder and its trainer_state.json are unchanged.
    """
    out: list[CheckpointInfo] = []
    try:
        entries = list(os.scandir(output_dir))
    except OSError:
        return out
    for e in entries:
        if CHECKPOINT_RE.match(e.name) or (include_quarantined and QUARANTINED_RE.match(e.name)):
            out.append(_status_cached(e.path) if cached else checkpoint_status(e.path))
    return as_infos(out)


def newest_complete(output_dir: str | os.PathLike[str], run_id: str | None = None) -> CheckpointInfo | None:
    """The newest complete checkpoint; with run_id, only those marked as that run's."""
    return newest_complete_of(scan(output_dir), run_id=run_id)


def best_checkpoint(output_dir: str | os.PathLike[str], run_id: str | None = None) -> CheckpointInfo | None:
    """The complete checkpoint trainer_state.json names as best_model_checkpoint, if any."""
    infos = scan(output_dir)
    mine = [i for i in infos if run_id is None or i.run_id == run_id]
    name = best_name_of(mine)
    return next((i for i in mine if i.name == name and i.complete), None) if name else None


# ---------------------------------------------------------------------------- run markers


def _marker_run_id(dir_fd: int) -> str | None:
    data = _read_marker_at(dir_fd)
    return data.get("run_id") if data else None


def _read_marker_at(dir_fd: int) -> dict[str, Any] | None:
    try:
        data = json.loads(_read_at(dir_fd, RUN_MARKER, MAX_MARKER_BYTES))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("run_id"), str):
        return None
    return data


def read_marker(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The run marker of a folder (output dir or checkpoint) as a dict, or None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return _read_marker_at(fd)
    finally:
        os.close(fd)


def _write_marker(path: str | os.PathLike[str], payload: dict[str, Any]) -> None:
    """Atomically (tmp + rename, relative to the folder's fd) write the run marker."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        tmp = f"{RUN_MARKER}.tmp-{os.getpid()}"
        wfd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                      0o600, dir_fd=fd)
        try:
            os.write(wfd, json.dumps(payload, sort_keys=True).encode())
            os.fsync(wfd)
        finally:
            os.close(wfd)
        os.replace(tmp, RUN_MARKER, src_dir_fd=fd, dst_dir_fd=fd)
    finally:
        os.close(fd)


def mark_checkpoint(path: str | os.PathLike[str], run_id: str) -> None:
    """Record that run_id accepted this checkpoint (on its `checkpoint` event). Raises OSError."""
    if step_of(Path(path).name) is None or QUARANTINED_RE.match(Path(path).name):
        raise OSError(errno.EINVAL, "not a checkpoint-N folder", str(path))
    # O_NOFOLLOW in _write_marker: a checkpoint-N symlink raises ELOOP instead of being marked.
    _write_marker(path, {"run_id": run_id, "marked_at": time.time()})


def output_dir_owner(output_dir: str | os.PathLike[str]) -> str | None:
    """The run_id in output_dir's manifest, or None (no manifest, unreadable, or corrupt)."""
    data = read_marker(output_dir)
    return data["run_id"] if data else None


def check_output_dir(output_dir: str | os.PathLike[str], run_id: str | None) -> None:
    """Raise OutputDirError unless run_id may use output_dir (nothing is written; a missing
    folder is fine). `start` calls it before detaching, the supervisor again when it claims."""
    p = Path(output_dir)
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise OutputDirError(f"{p}: output_dir is a symlink; give the real folder")
    if not stat.S_ISDIR(st.st_mode):
        raise OutputDirError(f"{p}: output_dir exists and is not a folder")
    if st.st_uid != os.geteuid():
        raise OutputDirError(f"{p}: output_dir belongs to uid {st.st_uid}, not you ({os.geteuid()})")
    owner = output_dir_owner(p)
    if owner is not None and owner == run_id:
        return
    found = sorted((n for n in os.listdir(p) if n.startswith("checkpoint-")),
                   key=lambda n: (step_of(n.split(".")[0]) or 0, n))
    if found:
        whose = f"run {owner}" if owner else "no qlora-watch run (no manifest)"
        shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        then = f", continue that run with `qlora-watch resume {owner}`," if owner else ""
        raise OutputDirError(
            f"{p}: holds {shown} from {whose}; refusing to mix runs (retention would "
            f"delete them and resume could pick them). Use another output_dir{then} "
            "or move them away."
        )


def claim_output_dir(output_dir: str | os.PathLike[str], run_id: str) -> None:
    """Make output_dir this run's (manifest `.qlora-watch-run`); raise OutputDirError if it isn't ours."""
    p = Path(output_dir)
    if not p.exists() and not p.is_symlink():
        p.mkdir(mode=0o700, parents=True, exist_ok=True)
    check_output_dir(p, run_id)
    if output_dir_owner(p) == run_id:
        return  # resuming our own run: keep the original claimed_at (adopt_checkpoints uses it)
    _write_marker(p, {"run_id": run_id, "claimed_at": time.time(), "tool": "qlora-watch"})


def adopt_checkpoints(output_dir: str | os.PathLike[str], run_id: str, cached: bool = False) -> list[str]:
    """Mark complete unmarked checkpoints made since this run claimed output_dir.

    For a supervisor restart that missed `checkpoint` events. Only when the manifest names
    run_id; a checkpoint older than the claim is never adopted (it predates this run).
    """
    manifest = read_marker(output_dir)
    if not manifest or manifest.get("run_id") != run_id:
        return []
    since = float(manifest.get("claimed_at") or float("inf"))
    adopted = []
    for info in scan(output_dir, cached=cached):
        if info.complete and info.run_id is None and info.mtime >= since and info.path:
            mark_checkpoint(info.path, run_id)
            adopted.append(info.name)
    return adopted

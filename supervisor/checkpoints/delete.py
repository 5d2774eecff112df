"""Symlink-safe, two-phase deletion of checkpoint folders (RELIABILITY_PLAN C7, C8, C11).

The output dir is opened once with O_DIRECTORY|O_NOFOLLOW and every operation is relative to
that fd, so a path swapped under us cannot redirect a delete. Phase 1 renames
`checkpoint-N` to `checkpoint-N.deleting-<ts>` (atomic: a crash never leaves a half-deleted
folder that still looks resumable); phase 2 is `shutil.rmtree(dir_fd=...)`, which does not
follow symlinks. Errors are returned, never raised.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from supervisor.checkpoints.plan import DELETABLE_RE, PENDING_DELETE_RE, QUARANTINED_RE, step_of
from supervisor.paths import UnsafeDirError  # here: the output dir is not the folder we opened


@dataclass
class DeleteResult:
    """The outcome for one name. `deleted` is True only when the folder is gone."""

    name: str
    deleted: bool
    error: str | None = None
    step: int | None = None
    size_bytes: int = 0
    pending: str | None = None  # the .deleting-<ts> name left behind when phase 2 failed
    unlinked_symlink: bool = False
    renamed_to: str | None = None  # for quarantine()
    audit_error: str | None = None  # the audit line could not be written (deletion stands)

    @property
    def ok(self) -> bool:
        return self.deleted


def _ts() -> int:
    return time.time_ns() // 1000


def tree_size(dir_fd: int, name: str = ".") -> int:
    """Bytes of the files under `name` (relative to dir_fd), symlinks not followed; 0 when
    the folder cannot be walked. A size is informational: a file raced away is skipped."""
    total = 0
    try:
        for _r, _d, files, rfd in os.fwalk(name, dir_fd=dir_fd, follow_symlinks=False):
            for f in files:
                try:
                    total += os.stat(f, dir_fd=rfd, follow_symlinks=False).st_size
                except OSError:
                    pass
    except OSError:
        pass
    return total


def _failed(names: Iterable[str], error: str) -> list[DeleteResult]:
    """The same refusal for every name."""
    return [DeleteResult(n, False, error, step_of(n)) for n in names]


def _err(e: BaseException) -> str:
    if isinstance(e, OSError) and e.errno is not None:
        code = errno.errorcode.get(e.errno, str(e.errno))
        where = f": {e.filename}" if e.filename else ""
        return f"{code} {e.strerror or ''}{where}".strip()
    return str(e)


@dataclass
class SafeDir:
    """An output dir held open by fd; its identity is recorded at open and checked before acting."""

    path: str
    fd: int = -1
    dev: int = 0
    ino: int = 0
    _closed: bool = field(default=False, repr=False)

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> "SafeDir":
        """Open path (not a symlink) as a directory fd. Raises OSError."""
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        st = os.fstat(fd)
        return cls(path=os.fspath(path), fd=fd, dev=st.st_dev, ino=st.st_ino)

    def close(self) -> None:
        if not self._closed and self.fd >= 0:
            os.close(self.fd)
        self._closed = True

    def __enter__(self) -> "SafeDir":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def verify(self) -> None:
        """Raise UnsafeDirError unless the path still names the folder our fd holds."""
        try:
            st = os.lstat(self.path)
        except OSError as e:
            raise UnsafeDirError(f"{self.path}: output dir gone ({_err(e)}); nothing deleted") from None
        if stat.S_ISLNK(st.st_mode) or (st.st_dev, st.st_ino) != (self.dev, self.ino):
            raise UnsafeDirError(
                f"{self.path}: output dir was replaced since it was opened "
                f"(dev/ino {self.dev}/{self.ino} -> {st.st_dev}/{st.st_ino}); deletion refused"
            )
        if os.fstat(self.fd).st_nlink == 0:
            raise UnsafeDirError(f"{self.path}: output dir was removed; deletion refused")

    # ------------------------------------------------------------------ entries

    def _check_entry(self, name: str, allowed: Callable[[str], bool]) -> os.stat_result:
        if "/" in name or not allowed(name):
            raise PermissionError(errno.EPERM, "name not deletable by qlora-watch", name)
        st = os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            return st
        if not stat.S_ISDIR(st.st_mode):
            raise OSError(errno.ENOTDIR, "not a folder", name)
        if st.st_dev != self.dev:
            raise OSError(errno.EXDEV, "on another filesystem (mount point?)", name)
        if st.st_uid != os.geteuid():
            raise PermissionError(errno.EPERM, f"owned by uid {st.st_uid}, not {os.geteuid()}", name)
        return st

    def _rmtree(self, name: str) -> str | None:
        """Phase 2. None on success, else the first error."""
        errors: list[str] = []

        def onexc(_fn: object, _path: str, exc: BaseException) -> None:
            errors.append(_err(exc))

        if sys.version_info >= (3, 12):
            shutil.rmtree(name, dir_fd=self.fd, onexc=onexc)
        else:  # 3.11: same safe fd-based walk, older callback shape
            shutil.rmtree(name, dir_fd=self.fd, onerror=lambda f, p, ei: onexc(f, p, ei[1]))
        try:
            os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        return errors[0] if errors else "still present after rmtree"

    def delete(self, names: Iterable[str], audit_log_path: str | os.PathLike[str] | None,
               reason: str = "retention") -> list[DeleteResult]:
        """Delete each name (checkpoint-N or checkpoint-N.incomplete-<ts>) directly in this dir."""
        names = list(names)
        try:
            self.verify()
        except UnsafeDirError as e:
            return _failed(names, str(e))
        results = []
        for name in names:
            res = self._delete_one(name, DELETABLE_RE.match)
            results.append(res)
            _audit(audit_log_path, res, reason)
        return results

    def _delete_one(self, name: str, allowed: Callable[[str], object]) -> DeleteResult:
        res = DeleteResult(name, False, step=step_of(name.split(".deleting-")[0]))
        try:
            self.verify()
            st = self._check_entry(name, lambda n: bool(allowed(n)))
            if stat.S_ISLNK(st.st_mode):
                os.unlink(name, dir_fd=self.fd)  # the link only; its target is not ours
                res.deleted, res.unlinked_symlink = True, True
                return res
            res.size_bytes = tree_size(self.fd, name)
            target = name
            if not PENDING_DELETE_RE.match(name):
                target = f"{name}.deleting-{_ts()}"
                os.rename(name, target, src_dir_fd=self.fd, dst_dir_fd=self.fd)
                # Swapped between lstat and rename? Then the renamed thing is not what we checked.
                after = os.stat(target, dir_fd=self.fd, follow_symlinks=False)
                if (after.st_dev, after.st_ino) != (st.st_dev, st.st_ino):
                    res.pending = target
                    res.error = "entry changed during delete; left as " + target
                    return res
            err = self._rmtree(target)
            if err is None:
                res.deleted = True
            else:
                res.pending, res.error = target, err
        except (OSError, UnsafeDirError) as e:
            res.error = _err(e) if isinstance(e, OSError) else str(e)
        return res

    def finish_pending_deletes(self, audit_log_path: str | os.PathLike[str] | None = None) -> list[DeleteResult]:
        """Complete `.deleting-<ts>` folders left by an interrupted delete."""
        try:
            self.verify()
            names = sorted(n for n in os.listdir(self.fd) if PENDING_DELETE_RE.match(n))
        except (OSError, UnsafeDirError) as e:
            return [DeleteResult("*.deleting-*", False, str(e))]
        results = []
        for name in names:
            res = self._delete_one(name, PENDING_DELETE_RE.match)
            results.append(res)
            _audit(audit_log_path, res, "finish interrupted delete")
        return results

    def quarantine(self, names: Iterable[str]) -> list[DeleteResult]:
        """Rename incomplete checkpoint-N to checkpoint-N.incomplete-<ts> so nothing resumes from it."""
        results = []
        for name in names:
            res = DeleteResult(name, False, step=step_of(name))
            try:
                self.verify()
                if QUARANTINED_RE.match(name):
                    res.error = "already set aside"
                else:
                    self._check_entry(name, lambda n: DELETABLE_RE.match(n) is not None)
                    res.renamed_to = f"{name}.incomplete-{_ts()}"
                    os.rename(name, res.renamed_to, src_dir_fd=self.fd, dst_dir_fd=self.fd)
            except (OSError, UnsafeDirError) as e:
                res.renamed_to, res.error = None, _err(e) if isinstance(e, OSError) else str(e)
            results.append(res)
        return results


def _audit(path: str | os.PathLike[str] | None, res: DeleteResult, reason: str) -> None:
    """Append one JSON line per attempted deletion; a failing audit log never stops deletion."""
    if path is None:
        return
    line = json.dumps({
        "t": time.time(), "name": res.name, "step": res.step, "size_bytes": res.size_bytes,
        "reason": reason, "deleted": res.deleted, "error": res.error, "pending": res.pending,
        "symlink": res.unlinked_symlink,
    }, sort_keys=True) + "\n"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
    except OSError as e:
        res.audit_error = _err(e)  # the deletion result stands; the core reports the miss


def _open(output_dir: str | os.PathLike[str]) -> SafeDir | str:
    """The output dir held open, or why it could not be opened."""
    try:
        return SafeDir.open(output_dir)
    except OSError as e:
        return f"cannot open output dir: {_err(e)}"


def safe_delete(output_dir: str | os.PathLike[str], names: Iterable[str],
                audit_log_path: str | os.PathLike[str] | None, reason: str = "retention",
                expect: tuple[int, int] | None = None) -> list[DeleteResult]:
    """Open output_dir safely and delete names; expect=(st_dev, st_ino) recorded at run start."""
    names = list(names)
    sd = _open(output_dir)
    if isinstance(sd, str):
        return _failed(names, sd)
    with sd:
        if expect is not None and expect != (sd.dev, sd.ino):
            msg = f"{output_dir}: output dir is not the one this run opened; deletion refused"
            return _failed(names, msg)
        return sd.delete(names, audit_log_path, reason)


def finish_pending_deletes(output_dir: str | os.PathLike[str],
                           audit_log_path: str | os.PathLike[str] | None = None) -> list[DeleteResult]:
    """Complete leftover `.deleting-<ts>` folders in output_dir (call at supervisor start)."""
    sd = _open(output_dir)
    if isinstance(sd, str):
        return [DeleteResult("*.deleting-*", False, sd)]
    with sd:
        return sd.finish_pending_deletes(audit_log_path)


def quarantine(output_dir: str | os.PathLike[str], names: Iterable[str]) -> list[DeleteResult]:
    """Rename incomplete checkpoints aside (call while no trainer runs, before a relaunch)."""
    names = list(names)
    sd = _open(output_dir)
    if isinstance(sd, str):
        return _failed(names, sd)
    with sd:
        return sd.quarantine(names)

"""Errors in words: an OSError or SQLite error at the command line becomes one line that names
the path and the fix (exit 2), never a traceback.

`qlora-watch ls/status/stop/attach/start` on an unreadable or read-only QLORA_WATCH_HOME,
another user's home, a full disk for the run store or a locked database used to print a
`PermissionError`/`OSError` traceback.
"""

from __future__ import annotations

import errno
import os
import pwd
import shutil
import sqlite3
from pathlib import Path

EXIT_ENV_ERROR = 2
HOME_FIX = "or set QLORA_WATCH_HOME to a folder of your own"


def _owner(path: Path) -> tuple[int, str] | None:
    p = path
    while True:
        try:
            st = os.lstat(p)
        except OSError:
            if p == p.parent:
                return None
            p = p.parent
            continue
        try:
            name = pwd.getpwuid(st.st_uid).pw_name
        except KeyError:
            name = str(st.st_uid)
        return st.st_uid, name


def _free(path: Path) -> str:
    from supervisor.units import size

    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return size(shutil.disk_usage(p).free) + " free"
    except OSError:
        return "free space unknown"


def explain_os_error(e: OSError) -> str:
    """One line: what failed on which path, and what fixes it."""
    from supervisor import paths

    path = Path(e.filename) if e.filename else paths.state_home()
    what = e.strerror or str(e)
    code = e.errno
    if code in (errno.EACCES, errno.EPERM):
        owner = _owner(path)
        if owner is not None and owner[0] != os.geteuid():
            return (f"{path}: permission denied: it belongs to {owner[1]} (uid {owner[0]}), not to "
                    f"you (uid {os.geteuid()}); use your own runs folder: set QLORA_WATCH_HOME to a "
                    "folder of your own")
        return (f"{path}: permission denied; make it readable and writable by you "
                f"(`chmod u+rwx {path}`) {HOME_FIX}")
    if code == errno.EROFS:
        return f"{path}: read-only file system; set QLORA_WATCH_HOME to a writable folder"
    if code in (errno.ENOSPC, errno.EDQUOT):
        return (f"{path}: no space left on the device ({_free(path)}); free some space {HOME_FIX} "
                "on a bigger disk")
    if code == errno.ENOTDIR:
        return f"{path}: not a folder; remove or rename it, {HOME_FIX}"
    return f"{path}: {what}"


def explain_sqlite(e: sqlite3.Error, path: Path | None = None) -> str:
    from supervisor import paths

    where = path or paths.runs_dir()
    msg = str(e)
    if "locked" in msg:
        return (f"{where}: the run's database is locked by another process (a stale lock from a "
                f"stopped process clears when it exits; see `fuser {where}/*/db.sqlite`)")
    if "readonly" in msg or "read-only" in msg:
        return f"{where}: the run's database is read-only; make it writable by you {HOME_FIX}"
    if "disk" in msg and "full" in msg:
        return f"{where}: the disk holding the runs is full ({_free(where)}); free some space {HOME_FIX}"
    return f"{where}: the run's database cannot be used ({msg}); check the folder's permissions {HOME_FIX}"


def explain(e: BaseException) -> str | None:
    """The one-line message for an error the CLI turns into exit 2, None for others."""
    if isinstance(e, sqlite3.Error):
        return explain_sqlite(e)
    if isinstance(e, (ConnectionError, TimeoutError)) and not e.filename:
        return (f"cannot reach the supervisor ({e.strerror or e}); `qlora-watch status` restarts a "
                "supervisor that died")
    if isinstance(e, OSError):
        return explain_os_error(e)
    return None

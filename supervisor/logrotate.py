"""Rotation for the supervisor's own logs, like the trainer log's (wrapper.RotatingLog).

`supervisor.log` is written through a `RotatingFileHandler`; `supervisor.out` is the
supervisor's stdout/stderr, an O_APPEND file it cannot reopen, so it is rotated by copy and
truncate (logrotate's `copytruncate`): appends after the truncate land at the new end. Both
keep `supervisor.log_backups` numbered backups of at most `supervisor.log_max_bytes`, 0600.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import shutil
from pathlib import Path

CHECK_EVERY_S = 2.0  # how often the supervisor looks at supervisor.out's size


def shift(path: Path, backups: int) -> None:
    """path.1 .. path.(backups-1) move up one number (the oldest is overwritten)."""
    for i in range(backups - 1, 0, -1):
        src = path.with_name(f"{path.name}.{i}")
        if src.exists():
            os.replace(src, path.with_name(f"{path.name}.{i + 1}"))


def rotate(path: Path, max_bytes: int, backups: int) -> bool:
    """Rename an oversized file to .1 (for a file nobody holds open); True if rotated."""
    try:
        if path.stat().st_size <= max_bytes:
            return False
    except OSError:
        return False
    if backups <= 0:
        os.truncate(path, 0)
        return True
    shift(path, backups)
    os.replace(path, path.with_name(f"{path.name}.1"))
    return True


def copy_truncate(path: Path, max_bytes: int, backups: int) -> bool:
    """Rotate a file another fd appends to: copy it to .1, then truncate it in place."""
    try:
        if path.stat().st_size <= max_bytes:
            return False
    except OSError:
        return False
    if backups > 0:
        shift(path, backups)
        dest = path.with_name(f"{path.name}.1")
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(path, "rb") as src, os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(src, out)
    os.truncate(path, 0)
    return True


def log_handler(path: Path, max_bytes: int, backups: int) -> logging.Handler:
    """supervisor.log's handler: rotated at max_bytes, `backups` kept (files 0600 under umask 077)."""
    h = logging.handlers.RotatingFileHandler(path, maxBytes=max_bytes, backupCount=backups)
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    return h

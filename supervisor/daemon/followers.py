"""Followers for the trainer's files: the JSON-lines events file and the rotated log.

Both read only complete lines (a fragment cut by a kill is buffered, never parsed), cap the
bytes read per call so a flood cannot stall the supervisor, and survive garbage.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

MAX_READ = 4 * 1024 * 1024  # per call; the rest is read on the next tick
MAX_LINE = 64 * 1024


class JsonlFollower:
    """New JSON objects appended to a file since the last call."""

    def __init__(self, path: Path, offset: int = 0):
        self.path = Path(path)
        self.offset = offset
        self.buf = b""
        self.bad_records = 0
        self.truncated_records = 0

    def read(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < self.offset:  # replaced or truncated: start over
                    self.offset, self.buf = 0, b""
                f.seek(self.offset)
                data = f.read(MAX_READ)
        except OSError:
            return []
        self.offset += len(data)
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        if len(self.buf) > MAX_LINE:
            self.buf = b""
            self.truncated_records += 1
        out = []
        for raw in lines:
            raw = raw.strip()
            if not raw:
                continue
            try:
                obj = json.loads(raw.decode("utf-8", errors="replace"))
            except ValueError:
                self.bad_records += 1
                continue
            if isinstance(obj, dict):
                out.append(obj)
            else:
                self.bad_records += 1
        return out


class LogFollower:
    """New lines of a log that the wrapper rotates (inode change) or a user truncates."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.ino: int | None = None
        self.offset = 0
        self.buf = b""

    def read(self) -> list[str]:
        out: list[str] = []
        try:
            st = os.stat(self.path)
        except OSError:
            return out
        if self.ino is not None and st.st_ino != self.ino:
            out += self._drain_rotated()
            self.offset, self.buf = 0, b""
        elif st.st_size < self.offset:
            out.append("[qlora-watch: log file truncated]")
            self.offset, self.buf = 0, b""
        self.ino = st.st_ino
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read(MAX_READ)
        except OSError:
            return out
        self.offset += len(data)
        return out + self._lines(data)

    def _drain_rotated(self) -> list[str]:
        """Finish the old file (now trainer.log.1) from where we were."""
        old = self.path.with_name(self.path.name + ".1")
        try:
            with open(old, "rb") as f:
                if os.fstat(f.fileno()).st_ino != self.ino:
                    return []
                f.seek(self.offset)
                return self._lines(f.read(MAX_READ))
        except OSError:
            return []

    def _lines(self, data: bytes) -> list[str]:
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        if len(self.buf) > MAX_LINE:
            lines.append(self.buf[:MAX_LINE])
            self.buf = b""
        return [ln.decode("utf-8", errors="replace") for ln in lines]

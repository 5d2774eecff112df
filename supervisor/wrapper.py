"""The trainer's real parent: pipes its output into a rotated log and writes an exit file.

    python -m supervisor.wrapper --exit-file F --log L [--max-bytes N] [--backups K] -- ARGV...

It runs in the trainer's own session and process group (the supervisor starts it with
start_new_session=True), so it outlives a killed supervisor and the trainer's exit status is
never lost: a re-adopted trainer is not the new supervisor's child, so waitpid() cannot tell
it; the exit file can (conmon does the same for containers). It ignores SIGTERM/SIGINT/SIGHUP
sent to the group (the trainer gets them and decides) and stays until the trainer is gone.
No torch here: it must start in milliseconds.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from supervisor.logrotate import shift
from supervisor.redact import redact

_EOL = re.compile(rb"[\r\n]")
MAX_LINE = 64 * 1024  # longer lines are cut (tqdm \r floods, 10 MB lines with no newline)
TAIL_LINES = 400  # a deep training traceback runs to 150+ lines
TRUNCATED = b" [line truncated]"
EXIT_CHECK_S = 0.5  # how often the read loop checks whether the trainer has exited
DRAIN_MAX = 4 * 1024 * 1024  # bytes read from the pipe after the trainer's exit


class RotatingLog:
    """Append-only log with a size cap and N numbered backups, files 0600."""

    def __init__(self, path: Path, max_bytes: int, backups: int):
        self.path, self.max_bytes, self.backups = path, max_bytes, backups
        # Opened at the first write: a warm standby's wrapper (daemon/standby.py) waits beside
        # the running attempt's, and must not hold a file that the other one rotates away.
        self.f: Any = None

    def _open(self):
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        return os.fdopen(fd, "ab", buffering=0)

    def write(self, data: bytes) -> None:
        try:
            if self.f is None:
                self.f = self._open()
            if self.f.tell() + len(data) > self.max_bytes:
                self.rotate()
            self.f.write(data)
        except OSError:
            pass  # a full disk must not kill the trainer's pipe: drop log output instead

    def rotate(self) -> None:
        if self.f is not None:
            self.f.close()
        shift(self.path, self.backups)
        if self.backups > 0:
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        else:
            os.truncate(self.path, 0)
        self.f = self._open()


class LineSplitter:
    """Bytes in, complete lines out; splits on \\n and \\r, caps line length.

    A line longer than MAX_LINE is cut once, marked, counted in `truncated`, and the rest of
    it (up to the next line end) is dropped, so a 10 MB line costs one capped line, not 160.
    """

    def __init__(self) -> None:
        self.buf = bytearray()
        self.truncated = 0
        self.skipping = False  # inside the dropped tail of an over-long line

    def feed(self, data: bytes) -> list[bytes]:
        if self.skipping:
            m = _EOL.search(data)
            if m is None:
                return []
            data = data[m.end():]
            self.skipping = False
        self.buf += data
        parts = _EOL.split(bytes(self.buf))
        self.buf = bytearray(parts[-1])
        out = []
        for line in parts[:-1]:
            if len(line) > MAX_LINE:
                out.append(line[:MAX_LINE] + TRUNCATED)
                self.truncated += 1
            elif line:
                out.append(line)
        if len(self.buf) > MAX_LINE:
            out.append(bytes(self.buf[:MAX_LINE]) + TRUNCATED)
            self.truncated += 1
            self.buf.clear()
            self.skipping = True
        return out

    def flush(self) -> list[bytes]:
        rest, self.buf = bytes(self.buf), bytearray()
        return [rest] if rest else []


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="supervisor.wrapper")
    ap.add_argument("--exit-file", required=True)
    ap.add_argument("--log", required=True)
    ap.add_argument("--max-bytes", type=int, default=50 * 1024 * 1024)
    ap.add_argument("--backups", type=int, default=3)
    ap.add_argument("--cwd", default=None)
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        ap.error("no command")

    # A Python handler, not SIG_IGN: SIG_IGN would be inherited by the trainer across exec.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: None)

    log = RotatingLog(Path(args.log), args.max_bytes, args.backups)
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    started = time.time()
    try:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            close_fds=True, cwd=args.cwd,
        )
    except OSError as e:
        msg = f"cannot start {cmd[0]!r}: {e.strerror} (errno {e.errno})"
        log.write((msg + "\n").encode())
        _write_exit(args.exit_file, {"returncode": 127, "signal": None, "spawn_error": msg,
                                     "errno": e.errno, "pid": None, "started_at": started,
                                     "ended_at": time.time(), "tail": [msg]})
        return 127
    _write_json(Path(args.exit_file).with_name("trainer.pid.json"),
                {"pid": proc.pid, "wrapper_pid": os.getpid(), "started_at": started})

    splitter = LineSplitter()
    fd = proc.stdout.fileno()  # type: ignore[union-attr]

    def emit(lines: list[bytes]) -> None:
        for raw in lines:
            text = redact(raw.decode("utf-8", errors="replace"))
            tail.append(text)
            log.write(text.encode("utf-8", errors="replace") + b"\n")

    # Read until EOF, but also stop once the trainer itself has exited: forked workers that
    # outlive it inherit the pipe and would otherwise keep us (and the supervisor) waiting
    # forever for an exit that already happened.
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLHUP)
    next_check = time.monotonic() + EXIT_CHECK_S
    while True:
        ready = poller.poll(EXIT_CHECK_S * 1000)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            emit(splitter.feed(chunk))
        if not ready or time.monotonic() >= next_check:
            next_check = time.monotonic() + EXIT_CHECK_S
            if proc.poll() is not None:
                emit(splitter.feed(_drain(fd)))  # what is buffered now; later output is the workers'
                break
    emit(splitter.flush())
    rc = proc.wait()  # PEP 475: the handlers above return, so waitpid() retries on EINTR
    sig = -rc if rc < 0 else None
    _write_exit(args.exit_file, {
        "returncode": rc, "signal": sig, "pid": proc.pid, "started_at": started,
        "ended_at": time.time(), "tail": list(tail), "truncated_lines": splitter.truncated,
    })
    return rc if rc >= 0 else 128 + (sig or 0)


def _drain(fd: int) -> bytes:
    """What the pipe holds right now, without blocking (at most DRAIN_MAX bytes)."""
    os.set_blocking(fd, False)
    out = bytearray()
    try:
        while len(out) < DRAIN_MAX:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            out += chunk
    except BlockingIOError:
        pass
    return bytes(out)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_exit(path: str, data: dict) -> None:
    try:
        _write_json(Path(path), data)
    except OSError as e:  # disk full: the supervisor falls back to waitpid / "unknown"
        print(f"qlora-watch wrapper: cannot write exit file: {e}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())

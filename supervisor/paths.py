"""Where qlora-watch keeps things: the state home, run folders, the private socket dir and file.

Sockets live apart from run data, in `/tmp/qlora-watch-<uid>/` (0700, checked like tmux's
`/tmp/tmux-<uid>`): not `$XDG_RUNTIME_DIR`, which pam_systemd removes at the user's last logout
while the supervisor goes on (a supervisor whose socket or folder vanishes binds it again within
a second or two: server.py `ensure_bound`). A test that sets `QLORA_WATCH_HOME` gets `<home>/sock`
instead, so parallel tests never share a socket dir. A socket path must fit `sun_path`
(108 bytes with the NUL), so a deep state home falls back to a short hashed dir in /tmp.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import socket
import stat
from pathlib import Path

import platformdirs

log = logging.getLogger(__name__)

APP_NAME = "qlora-watch"
HOME_ENV = "QLORA_WATCH_HOME"
SUN_PATH_MAX = 107  # sizeof(sun_path) == 108 on Linux, one byte for the terminating NUL
# Room that socket_dir() keeps for "/<name>.sock" when it does not know the name yet.
SOCKET_NAME_RESERVE = 40
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class UnsafeDirError(RuntimeError):
    """A folder is not what it must be: a private directory with the wrong owner, type or mode
    (sockets, run store), or a checkpoint output dir that is no longer the folder we opened
    (swapped, replaced by a symlink, removed: checkpoints/delete.py)."""


class AlreadyRunning(RuntimeError):
    """Another server is listening on this socket path (or the path is not a socket)."""


class SocketPathTooLong(ValueError):
    """Even the fallback socket dir cannot hold this name within sun_path."""


def state_home() -> Path:
    """$QLORA_WATCH_HOME if set, else the platform's user state dir."""
    env = os.environ.get(HOME_ENV)
    if env:
        return Path(env).expanduser().absolute()
    return Path(platformdirs.user_state_dir(APP_NAME))


def runs_dir() -> Path:
    """The folder holding one sub-folder per run."""
    return state_home() / "runs"


def check_run_id(run_id: str) -> str:
    """Return run_id if it is a safe single path component, else raise ValueError."""
    # A run id becomes a path component twice (run dir and socket name): no '/', no '..'.
    if not _RUN_ID.match(run_id):
        raise ValueError(f"invalid run id {run_id!r}: use letters, digits, '.', '_' or '-'")
    return run_id


def run_dir(run_id: str) -> Path:
    """The folder of one run."""
    return runs_dir() / check_run_id(run_id)


def tmp_socket_base() -> Path:
    """/tmp/qlora-watch-<uid>: the fallback socket dir, shared by all state homes of this user."""
    return Path("/tmp") / f"{APP_NAME}-{os.geteuid()}"


def _fits(directory: Path, reserve: int) -> bool:
    return len(os.fsencode(str(directory))) + reserve <= SUN_PATH_MAX


def socket_dir(reserve: int = SOCKET_NAME_RESERVE) -> Path:
    """The private dir for run sockets, leaving `reserve` bytes for "/<name>.sock"."""
    if os.environ.get(HOME_ENV):
        home = state_home()
        preferred = home / "sock"
        if _fits(preferred, reserve):
            return preferred
        # H5: deep test homes overflow sun_path; hash the home so tests stay isolated.
        digest = hashlib.sha256(os.fsencode(str(home))).hexdigest()[:16]
        return tmp_socket_base() / digest
    # Not $XDG_RUNTIME_DIR (issue #14): removed at logout unless the user lingers, and a client
    # in another login (ssh, cron, a Slurm step) would not even see the same value.
    return tmp_socket_base()


def socket_path(run_id: str) -> Path:
    """The control socket of one run: socket_dir()/<run_id>.sock."""
    name = f"{check_run_id(run_id)}.sock"
    path = socket_dir(reserve=len(os.fsencode(name)) + 1) / name
    if len(os.fsencode(str(path))) > SUN_PATH_MAX:
        raise SocketPathTooLong(f"socket path {path} is longer than {SUN_PATH_MAX} bytes")
    return path


def _check_private(path: Path) -> None:
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise UnsafeDirError(f"unsafe permissions on {path}: {exc.strerror}") from exc
    if not stat.S_ISDIR(st.st_mode):
        kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory"
        raise UnsafeDirError(f"unsafe permissions on {path}: {kind}")
    if st.st_uid != os.geteuid():
        raise UnsafeDirError(
            f"unsafe permissions on {path}: owned by uid {st.st_uid}, not {os.geteuid()}"
        )
    if st.st_mode & 0o077:
        raise UnsafeDirError(
            f"unsafe permissions on {path}: mode {stat.S_IMODE(st.st_mode):04o}, want 0700"
        )


def ensure_private_dir(path: str | os.PathLike[str]) -> Path:
    """Create `path` (and missing parents) as 0700, then verify it like tmux does; return it."""
    target = Path(path).absolute()
    missing: list[Path] = []
    probe = target
    while not os.path.lexists(probe) and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            pass  # created concurrently; the lstat check below still judges it
    # Never chmod an existing dir into shape: a wrong owner or mode means someone else made it.
    _check_private(target)
    return target


def ensure_socket_dir(path: str | os.PathLike[str]) -> Path:
    """ensure_private_dir, and also the shared /tmp base when `path` is inside it."""
    target = Path(path).absolute()
    base = tmp_socket_base()
    if target != base and base in target.parents:
        # Anyone can pre-create /tmp/qlora-watch-<uid>; if it is not ours, our subdir isn't safe.
        ensure_private_dir(base)
    return ensure_private_dir(target)


def _remove_stale_socket(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise AlreadyRunning(f"{path} exists and is not a socket; not replacing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        # Nobody listens: a server was killed without cleaning up (supervisord checkused).
        log.info("removing stale socket %s", path)
        os.unlink(path)
        return
    except FileNotFoundError:
        return
    except OSError as exc:  # EAGAIN or a timeout: a full backlog, so someone is alive
        raise AlreadyRunning(f"{path} is in use ({exc})") from exc
    finally:
        probe.close()
    raise AlreadyRunning(f"a server is already listening on {path}")


def bind_private_socket(path: str | os.PathLike[str]) -> socket.socket:
    """A non-blocking AF_UNIX socket bound at path (0600, in a checked 0700 dir), not listening."""
    target = Path(path).absolute()
    if len(os.fsencode(str(target))) > SUN_PATH_MAX:
        raise SocketPathTooLong(f"socket path {target} is longer than {SUN_PATH_MAX} bytes")
    ensure_socket_dir(target.parent)
    _remove_stale_socket(target)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # umask, not chmod after bind: there is no moment when the socket is 0777.
    old_umask = os.umask(0o177)
    try:
        sock.bind(str(target))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:  # lost a race with another server
            raise AlreadyRunning(f"a server is already listening on {target}") from exc
        raise
    finally:
        os.umask(old_umask)
    sock.setblocking(False)
    return sock

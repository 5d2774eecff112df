"""Where the state lives: QLORA_WATCH_HOME, the runtime-dir and /tmp fallbacks, private folders.
(The short-path fallback with a live server: tests/e2e/test_server.py.)"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from supervisor import paths

pytestmark = pytest.mark.timeout(120)


def test_paths_follow_qlora_watch_home(home: Path) -> None:
    assert paths.state_home() == home
    assert paths.runs_dir() == home / "runs" and paths.run_dir("r1") == home / "runs" / "r1"
    assert paths.socket_dir() == home / "sock"
    assert paths.socket_path("r1") == home / "sock" / "r1.sock"
    for bad in ("../x", "a/b", ".", "..", "", "-x"):
        with pytest.raises(ValueError):
            paths.run_dir(bad)


def test_runtime_dir_and_tmp_fallback(monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    monkeypatch.delenv("QLORA_WATCH_HOME")
    runtime = home.parent / "xdg"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    # not $XDG_RUNTIME_DIR: pam_systemd removes it at logout under a live supervisor (#14)
    assert paths.socket_dir() == Path(f"/tmp/qlora-watch-{os.geteuid()}")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(home.parent / "missing"))
    assert paths.socket_dir() == Path(f"/tmp/qlora-watch-{os.geteuid()}")
    monkeypatch.setenv("XDG_RUNTIME_DIR", "relative/dir")
    assert paths.socket_dir() == paths.tmp_socket_base()


def test_ensure_private_dir(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    made = paths.ensure_private_dir(home / "a" / "b")
    for d in (home, home / "a", made):
        assert stat.S_IMODE(os.lstat(d).st_mode) == 0o700
    loose = home / "loose"
    loose.mkdir()
    loose.chmod(0o755)
    with pytest.raises(paths.UnsafeDirError, match="unsafe permissions on .*loose.*0755"):
        paths.ensure_private_dir(loose)
    link = home / "link"
    link.symlink_to(made)
    with pytest.raises(paths.UnsafeDirError, match="symlink"):
        paths.ensure_private_dir(link)
    (home / "file").write_text("")
    with pytest.raises(paths.UnsafeDirError, match="not a directory"):
        paths.ensure_private_dir(home / "file")
    if os.geteuid() == 0:
        theirs = home / "theirs"
        theirs.mkdir(mode=0o700)
        os.chown(theirs, 65534, 65534)
        with pytest.raises(paths.UnsafeDirError, match="owned by uid 65534"):
            paths.ensure_private_dir(theirs)
        # A squatted /tmp/qlora-watch-<uid> makes every hashed subdir unsafe too.
        monkeypatch.setattr(paths, "tmp_socket_base", lambda: theirs)
        with pytest.raises(paths.UnsafeDirError, match="owned by uid 65534"):
            paths.ensure_socket_dir(theirs / "abc")

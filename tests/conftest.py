"""Shared fixtures: an isolated state home per test, a guard against leftover processes, the
source tree and wheel for the install tests. Helpers are in tests/support/, not here."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.support import ROOT, assert_no_leftovers, kill_leftover

# An edge not in states.EDGES, a state change without a reason, or a RunStatus field that is
# not declared raises under tests, in this process and in every supervisor it starts.
os.environ["QLW_STRICT_STATE"] = "1"


@pytest.fixture
def qlw_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """QLORA_WATCH_HOME for this test; at teardown, no process of it may be left behind."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("QLORA_WATCH_HOME", str(home))
    yield home
    assert_no_leftovers(home)


@pytest.fixture
def shared_home(monkeypatch: pytest.MonkeyPatch):
    """Like qlw_home, but under a folder uid 65534 can traverse (pytest's tmp_path cannot be)."""
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="qlw-", dir="/tmp"))
    base.chmod(0o711)
    home = base / "h"
    home.mkdir(mode=0o711)
    monkeypatch.setenv("QLORA_WATCH_HOME", str(home))
    yield home
    try:
        assert_no_leftovers(home)
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def home(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """QLORA_WATCH_HOME under a short folder uid 65534 can traverse (pytest's tmp_path sits
    under a 0700 dir; a socket path must fit sun_path); unlike shared_home, not created."""
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="qlw-", dir="/tmp"))
    base.chmod(0o711)
    monkeypatch.setenv("QLORA_WATCH_HOME", str(base / "h"))
    yield base / "h"
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def proc_guard(qlw_home: Path):
    """qlw_home, and also: no child of the test process (and none of their session/group
    leaders' descendants) started during the test may outlive it (TorchElastic's
    assert_pids_noexist). Survivors are SIGKILLed with their group, reaped, and the test fails.
    Use `proc_guard.track(pid)` for processes that carry no QLORA_WATCH_HOME."""

    class Guard:
        def __init__(self) -> None:
            self.home = qlw_home
            self.tracked: set[int] = set()

        def track(self, pid: int) -> None:
            self.tracked.add(pid)

    g = Guard()
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield g
    me = psutil.Process()
    deadline = time.monotonic() + 10
    while True:
        kids = [p for p in me.children(recursive=True) if p.pid not in before]
        kids += [psutil.Process(pid) for pid in g.tracked if psutil.pid_exists(pid)]
        live = []
        for p in kids:
            try:
                if p.status() == psutil.STATUS_ZOMBIE:
                    if p.ppid() == os.getpid():
                        os.waitpid(p.pid, os.WNOHANG)
                    continue
                live.append(p)
            except (psutil.Error, ChildProcessError):
                continue
        if not live or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    names = [n for n in (kill_leftover(p, reap=True) for p in live) if n]
    assert not names, f"processes left behind: {names}"


# ------------------------------------------------------------------------------ install tests


def copy_tree(dest: Path) -> Path:
    """The files a build reads, copied (a build must not write into the checkout)."""
    src = dest / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "supervisor", src / "supervisor", ignore=ignore)
    shutil.copytree(ROOT / "recipes", src / "recipes", ignore=ignore)
    return src


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_tree(tmp_path_factory.mktemp("tree"))


@pytest.fixture(scope="module")
def wheel(tree: Path) -> Path:
    """A wheel of this tree."""
    dist = tree.parent / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(dist), str(tree)], check=True, capture_output=True, timeout=120)
    return next(dist.glob("qlora_watch-*.whl"))

"""Shared fixtures: an isolated state home per test, and a guard against leftover processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Callable

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
FAKE = ROOT / "tests" / "fakes" / "fake_trainer.py"

# An edge not in states.EDGES, a state change without a reason, or a RunStatus field that is
# not declared raises under tests, in this process and in every supervisor it starts.
os.environ["QLW_STRICT_STATE"] = "1"


def _procs_with_home(home: Path) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["pid"]):
        if p.pid == os.getpid():
            continue
        try:
            if p.environ().get("QLORA_WATCH_HOME") == str(home):
                out.append(p)
        except (psutil.Error, OSError):
            continue
    return out


@pytest.fixture
def qlw_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """QLORA_WATCH_HOME for this test; at teardown, no process of it may be left behind."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("QLORA_WATCH_HOME", str(home))
    yield home
    assert_no_leftovers(home)


def _kill_leftover(p: psutil.Process, reap: bool = False) -> str | None:
    """SIGKILL a leftover process and its group; its description, None if it was already gone."""
    name = None
    try:
        name = f"{p.pid} {' '.join(p.cmdline()[:6])}"
        os.killpg(os.getpgid(p.pid), signal.SIGKILL)
    except (psutil.Error, OSError):
        pass
    try:
        p.kill()
        if reap and p.ppid() == os.getpid():
            os.waitpid(p.pid, 0)
    except (psutil.Error, OSError):
        pass
    return name


def assert_no_leftovers(home: Path) -> None:
    """Fail (after killing them) if processes carrying QLORA_WATCH_HOME=home are still alive."""
    deadline = time.monotonic() + 10
    left = _procs_with_home(home)
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = [p for p in left if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    names = [n for n in (_kill_leftover(p) for p in left) if n]
    assert not names, f"processes left behind: {names}"


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
    names = [n for n in (_kill_leftover(p, reap=True) for p in live) if n]
    assert not names, f"processes left behind: {names}"


def qlw(*args: str, timeout: float = 120, check: bool = False, **kw: Any) -> subprocess.CompletedProcess:
    """Run the real CLI as a subprocess."""
    res = subprocess.run([sys.executable, "-m", "supervisor", *args], capture_output=True,
                         text=True, timeout=timeout, cwd=kw.pop("cwd", ROOT), **kw)
    if check and res.returncode != 0:
        raise AssertionError(f"qlora-watch {' '.join(args)} -> {res.returncode}\n{res.stdout}\n{res.stderr}")
    return res


def fake_recipe(tmp_path: Path, fake_args: list[str], extra: str = "", name: str = "fake",
                ladder: str | None = None) -> Path:
    """A recipe whose trainer is the scripted fake trainer, with tiny timing constants."""
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"text": "hello"}) + "\n")
    cmd = json.dumps([sys.executable, str(FAKE), *fake_args])
    ladder = ladder if ladder is not None else (
        'oom_ladder = [{ "train.max_seq_len" = 768 }, { "lora.r" = 8 }, '
        '{ "lora.target_modules" = ["q_proj", "v_proj"] }]'
    )
    text = textwrap.dedent(f"""
        name = "{name}"
        {ladder}
        [model]
        name = "fake-model"
        [model.tiny]
        hidden_size = 32
        num_layers = 1
        num_heads = 2
        num_kv_heads = 1
        intermediate_size = 64
        [data]
        path = "{data}"
        [train]
        output_dir = "{tmp_path / 'out'}"
        max_seq_len = 1024
        per_device_batch = 2
        grad_accum = 4
        save_total_limit = 3
        [trainer]
        command = {cmd}
        [supervisor]
        sample_interval_s = 0.2
        stop_grace_s = 5
        [guards.crash]
        backoff_base_s = 0.05
        backoff_max_s = 0.2
        max_restarts = 3
        [guards.oom]
        release_timeout_s = 10
    """)
    p = tmp_path / f"{name}.toml"
    p.write_text(text + "\n" + textwrap.dedent(extra))
    return p


def wait_for(pred: Callable[[], Any], timeout: float = 30, interval: float = 0.05, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what or pred}")


def read_state(home: Path, run_id: str) -> dict[str, Any]:
    from supervisor.store import read_json

    return read_json(home / "runs" / run_id / "state.json") or {}

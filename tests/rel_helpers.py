"""Helpers shared by the tests/test_reliability_*.py files (RELIABILITY_PLAN harness)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import psutil

from tests.conftest import ROOT, qlw, read_state, wait_for

PATCHED = ROOT / "tests" / "fakes" / "patched_supervisor.py"


# ------------------------------------------------------------------------------ clock


class FakeClock:
    """An injectable clock: monotonic and wall time move separately (RELIABILITY_PLAN harness).

    `jump_wall(s)` moves only the wall clock (NTP step, a VM resumed, a user setting the date);
    `advance(s)` moves both, as real time passing does. Pass `clock.time` / `clock.monotonic`
    where code takes a clock, or install it as a module's `time` with `as_time_module()`.
    """

    def __init__(self, wall: float = 1.7e9, mono: float = 1000.0) -> None:
        self.wall = wall
        self.mono = mono

    def time(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def advance(self, s: float) -> None:
        self.wall += s
        self.mono += s

    def jump_wall(self, s: float) -> None:
        self.wall += s

    def as_time_module(self) -> Any:
        import types

        mod = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("__")})
        mod.time = self.time
        mod.monotonic = self.monotonic
        mod.sleep = lambda s: self.advance(s)
        return mod


# ------------------------------------------------------------------------------ runs


def start(recipe: Path, *extra: str) -> str:
    """`qlora-watch start RECIPE --detach`; the run id."""
    res = qlw("start", str(recipe), "--detach", "--force", *extra, check=True)
    return res.stdout.strip().splitlines()[-1]


def run_dir(home: Path, run_id: str) -> Path:
    return home / "runs" / run_id


def launches(record: Path) -> list[dict[str, Any]]:
    """What each launch of the fake trainer received (--record)."""
    if not record.exists():
        return []
    return [json.loads(x) for x in record.read_text().splitlines() if x.strip()]


def events(home: Path, run_id: str) -> list[dict[str, Any]]:
    db = sqlite3.connect(run_dir(home, run_id) / "db.sqlite")
    try:
        rows = db.execute("SELECT kind, level, message, evidence FROM events ORDER BY id").fetchall()
    finally:
        db.close()
    return [{"kind": k, "level": lv, "message": m, "evidence": json.loads(e or "{}")}
            for k, lv, m, e in rows]


def kinds(home: Path, run_id: str) -> list[str]:
    return [e["kind"] for e in events(home, run_id)]


def supervisor_pid(home: Path, run_id: str) -> int | None:
    """The pid holding the run's flock, or None when no supervisor runs."""
    from supervisor.control import runs
    from supervisor.store import RunStore

    store = RunStore(run_dir(home, run_id))
    if not runs.supervisor_running(store):
        return None
    try:
        return int((store.path / "supervisor.lock").read_text().strip())
    except (OSError, ValueError):
        return None


def trainer_pid(home: Path, run_id: str) -> int | None:
    st = read_state(home, run_id)
    try:
        data = json.loads((run_dir(home, run_id) / "attempts" / str(st.get("attempt") or 1)
                           / "trainer.pid.json").read_text())
        return int(data["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def state_of(home: Path, run_id: str) -> str | None:
    return read_state(home, run_id).get("state")


def wait_state(home: Path, run_id: str, *states: str, timeout: float = 30) -> dict[str, Any]:
    wait_for(lambda: state_of(home, run_id) in states, timeout=timeout,
             what=f"state in {states} (now {state_of(home, run_id)})")
    return read_state(home, run_id)


def wait_step(home: Path, run_id: str, n: int, timeout: float = 30) -> None:
    wait_for(lambda: (read_state(home, run_id).get("step") or 0) >= n, timeout=timeout,
             what=f"step {n}")


def wait_end(run_id: str, timeout: float = 60) -> int:
    """`qlora-watch wait`: 0 completed, 1 another terminal state, 124 timeout."""
    return qlw("wait", run_id, "--timeout", str(timeout), timeout=timeout + 30).returncode


def stop_now(run_id: str) -> None:
    qlw("stop", run_id, "--now")
    qlw("wait", run_id, "--timeout", "30", timeout=60)


def run_processes(run_id: str) -> list[psutil.Process]:
    """Live (non-zombie) processes launched for this run: wrapper, trainer, workers."""
    out = []
    for p in psutil.process_iter(["pid"]):
        try:
            if p.environ().get("QLW_RUN_ID") == run_id and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (psutil.Error, OSError):
            continue
    return out


def kill_run_processes(run_id: str) -> None:
    for p in run_processes(run_id):
        try:
            os.killpg(os.getpgid(p.pid), signal.SIGKILL)
        except OSError:
            pass
        try:
            p.kill()
        except psutil.Error:
            pass


def create_run(recipe: Path, *overrides: str):
    """A run folder made the way `start` makes it, with no supervisor yet; its RunStore."""
    from supervisor.control import runs
    from supervisor.recipe import load_recipe

    return runs.create(str(recipe), load_recipe(recipe, list(overrides)), None)


def spawn_patched(store: Any, scenario: dict[str, Any]) -> subprocess.Popen:
    """The real supervisor with faults injected (tests/fakes/patched_supervisor.py), detached
    like `qlora-watch start` does it. Returns once it holds the run's lock."""
    from supervisor.control import runs

    out = open(store.path / "supervisor.out", "ab")
    try:
        proc = subprocess.Popen(
            [sys.executable, str(PATCHED), str(store.path), json.dumps(scenario)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True, cwd=str(ROOT),
        )
    finally:
        out.close()
    wait_for(lambda: runs.supervisor_running(store) or proc.poll() is not None, timeout=30,
             what="the patched supervisor")
    return proc


def reap(proc: subprocess.Popen, timeout: float = 30) -> int | None:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(10)


# ------------------------------------------------------------------------------ namespaces


def run_in_tmpfs(mountpoint: Path, size: str, script: str, timeout: float = 120,
                 env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run a Python script in a private mount namespace with a size-limited tmpfs at
    `mountpoint` (`unshare -m`, root only). The script prints one JSON object last; that
    object is returned. Everything the script starts lives in that namespace."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    code = textwrap.dedent(script)
    driver = mountpoint.parent / f"driver-{mountpoint.name}.py"
    driver.write_text(f"import sys\nsys.path.insert(0, {str(ROOT)!r})\n" + code)
    cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c",
           f'mount -t tmpfs -o size={size},mode=0755 tmpfs "$1" && exec "$2" "$3"', "sh",
           str(mountpoint), sys.executable, str(driver)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(ROOT),
                         env={**os.environ, **(env or {})})
    lines = [x for x in res.stdout.splitlines() if x.startswith("{")]
    if res.returncode != 0 or not lines:
        raise AssertionError(f"driver failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return json.loads(lines[-1])


def fake_cmd(*args: str) -> str:
    """The `[trainer] command` TOML value running the fake trainer with args."""
    from tests.conftest import FAKE

    return json.dumps([sys.executable, str(FAKE), *args])

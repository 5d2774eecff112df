"""Helpers shared by the tests, in one place: the CLI as a subprocess, fake-trainer recipes,
waiting, the run folder's state, events and processes, checkpoints on disk, the fault-injected
supervisor, sockets as another user. Textual helpers are in tests/support/tui.py (so the e2e tests
load no Textual), the synthetic report run in tests/support/report_run.py.

Tests import from here, never from another test module.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Callable

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"
FAKE = TESTS / "fakes" / "fake_trainer.py"
PATCHED = TESTS / "fakes" / "patched_supervisor.py"
FIXTURES = TESTS / "fixtures"  # recorded runs for the dashboard
DATA = TESTS / "data"  # captured from real runs (tests/unit/test_gpu_regressions.py)
NOBODY = 65534


# ------------------------------------------------------------------------------ the CLI, recipes


def qlw(*args: str, timeout: float = 120, check: bool = False, **kw: Any) -> subprocess.CompletedProcess:
    """Run the real CLI as a subprocess."""
    res = subprocess.run([sys.executable, "-m", "supervisor", *args], capture_output=True,
                         text=True, timeout=timeout, cwd=kw.pop("cwd", None) or ROOT, **kw)
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


def fake_cmd(*args: str) -> str:
    """The `[trainer] command` TOML value running the fake trainer with args."""
    return json.dumps([sys.executable, str(FAKE), *args])


def recipe_file(tmp_path: Path, text: str | bytes, name: str = "r.toml") -> Path:
    """A recipe file with exactly these bytes (malformed ones included)."""
    p = tmp_path / name
    p.write_bytes(text.encode() if isinstance(text, str) else text)
    return p


def tiny_recipe_json(folder: Path, *overrides: str) -> Path:
    """The tiny recipe with overrides, resolved to JSON as the supervisor writes it."""
    from supervisor.recipe import load_recipe, recipe_to_json

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.json"
    path.write_text(recipe_to_json(load_recipe(ROOT / "recipes" / "tiny.toml", list(overrides))))
    return path


def wait_for(pred: Callable[[], Any], timeout: float = 30, interval: float = 0.05, what: str = "") -> Any:
    """Poll pred until it returns something true (that value), or fail after timeout seconds."""
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


def jsonl(path: Path) -> list[dict[str, Any]]:
    """The objects of a JSON-lines file (a trainer's events.jsonl, the fake's --record); [] if absent."""
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def wait_for_events(path: Path, pred: Callable[[list[dict[str, Any]]], Any], proc: subprocess.Popen[str],
                    timeout: float = 120) -> list[dict[str, Any]]:
    """Poll a trainer's events.jsonl until pred(events) holds; fail if proc exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = jsonl(path)
        if pred(events):
            return events
        if proc.poll() is not None:
            assert proc.stderr is not None
            raise AssertionError(f"trainer exited early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("timed out waiting for an event")


def fake_unsloth(tmp_path: Path, body: str) -> Path:
    """A package named unsloth whose __init__ is `body`; returns the folder to put on sys.path."""
    site = tmp_path / "site"
    (site / "unsloth").mkdir(parents=True)
    (site / "unsloth" / "__init__.py").write_text(body)
    return site


# ------------------------------------------------------------------------------ clock


class RecordingWriter:
    """The trainer's EventWriter as far as the caches use it: events kept in a list."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def emit(self, event: str, **f: Any) -> None:
        self.events.append({"event": event, **f})

    def notice(self, message: str, **f: Any) -> None:
        self.emit("notice", message=message, **f)

    def messages(self) -> list[str]:
        return [e["message"] for e in self.events if e["event"] == "notice"]

    def phases(self) -> list[str]:
        return [e["phase"] for e in self.events if e["event"] == "timing"]


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


def start(recipe: Path, *extra: str, force: bool = True) -> str:
    """`qlora-watch start RECIPE --detach [--force]`; the run id."""
    res = qlw("start", str(recipe), "--detach", *(["--force"] if force else []), *extra, check=True)
    return res.stdout.strip().splitlines()[-1]


def run_dir(home: Path, run_id: str) -> Path:
    return home / "runs" / run_id


def launches(record: Path) -> list[dict[str, Any]]:
    """What each launch of the fake trainer received (--record)."""
    return jsonl(record)


def events(home: Path, run_id: str) -> list[dict[str, Any]]:
    """The run's events from its SQLite store, oldest first."""
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


# ------------------------------------------------------------------------------ test data

# Secrets shaped like real ones, for the redaction tests.
HF = "hf_" + "aB3dE6gH9jK2mN5pQ8sT1vW4yZ7bC0eF3h"  # 34 characters after hf_, like a real one
WANDB = "0123456789abcdef0123456789abcdef01234567"  # 40 hex
HUB = "sekrit-hub-value-4711"
AWS = "AKIA" + "ABCDEFGHIJKLMNOP"

# What a trainer may print that a terminal must not execute (escape sequences, controls).
EVIL = [
    "\x1b]52;c;cHduZWQ=\x07clipboard",  # OSC 52: write the user's clipboard
    "\x1b]0;owned title\x07title",  # OSC 0: window title
    "\x1b[2J\x1b[Hclear",  # clear the screen, cursor home
    "\x9b31mc1-csi\x9d0;x\x9c",  # 8-bit C1 CSI and OSC
    "bell\x07 backspace\x08 nul\x00 del\x7f",
    "\x1bP1$qm\x1b\\dcs",  # DCS request
]


# ------------------------------------------------------------------------------ checkpoints


def safetensors_bytes(header: dict | None = None, body: bytes = b"\0" * 64) -> bytes:
    h = json.dumps(header or {"__metadata__": {"format": "pt"}}).encode()
    return struct.pack("<Q", len(h)) + h + body


def make_ckpt(root: Path, step: int, *, global_step: int | None = None, state: str = "ok",
              adapter: str = "safetensors", sentinel: bool = False, best: str | None = None,
              files: int = 0) -> Path:
    """A checkpoint folder as transformers 5 writes it (trainer_state.json last); `files` extra
    one-byte shards (a folder that takes a while to delete). adapter="tensor": the smallest
    complete one, a single F32 tensor, the shards and trainer_state.json, nothing else."""
    d = root / f"checkpoint-{step}"
    d.mkdir(parents=True)
    if adapter == "tensor":
        header = {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
        (d / "adapter_model.safetensors").write_bytes(safetensors_bytes(header, b"\0" * 4))
        for i in range(files):
            (d / f"shard-{i}.bin").write_bytes(b"x")
        (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        return d
    (d / "adapter_config.json").write_text("{}")
    if adapter == "safetensors":
        (d / "adapter_model.safetensors").write_bytes(safetensors_bytes())
    elif adapter == "truncated":  # header length promises more than the file has
        (d / "adapter_model.safetensors").write_bytes(struct.pack("<Q", 10_000) + b"{}")
    elif adapter == "badjson":
        (d / "adapter_model.safetensors").write_bytes(struct.pack("<Q", 4) + b"{{{{" + b"\0" * 10)
    elif adapter == "bin":
        (d / "adapter_model.bin").write_bytes(b"PK\3\4" + b"\0" * 100)
    elif adapter == "emptybin":
        (d / "adapter_model.bin").write_bytes(b"")
    elif adapter in ("fsdp", "fsdp-unfinished", "fsdp-empty"):  # accelerate SHARDED_STATE_DICT
        (d / "pytorch_model_fsdp_0").mkdir()
        (d / "pytorch_model_fsdp_0" / "__0_0.distcp").write_bytes(b"\0" * 500)
        if adapter != "fsdp-unfinished":
            (d / "pytorch_model_fsdp_0" / ".metadata").write_bytes(b"" if adapter == "fsdp-empty" else b"\1" * 64)
    for i in range(files):
        (d / f"shard-{i}.bin").write_bytes(b"x")
    (d / "optimizer.pt").write_bytes(b"\0" * 1000)
    if sentinel:
        (d / "checkpoint-is-incomplete.txt").write_text("saving")
    ts = {"global_step": step if global_step is None else global_step, "log_history": []}
    if best:
        ts["best_model_checkpoint"] = str(root / best)
        ts["best_metric"] = 0.5
    if state == "ok":
        (d / "trainer_state.json").write_text(json.dumps(ts))
    elif state == "truncated":
        (d / "trainer_state.json").write_text(json.dumps(ts)[:10])
    return d


# ------------------------------------------------------------------------------ another user, sockets


def as_nobody(fn: Callable[[], Any]) -> Any:
    """Run fn() in a forked child with uid/gid nobody; return what it returned (JSON), or
    {"error": repr} if it raised. Skips the test unless run as root."""
    if os.geteuid() != 0:
        pytest.skip("needs root to drop privileges")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: no asyncio, no pytest; just syscalls, then _exit
        os.close(r)
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            out = fn()
        except BaseException as exc:  # noqa: BLE001 - report everything to the parent
            out = {"error": repr(exc)}
        try:
            os.write(w, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return json.loads(data)


class Raw:
    """A bare blocking socket speaking frames, for abuse and permission tests."""

    def __init__(self, path: Path | str, timeout: float = 10) -> None:
        from supervisor import protocol as proto

        self.proto = proto
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.decoder = proto.FrameDecoder(proto.MAX_FRAME_SERVER_TO_CLIENT)
        self.backlog: list[dict[str, Any]] = []

    def recv(self) -> dict[str, Any] | None:
        while not self.backlog:
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                return None
            self.backlog.extend(self.decoder.feed(data))
        return self.backlog.pop(0)

    def until_closed(self) -> list[dict[str, Any]]:
        out = []
        while (msg := self.recv()) is not None:
            out.append(msg)
        return out

    def send(self, msg: dict[str, Any]) -> None:
        self.sock.sendall(self.proto.encode(msg))

    def close(self) -> None:
        self.sock.close()


def nobody_connect(path: Path) -> Callable[[], dict[str, Any]]:
    """For as_nobody: connect to the socket at path, then read until it hangs up."""
    def attempt() -> dict[str, Any]:
        try:
            raw = Raw(path, timeout=5)
        except PermissionError:
            return {"result": "EACCES"}
        return {"result": "connected", "messages": raw.until_closed()}

    return attempt


def own_socket_inodes(pid: int) -> set[int]:
    """The inodes of the sockets process pid holds open (/proc/PID/fd)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


# The dashboard's "step N" in a pty's byte stream (escape sequences may sit between the words).
DASHBOARD_STEP = re.compile(rb"step (?:\x1b\[[0-9;?]*[A-Za-z])*(\d[\d,]*)")


def steps_seen(child: Any, n: int, timeout: float = 90) -> list[int]:
    """The step numbers a pexpect-driven dashboard shows until n distinct ones were seen."""
    seen: list[int] = []
    deadline = time.monotonic() + timeout
    while len(set(seen)) < n and time.monotonic() < deadline:
        child.expect(DASHBOARD_STEP)
        seen.append(int(child.match.group(1).decode().replace(",", "")))
    return seen


# ------------------------------------------------------------------------------ leftover processes


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


def kill_leftover(p: psutil.Process, reap: bool = False) -> str | None:
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
    names = [n for n in (kill_leftover(p) for p in left) if n]
    assert not names, f"processes left behind: {names}"

"""The warm standby: one trainer process with its imports done, waiting for the next attempt.

A relaunch of the built-in trainer pays ~15 s (measured on the H200 box) importing torch,
transformers, trl, peft and bitsandbytes before it reads a weight. The supervisor keeps one
process that has paid it already:

    python -m supervisor.wrapper --exit-file ATTEMPTS/N+1/exit.json ... -- \\
        python -m supervisor.runner.standby --dir STANDBY_DIR --parent PID:START --backend hf

It is started exactly like a trainer (procgroup.spawn: its own session and process group, under
the exit-file wrapper, output into the run's rotated log), so once it is handed an attempt it *is*
that attempt's trainer and everything the supervisor does with a trainer holds: stop and
SIGTERM-save, the exit file, re-adoption by pid + start time + command line after a supervisor
restart, the GPU-release check. Handing over: the supervisor writes DIR/go.json (the attempt's
env, cwd, argv; written atomically); the standby answers DIR/taken.json, replaces its environment
and working folder with the attempt's and runs `supervisor.runner.train.main(argv)` in-process.

CUDA is never initialised while it waits, so it holds no GPU memory and CUDA_VISIBLE_DEVICES in
the attempt's env still decides which GPU it gets (the driver reads it at cuInit). bitsandbytes
asks for the GPUs' compute capability at import (torch.cuda.get_device_capability initialises
CUDA): during the imports torch's check runs on NVML (PYTORCH_NVML_BASED_CUDA_CHECK=1) and the
capability is answered from NVML; a standby that finds CUDA initialised after its imports says so
and exits unused. The Unsloth backend imports only torch, datasets and bitsandbytes here (Unsloth
must be imported before transformers, and its import needs the GPU).

Used only for the built-in single-GPU trainer (`python -m supervisor.runner.train`); never for a
user's command (`qlora-watch run -- CMD`) or `accelerate launch`. Off with
`supervisor.warm_standby = false`. This module is the supervisor's half (stdlib only); the
standby's process is supervisor/runner/standby.py (trainer side).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from supervisor.store import atomic_write, read_json

POLL_S = 0.01  # how often an idle standby looks for go.json
PARENT_CHECK_S = 1.0
TRAIN_MODULE = "supervisor.runner.train"
# Keys an attempt sets per launch; any other difference from the standby's env means the
# standby's imports may have seen other settings (HF_HUB_OFFLINE, OMP_NUM_THREADS, ...): not used.
PER_ATTEMPT_PREFIXES = ("QLW_",)
PER_ATTEMPT_KEYS = frozenset({"CUDA_VISIBLE_DEVICES", "PYTHONUNBUFFERED"})
STANDBY_ONLY_KEYS = frozenset({"QLW_STANDBY"})


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write(path, json.dumps(data))  # the run store's: temp file, fsync, rename, 0600


def env_difference(standby_env: dict[str, str], attempt_env: dict[str, str]) -> list[str]:
    """Keys (not values: they may be secrets) where the attempt's env differs in a way that matters."""
    def keep(k: str) -> bool:
        return not k.startswith(PER_ATTEMPT_PREFIXES) and k not in PER_ATTEMPT_KEYS

    a = {k: v for k, v in standby_env.items() if keep(k)}
    b = {k: v for k, v in attempt_env.items() if keep(k)}
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def is_our_trainer(argv: list[str]) -> bool:
    """`python -m supervisor.runner.train [args]` with this interpreter."""
    return (len(argv) >= 3 and argv[1:3] == ["-m", TRAIN_MODULE]
            and os.path.realpath(argv[0]) == os.path.realpath(sys.executable))


# ------------------------------------------------------------------------------ the supervisor's side


def effective_visible(recipe: Any, env: dict[str, str]) -> str | None:
    """CUDA_VISIBLE_DEVICES as the trainer will have it (runner/settings.pin_one_gpu)."""
    from supervisor.runner.settings import pin_one_gpu

    probe = dict(env)
    pin_one_gpu(recipe, probe)
    return probe.get("CUDA_VISIBLE_DEVICES")


class StandbyManager:
    """Keeps at most one standby, for attempt N+1, and hands it the attempt when it matches."""

    TAKE_WAIT_S = 5.0  # a ready standby answers go.json within POLL_S; this is for a busy host
    IMPORTING_WAIT_S = 60.0  # one still importing is still ahead of a cold start

    def __init__(self, record: Any) -> None:
        self.record = record  # Supervisor.record(kind, message, level=...)
        self.current: dict[str, Any] | None = None
        self.said: set[str] = set()

    @staticmethod
    def off_reason(recipe: Any, argv: list[str]) -> str | None:
        if not recipe.supervisor.warm_standby:
            return "supervisor.warm_standby = false"
        if recipe.hardware.gpus > 1:
            return "hardware.gpus > 1 (accelerate launch)"
        if not is_our_trainer(argv):
            return "the command is not the built-in trainer"
        if os.environ.get("QLW_STANDBY") == "0":
            return "QLW_STANDBY=0"
        return None

    def _say_once(self, key: str, message: str) -> None:
        if key not in self.said:
            self.said.add(key)
            from supervisor.records import EventKind

            self.record(EventKind.STANDBY_NOTED, message)

    def start(self, *, attempt: int, folder: Path, env: dict[str, str], cwd: Path, backend: str, recipe: Any,
              exit_file: Path, log_path: Path, log_max_bytes: int, log_backups: int) -> None:
        """Spawn the standby for `attempt` (sync, milliseconds: the imports run in the child)."""
        from supervisor import procgroup

        if self.current is not None:
            return
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        env = dict(env)
        from supervisor.runner.settings import pin_one_gpu

        pin_one_gpu(recipe, env)  # as the trainer will: should an import initialise CUDA, the same GPU
        for name in ("go.json", "taken.json", "ready.json", "refused.json"):
            (folder / name).unlink(missing_ok=True)
        me = procgroup.identity_of(os.getpid())
        parent = f"{os.getpid()}:{me.create_time}" if me else str(os.getpid())
        argv = [sys.executable, "-m", "supervisor.runner.standby", "--dir", str(folder),
                "--parent", parent, "--backend", backend]
        env = {**env, "QLW_STANDBY": "1"}
        try:
            proc = procgroup.spawn(argv, env=env, cwd=cwd, exit_file=exit_file, log_path=log_path,
                                  log_max_bytes=log_max_bytes, log_backups=log_backups)
        except OSError as e:
            self._say_once("spawn", f"warm standby not started: {e}")
            return
        self.current = {"attempt": attempt, "proc": proc, "dir": folder, "env": env,
                        "started": time.time(), "backend": backend, "exit_file": exit_file}

    def pids(self) -> set[int]:
        """The idle standby's processes (its wrapper and the standby): not orphans to kill."""
        cur = self.current
        if cur is None:
            return set()
        import psutil

        out = {cur["proc"].pid}
        try:
            out |= {c.pid for c in psutil.Process(cur["proc"].pid).children(recursive=True)}
        except psutil.Error:
            pass
        return out

    def forget_if_reaped(self, statuses: dict[int, int]) -> None:
        """An idle standby that exited (its supervisor check, a failed import): drop it."""
        cur = self.current
        if cur is None or cur["proc"].pid not in statuses:
            return
        cur["proc"].returncode = statuses[cur["proc"].pid]
        ready = read_json(cur["dir"] / "ready.json") or {}
        if ready.get("why"):
            self._say_once("unusable", f"warm standby unusable: {ready['why']}")
        self.current = None

    def discard(self) -> None:
        """Kill the idle standby's group (it holds no GPU memory and no run state)."""
        from supervisor import procgroup

        cur, self.current = self.current, None
        if cur is None:
            return
        pgid = cur["proc"].pid
        procgroup.signal_group(pgid, 9)
        procgroup.wait_gone(pgid, 5.0)
        try:
            cur["proc"].wait(timeout=0.1)
        except Exception:  # noqa: BLE001 - reaped already by reap_children
            pass
        forget_unused_attempt(cur["exit_file"].parent)


    async def take(self, *, attempt: int, env: dict[str, str], cwd: Path, argv: list[str],
                   recipe: Any) -> Any:
        """The standby's Popen, now running `attempt`; None (cold launch) when it cannot be used."""
        import asyncio

        cur = self.current
        if cur is None:
            return None
        why = self.off_reason(recipe, argv)
        if why is None and cur["attempt"] != attempt:
            why = f"it was made for attempt {cur['attempt']}"
        if why is None and cur["proc"].poll() is not None:
            why = "it exited"
        ready = read_json(cur["dir"] / "ready.json")
        if why is None and ready is not None and not ready.get("usable"):
            why = str(ready.get("why") or "unusable")
        visible = effective_visible(recipe, env)
        if why is None and ready is not None and ready.get("pinned") and ready.get("visible") != visible:
            why = (f"an import initialised CUDA there with CUDA_VISIBLE_DEVICES={ready.get('visible')!r}; "
                   f"the attempt wants {visible!r}")
        diff = env_difference({k: v for k, v in cur["env"].items() if k not in STANDBY_ONLY_KEYS}, env)
        if why is None and diff:
            why = f"the attempt's environment differs in {', '.join(diff[:5])}"
        if why is not None:
            self._say_once(f"skip:{why}", f"warm standby not used: {why}; cold start")
            await asyncio.to_thread(self.discard)
            return None
        _write_json(cur["dir"] / "go.json", {"env": env, "cwd": str(cwd), "argv": argv,
                                             "attempt": attempt, "t": time.time(), "visible": visible})
        deadline = time.monotonic() + (self.TAKE_WAIT_S if ready else self.IMPORTING_WAIT_S)
        while time.monotonic() < deadline:
            if (cur["dir"] / "taken.json").exists():
                self.current = None
                return cur["proc"]
            if cur["proc"].poll() is not None or (cur["dir"] / "refused.json").exists():
                break
            await asyncio.sleep(POLL_S)
        refused = read_json(cur["dir"] / "refused.json")
        if refused:
            self._say_once("refused", f"warm standby not used: {refused.get('why')}; cold start")
        self._say_once("no-answer", "warm standby did not take the attempt; cold start")
        await asyncio.to_thread(self.discard)
        return None


# What the wrapper of a standby writes into the attempt folder it was made for.
STANDBY_WRAPPER_FILES = ("trainer.pid.json", "exit.json")


def forget_unused_attempt(adir: Path) -> None:
    """The attempt folder an unused standby was made for is not an attempt: an attempt is a folder
    the core launched into (its recipe.json comes first). Only the wrapper's own two files go,
    and the folder only if that leaves it empty."""
    if (adir / "recipe.json").exists():
        return
    for name in STANDBY_WRAPPER_FILES:
        try:
            (adir / name).unlink()
        except OSError:
            pass
    try:
        adir.rmdir()
    except OSError:
        pass

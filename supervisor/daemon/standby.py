"""The warm standby: one trainer process with its imports done, waiting for the next attempt.

A relaunch of the built-in trainer pays ~15 s (measured on the H200 box) importing torch,
transformers, trl, peft and bitsandbytes before it reads a weight. The supervisor keeps one
process that has paid it already:

    python -m supervisor.wrapper --exit-file ATTEMPTS/N+1/exit.json ... -- \\
        python -m supervisor.daemon.standby --dir STANDBY_DIR --parent PID:START --backend hf

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
`supervisor.warm_standby = false`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

POLL_S = 0.01  # how often an idle standby looks for go.json
PARENT_CHECK_S = 1.0
TRAIN_MODULE = "supervisor.runner.train"
# Keys an attempt sets per launch; any other difference from the standby's env means the
# standby's imports may have seen other settings (HF_HUB_OFFLINE, OMP_NUM_THREADS, ...): not used.
PER_ATTEMPT_PREFIXES = ("QLW_",)
PER_ATTEMPT_KEYS = frozenset({"CUDA_VISIBLE_DEVICES", "PYTHONUNBUFFERED"})
STANDBY_ONLY_KEYS = frozenset({"QLW_STANDBY"})


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


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


# ------------------------------------------------------------------------------ the process


def libcuda_loaded() -> bool:
    """Is the CUDA driver library mapped into this process (cuInit has been or may be called)?"""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            return any("libcuda.so" in line for line in f)
    except OSError:
        return False


class _NvmlAnswers:
    """Read-only torch.cuda queries answered from NVML while the stack imports, so that a
    library asking for the GPU's capability or name at import does not initialise CUDA.
    Homogeneous hosts only: every answer is the first visible GPU's (CUDA_VISIBLE_DEVICES
    may still change which one that is)."""

    def __init__(self) -> None:
        import pynvml

        pynvml.nvmlInit()
        self.nvml = pynvml
        self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        self.caps = [tuple(pynvml.nvmlDeviceGetCudaComputeCapability(h)) for h in self.handles]
        name = pynvml.nvmlDeviceGetName(self.handles[0]) if self.handles else "GPU"
        self.name = name.decode() if isinstance(name, bytes) else str(name)
        self.total = int(pynvml.nvmlDeviceGetMemoryInfo(self.handles[0]).total) if self.handles else 0

    def _index(self, device: Any) -> int:
        index = getattr(device, "idx", getattr(device, "index", device))
        return index if isinstance(index, int) and 0 <= index < len(self.caps) else 0

    def capability(self, device: Any = None) -> tuple[int, int]:
        return self.caps[self._index(device)]  # type: ignore[return-value]

    def properties(self, device: Any = None) -> Any:
        import types

        major, minor = self.capability(device)
        return types.SimpleNamespace(name=self.name, major=major, minor=minor,
                                     total_memory=self.total, multi_processor_count=0,
                                     gcnArchName="")

    def install(self, cuda: Any) -> dict[str, Any]:
        saved = {n: getattr(cuda, n) for n in ("get_device_capability", "get_device_properties",
                                                "get_device_name", "current_device",
                                                "is_bf16_supported")}
        cuda.get_device_capability = self.capability
        cuda.get_device_properties = self.properties
        cuda.get_device_name = lambda device=None: self.name
        cuda.current_device = lambda: 0
        cuda.is_bf16_supported = lambda *a, **k: self.caps[0] >= (8, 0)
        return saved

    def pid_mib(self, pid: int) -> float:
        total = 0.0
        for h in self.handles:
            try:
                procs = self.nvml.nvmlDeviceGetComputeRunningProcesses(h)
            except Exception:  # noqa: BLE001
                continue
            total += sum((p.usedGpuMemory or 0) for p in procs if p.pid == pid) / 2**20
        return total

    def close(self) -> None:
        try:
            self.nvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass


def warm_imports(backend: str) -> dict[str, Any]:
    """Import the training stack without initialising CUDA; returns what was found (and, if an
    import initialised CUDA anyway, its Python stack and the GPU memory this process holds)."""
    import importlib
    import traceback

    from supervisor.runner.backends import stack_modules

    t0 = time.perf_counter()
    had_check = os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK")
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
    nvml = None
    init_by: list[str] = []
    try:
        import torch

        if torch.version.cuda and torch.cuda.is_available():  # NVML-based: no cuInit
            try:
                nvml = _NvmlAnswers()
            except Exception:  # noqa: BLE001 - no NVML: an import may initialise CUDA
                nvml = None
        cuda = torch.cuda
        saved = nvml.install(cuda) if nvml is not None else {}
        lazy = cuda._lazy_init

        def recording_lazy_init() -> Any:
            if not init_by and not cuda.is_initialized():
                init_by.append("".join(traceback.format_stack(limit=14)[:-1])[-3000:])
            return lazy()

        cuda._lazy_init = recording_lazy_init
        try:
            for name in stack_modules(backend):
                importlib.import_module(name)
        finally:
            cuda._lazy_init = lazy
            for n, f in saved.items():
                setattr(cuda, n, f)
    finally:
        if had_check is None:
            os.environ.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)
        else:
            os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = had_check
    initialised = bool(torch.cuda.is_initialized())
    held = nvml.pid_mib(os.getpid()) if nvml is not None else 0.0
    if nvml is not None:
        nvml.close()
    return {"imports_s": round(time.perf_counter() - t0, 3),
            "cuda_env": {k: v for k, v in os.environ.items() if k.startswith(("CUDA_", "PYTORCH_NVML"))},
            "cuda_initialized": initialised, "cuda_init_by": init_by[0] if init_by else None,
            "gpu_mib_held": round(held, 1), "libcuda_loaded": libcuda_loaded(),
            "modules": list(stack_modules(backend))}


def _parent_alive(spec: str | None) -> bool:
    """PID:START (psutil create_time) of the supervisor: False once it is gone or reused."""
    if not spec:
        return True
    try:
        import psutil

        pid_s, _, start_s = spec.partition(":")
        p = psutil.Process(int(pid_s))
        return not start_s or abs(p.create_time() - float(start_s)) < 0.05
    except Exception:  # noqa: BLE001 - NoSuchProcess, bad spec
        return False


class _HeldOutput:
    """fds 1 and 2 into a temp file while importing: import-time warnings belong to the attempt
    that uses this process (replayed at hand-over), not to the trainer running meanwhile."""

    def __init__(self) -> None:
        self.saved = (os.dup(1), os.dup(2))
        self.tmp = tempfile.TemporaryFile()
        os.dup2(self.tmp.fileno(), 1)
        os.dup2(self.tmp.fileno(), 2)

    def release(self) -> bytes:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(self.saved[0], 1)
        os.dup2(self.saved[1], 2)
        for fd in self.saved:
            os.close(fd)
        self.tmp.seek(0)
        data = self.tmp.read(1 << 20)
        self.tmp.close()
        return data


def wait_for_attempt(folder: Path, parent: str | None) -> dict[str, Any] | None:
    go = folder / "go.json"
    next_check = time.monotonic() + PARENT_CHECK_S
    while True:
        if go.exists():
            data = _read_json(go)
            if data is not None:
                return data
        if time.monotonic() >= next_check:
            next_check = time.monotonic() + PARENT_CHECK_S
            if not _parent_alive(parent):
                return None
        time.sleep(POLL_S)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m supervisor.daemon.standby")
    ap.add_argument("--dir", required=True, help="where go.json arrives and ready.json is written")
    ap.add_argument("--parent", default=None, help="PID:START of the supervisor; exit when it is gone")
    ap.add_argument("--backend", default="hf", choices=["hf", "unsloth"])
    args = ap.parse_args(argv)
    folder = Path(args.dir)
    t_start = time.time()
    held = _HeldOutput()
    try:
        info = warm_imports(args.backend)
    except Exception as e:  # noqa: BLE001 - a standby that cannot import is simply not used
        held.release()
        _write_json(folder / "ready.json", {"pid": os.getpid(), "usable": False,
                                            "why": f"imports failed: {type(e).__name__}: {e}"[:300]})
        return 3
    # CUDA initialised by an import (cuInit, no context): usable only pinned, i.e. for an attempt
    # whose CUDA_VISIBLE_DEVICES is the one this process started with; never if it holds memory.
    why = None
    if info["gpu_mib_held"] > 0:
        why = f"it holds {info['gpu_mib_held']:.0f} MiB of GPU memory after its imports"
    usable = why is None
    pinned = info["cuda_initialized"] and usable
    _write_json(folder / "ready.json", {"pid": os.getpid(), "usable": usable, "ready_at": time.time(),
                                        "why": why, "pinned": pinned,
                                        "visible": os.environ.get("CUDA_VISIBLE_DEVICES"), **info})
    if not usable:
        held.release()
        return 3
    job = wait_for_attempt(folder, args.parent)
    if job is None:
        held.release()
        return 3
    handed = time.time()
    if pinned and job.get("visible") != os.environ.get("CUDA_VISIBLE_DEVICES"):
        _write_json(folder / "refused.json", {"why": "CUDA initialised here with CUDA_VISIBLE_DEVICES="
                                              f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}, the attempt "
                                              f"wants {job.get('visible')!r}"})
        held.release()
        return 3
    _write_json(folder / "taken.json", {"pid": os.getpid(), "t": handed})
    noise = held.release()
    cmd = list(job.get("argv") or [])
    if not is_our_trainer(cmd):
        print(f"qlora-watch standby: refusing {cmd[:3]!r}: not the built-in trainer", file=sys.stderr)
        return 3
    os.environ.clear()
    os.environ.update({str(k): str(v) for k, v in (job.get("env") or {}).items()})
    os.chdir(job.get("cwd") or os.getcwd())
    if noise:
        sys.stderr.buffer.write(noise)
        sys.stderr.flush()
    import supervisor.runner.train as train

    train.WARM.update(warm=True, started_at=handed, standby_started_at=t_start,
                      standby_imports_s=info["imports_s"])
    sys.argv = [train.__file__, *cmd[3:]]
    return train.main(cmd[3:])


if __name__ == "__main__":
    sys.exit(main())


# ------------------------------------------------------------------------------ the supervisor's side


def effective_visible(recipe: Any, env: dict[str, str]) -> str | None:
    """CUDA_VISIBLE_DEVICES as the trainer will have it (runner/train.pin_one_gpu)."""
    from supervisor.runner.train import pin_one_gpu

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
        from supervisor.runner.train import pin_one_gpu

        pin_one_gpu(recipe, env)  # as the trainer will: should an import initialise CUDA, the same GPU
        for name in ("go.json", "taken.json", "ready.json", "refused.json"):
            (folder / name).unlink(missing_ok=True)
        me = procgroup.identity_of(os.getpid())
        parent = f"{os.getpid()}:{me.create_time}" if me else str(os.getpid())
        argv = [sys.executable, "-m", "supervisor.daemon.standby", "--dir", str(folder),
                "--parent", parent, "--backend", backend]
        env = {**env, "QLW_STANDBY": "1"}
        try:
            proc = procgroup.spawn(argv, env=env, cwd=cwd, exit_file=exit_file, log_path=log_path,
                                  log_max_bytes=log_max_bytes, log_backups=log_backups)
        except OSError as e:
            self._say_once("spawn", f"warm standby not started: {e}")
            return
        self.current = {"attempt": attempt, "proc": proc, "dir": folder, "env": env,
                        "started": time.time(), "backend": backend}

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
        ready = _read_json(cur["dir"] / "ready.json") or {}
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
        ready = _read_json(cur["dir"] / "ready.json")
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
        refused = _read_json(cur["dir"] / "refused.json")
        if refused:
            self._say_once("refused", f"warm standby not used: {refused.get('why')}; cold start")
        self._say_once("no-answer", "warm standby did not take the attempt; cold start")
        await asyncio.to_thread(self.discard)
        return None

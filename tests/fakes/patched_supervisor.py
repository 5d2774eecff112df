#!/usr/bin/env python3
"""The real supervisor (`core.run_supervisor`) with faults injected, for reliability tests.

    python tests/fakes/patched_supervisor.py RUN_DIR 'SCENARIO_JSON'

It runs exactly what `qlora-watch _supervise RUN_DIR` runs, after patching a few seams:

- "nvml": {...}  a FakeNVML instead of the real NVML (FakeNVML reads live /proc):
    "hold_mib": M      report M MiB in use, owned by the trainer's PID (as an H200 did after
                       SIGKILL), while any process of this run (env QLW_RUN_ID) is alive
    "devices": [{...}, ...]  several GPUs, each FakeDevice fields ("util_pct", "temp_c",
                       "processes": {"pid": MiB}); default one idle H200
    "foreign_mib": M   a foreign process ("foreign_pid", default the test) holds M MiB
    "lose_after_s": S  GPU_IS_LOST from S seconds after start, on every call
    "hang_after_s": S  every NVML call hangs from S seconds after start
    "fail": {"nvmlDeviceGetPowerUsage": 3}   a call fails with an NVML error code
    "abort_on_sample": N   os.abort() in the N-th sample (a native crash in the sampler)
    "timeout_s": T     the ThreadedSampler's per-sample timeout
- "unkillable": true  SIGKILL to the trainer's group and to orphans does nothing (a process
                      stuck in D state); every other signal goes through
- "server_limits": {...}  ServerLimits overrides (small queues for slow-client tests)
- "state_to_dev_full_while": PATH  while PATH exists, state.json writes go to /dev/full
                                   (the kernel's ENOSPC), as on a full state disk
- "oom_kills_file": PATH  the kernel's oom_kill counter (/proc/vmstat) is read from PATH, an
                          integer the test raises to stand for the OOM killer's victim
- "die_after_spawn": true  SIGKILL itself right after the trainer is spawned, before the
                          state file records it (the worst moment for a supervisor crash)
- "emfile_on_spawn": true  RLIMIT_NOFILE is lowered to the open fd count while the trainer
                           is spawned (EMFILE: a spawn failure)
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

from tests.fakes.nvml import FakeNVML, alive  # noqa: E402


class RunNVML(FakeNVML):
    """FakeNVML whose held memory follows the live processes of one run."""

    def __init__(self, run_dir: Path, cfg: dict) -> None:
        from tests.fakes.nvml import FakeDevice

        devs = cfg.get("devices")  # [{FakeDevice field: value}, ...]: several GPUs
        super().__init__([FakeDevice(uuid=f"GPU-fake-{i}", **{
            **d, "processes": {int(k): float(v) for k, v in (d.get("processes") or {}).items()}})
            for i, d in enumerate(devs)] if devs else 1)
        self.run_dir = run_dir
        self.run_id = run_dir.name
        self.hold_mib = float(cfg.get("hold_mib") or 0)
        self.foreign_mib = float(cfg.get("foreign_mib") or 0)
        self.foreign_pid = int(cfg.get("foreign_pid") or os.getppid())
        self.owner: int | None = None

    def _trainer_pid(self) -> int | None:
        try:
            st = json.loads((self.run_dir / "state.json").read_text())
            pid = json.loads((self.run_dir / "attempts" / str(st.get("attempt") or 1)
                              / "trainer.pid.json").read_text())["pid"]
            return int(pid)
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _run_alive(self) -> bool:
        for p in psutil.process_iter(["pid"]):
            try:
                if p.environ().get("QLW_RUN_ID") == self.run_id and alive(p.pid):
                    return True
            except (psutil.Error, OSError):
                continue
        return False

    def _in_use(self, d):  # type: ignore[no-untyped-def]
        procs = super()._in_use(d)
        if self.hold_mib:
            pid = self._trainer_pid()
            if pid is not None:
                self.owner = pid
            if self.owner is not None and self._run_alive():
                procs.append((self.owner, self.hold_mib))
        if self.foreign_mib and alive(self.foreign_pid):
            procs.append((self.foreign_pid, self.foreign_mib))
        return procs


def main() -> int:
    run_dir = Path(sys.argv[1]).absolute()
    sc = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    from supervisor import paths, procgroup
    from supervisor.daemon import core
    from supervisor.telemetry import sampler as sampler_mod

    if sc.get("unkillable"):
        orig_signal_group = procgroup.signal_group

        def signal_group(pgid: int, sig: int) -> bool:
            if sig == signal.SIGKILL:
                return True  # "sent", but the process is in D state and does not die
            return orig_signal_group(pgid, sig)

        procgroup.signal_group = signal_group
        procgroup.kill_orphans = lambda known: []

    nv = sc.get("nvml")
    if nv is not None:
        fake = RunNVML(run_dir, nv)
        t0 = time.monotonic()
        if nv.get("lose_after_s") is not None:
            fake.lose(at=t0 + float(nv["lose_after_s"]))
        for name, code in (nv.get("fail") or {}).items():
            fake.fail(name, int(code))
        if nv.get("hang_after_s") is not None:
            threading.Timer(float(nv["hang_after_s"]), lambda: fake.hang("*")).start()
        abort_on = nv.get("abort_on_sample")

        def make_sampler(timeout_s: float = 2.0, nvml: object = None) -> sampler_mod.ThreadedSampler:
            ts = sampler_mod.ThreadedSampler(sampler_mod.Sampler(fake),
                                             timeout_s=float(nv.get("timeout_s", timeout_s)))
            if abort_on:
                count = {"n": 0}
                orig = ts.sample

                def sample(*a: object, **kw: object) -> object:
                    count["n"] += 1
                    if count["n"] >= int(abort_on):
                        os.abort()
                    return orig(*a, **kw)

                ts.sample = sample  # type: ignore[method-assign]
            return ts

        sampler_mod.make_sampler = make_sampler

    if sc.get("server_limits"):
        from supervisor.daemon import server

        orig_init = server.ControlServer.__init__
        limits = server.ServerLimits(**sc["server_limits"])

        def init(self: object, path: object, handler: object, **kw: object) -> None:
            kw.setdefault("limits", limits)
            orig_init(self, path, handler, **kw)  # type: ignore[arg-type]

        server.ControlServer.__init__ = init  # type: ignore[method-assign]

    if sc.get("emfile_on_spawn"):
        orig_spawn = procgroup.spawn

        def spawn(*a: object, **kw: object) -> object:
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")), hard))
            try:
                return orig_spawn(*a, **kw)
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

        procgroup.spawn = spawn

    if sc.get("state_to_dev_full_while"):
        from supervisor import store

        flag = Path(sc["state_to_dev_full_while"])
        orig_atomic_write = store.atomic_write

        def atomic_write(path: Path, text: str, mode: int = 0o600) -> None:
            if flag.exists() and Path(path).name == "state.json":
                with open("/dev/full", "w") as f:  # raises OSError(ENOSPC) like a full disk
                    f.write(text)
                    f.flush()
            orig_atomic_write(path, text, mode)

        store.atomic_write = atomic_write

    if sc.get("oom_kills_file"):
        from supervisor.daemon import attempts

        counter = Path(sc["oom_kills_file"])
        attempts.oom_kills = lambda *a: int(counter.read_text())  # type: ignore[assignment]

    if sc.get("die_after_spawn"):
        orig_spawn2 = procgroup.spawn

        def spawn_and_die(*a: object, **kw: object) -> object:
            orig_spawn2(*a, **kw)
            os.kill(os.getpid(), signal.SIGKILL)

        procgroup.spawn = spawn_and_die

    sock = paths.socket_path(run_dir.name)
    return core.run_supervisor(run_dir, socket_path=sock, with_telemetry=True)


if __name__ == "__main__":
    raise SystemExit(main())

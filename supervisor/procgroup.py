"""Starting, verifying and stopping the trainer's process group.

The trainer runs under `supervisor.wrapper` in a session and process group of its own
(start_new_session=True), launched from an argv list (never a shell). Stopping signals the
whole group: SIGTERM, SIGCONT (so a stopped task can still exit), a grace period, SIGKILL.
The supervisor is a child subreaper, so workers that setsid() out of the group are
re-parented to it when the trainer dies, where `orphans()` finds them.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """prctl(PR_SET_CHILD_SUBREAPER): orphaned descendants are re-parented to us."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def boot_id() -> str:
    try:
        return _read_boot_id()
    except OSError:
        return "unknown"


@functools.cache
def _read_boot_id() -> str:
    """Fixed for the life of the process; a failed read raises and so is not cached."""
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


@dataclass
class Identity:
    """What makes a pid *this* process: pid reuse must never make us signal a stranger."""

    pid: int
    create_time: float
    boot_id: str
    cmdline_hash: str

    def to_dict(self) -> dict:
        return asdict(self)


def _cmdline_hash(cmdline: list[str]) -> str:
    return hashlib.sha256("\0".join(cmdline).encode()).hexdigest()[:16]


def identity_of(pid: int) -> Identity | None:
    try:
        p = psutil.Process(pid)
        with p.oneshot():
            return Identity(pid, p.create_time(), boot_id(), _cmdline_hash(p.cmdline()))
    except (psutil.Error, OSError):
        return None


def identity_after_exec(pid: int, argv: list[str], timeout: float = 2.0) -> Identity | None:
    """identity_of(pid) once the kernel shows the exec'd command line.

    Popen returns when the child's close-on-exec error pipe closes, which happens part-way
    through execve: /proc/PID/cmdline can still be empty for a moment. An identity recorded
    then (the hash of an empty command line) never verifies again, so a restarted supervisor
    would call its own live trainer "lost" and leave it running untracked (soak finding).
    """
    want = _cmdline_hash(argv)
    deadline = time.monotonic() + timeout
    ident = identity_of(pid)
    while ident is not None and ident.cmdline_hash != want and time.monotonic() < deadline:
        time.sleep(0.002)
        ident = identity_of(pid)
    return ident


def verify(ident: dict | None) -> bool:
    """True only when pid, start time, boot id and command line all match."""
    if not ident:
        return False
    try:
        want = Identity(**ident)
    except TypeError:
        return False
    have = identity_of(want.pid)
    if have is None:
        return False
    return (
        abs(have.create_time - want.create_time) < 0.05
        and have.boot_id == want.boot_id
        and have.cmdline_hash == want.cmdline_hash
        and psutil.Process(want.pid).status() != psutil.STATUS_ZOMBIE
    )


def spawn(
    argv: list[str],
    *,
    env: dict[str, str],
    cwd: Path,
    exit_file: Path,
    log_path: Path,
    log_max_bytes: int,
    log_backups: int,
) -> subprocess.Popen:
    """Start `argv` under the wrapper in a new session. Raises OSError on spawn failure."""
    if isinstance(argv, str):  # defence in depth: recipes already reject strings
        raise TypeError("argv must be a list, never a shell string")
    exit_file.unlink(missing_ok=True)
    cmd = [
        sys.executable, "-m", "supervisor.wrapper",
        "--exit-file", str(exit_file), "--log", str(log_path),
        "--max-bytes", str(log_max_bytes), "--backups", str(log_backups),
        "--cwd", str(cwd), "--", *argv,
    ]
    return subprocess.Popen(
        cmd, env=env, cwd=str(cwd), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, close_fds=True, start_new_session=True,
    )


def trainer_argv(recipe: object) -> list[str]:
    """The trainer's argv: the recipe's own command, the built-in trainer, or for several GPUs
    the built-in trainer under `accelerate launch` with FSDP (FSDP-QLoRA: each card holds a
    shard of the NF4 weights while training; run on 2 x H200 with the 70B shape at 4 and 8
    layers, docs/benchmarks.md). Loading is not sharded: every rank quantises the whole model
    onto its card first, so each card must hold the NF4 model once."""
    hw, tr = recipe.hardware, recipe.trainer  # type: ignore[attr-defined]
    if tr.command:
        return list(tr.command)
    if getattr(hw, "nodes", 1) > 1:  # a Slurm job on several nodes: srun, one launcher per node
        from supervisor.slurm.node import srun_argv

        # the accelerate form of one node (gpus >= 2 selects it); srun_argv counts it over all nodes
        one = recipe.model_copy(update={"hardware": hw.model_copy(update={"nodes": 1, "gpus": max(2, hw.gpus)})})  # type: ignore[attr-defined]
        return srun_argv(recipe, trainer_argv(one))
    if hw.gpus <= 1:
        return [sys.executable, "-m", "supervisor.runner.train"]
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--num_processes", str(hw.gpus), "--num_machines", "1", "--mixed_precision", "bf16",
        "--use_fsdp", "--fsdp_sharding_strategy", "FULL_SHARD",
        "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
        "--fsdp_state_dict_type", "SHARDED_STATE_DICT",
        "--fsdp_cpu_ram_efficient_loading", "true", "--fsdp_sync_module_states", "true",
        # QLoRA: frozen NF4 and trainable LoRA share flat parameters only without orig params
        "--fsdp_use_orig_params", "false",
        "--fsdp_offload_params", "true" if hw.fsdp_cpu_offload else "false",
        "-m", "supervisor.runner.train",
    ]


def group_alive(pgid: int) -> bool:
    """Any process left in the group? Zombies count until reaped."""
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def signal_group(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def orphans(known: set[int]) -> list[psutil.Process]:
    """Our descendants that are not the processes we know (escaped, subreaped workers)."""
    try:
        kids = psutil.Process().children(recursive=True)
    except psutil.Error:
        return []
    return [k for k in kids if k.pid not in known]


def reap_children() -> dict[int, int]:
    """waitpid() every exited child (we are a subreaper: zombies must not pile up)."""
    statuses: dict[int, int] = {}
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
        statuses[pid] = os.waitstatus_to_exitcode(status)
    return statuses


def kill_orphans(known: set[int]) -> list[int]:
    killed = []
    for p in orphans(known):
        with contextlib.suppress(psutil.Error):
            p.kill()
            killed.append(p.pid)
    return killed


def wait_gone(pgid: int, timeout: float, poll: float = 0.05) -> bool:
    """Reap and poll until the group is empty or the timeout passes (monotonic clock)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reap_children()
        if not group_alive(pgid):
            return True
        time.sleep(poll)
    reap_children()
    return not group_alive(pgid)

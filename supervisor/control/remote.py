"""`qlora-watch attach --ssh user@host [RUN]`: the dashboard runs here, the run stays there.

Only protocol frames cross the link: the system `ssh` client forwards a local Unix socket
(in a fresh 0700 folder) to the remote supervisor's socket (OpenSSH stream-local forwarding,
`-L local.sock:remote.sock`), and the dashboard talks to the local end. Nothing listens on
TCP on either side.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SSH_OPTS = ["-o", "ExitOnForwardFailure=yes", "-o", "StreamLocalBindUnlink=yes",
            "-o", "ServerAliveInterval=15"]


class RemoteError(Exception):
    pass


def ssh_binary() -> str:
    ssh = os.environ.get("QLORA_WATCH_SSH") or shutil.which("ssh")
    if not ssh:
        raise RemoteError("no `ssh` client found on PATH")
    return ssh


def _remote_cmd(args: list[str], home: Path | None) -> list[str]:
    """`qlora-watch ARGS` on the remote side; with `home`, under that QLORA_WATCH_HOME (a Slurm
    run's store on the shared filesystem). ssh joins argv into one remote shell line: quoted."""
    cmd = ["qlora-watch", *args]
    if home is not None:
        cmd = ["env", f"QLORA_WATCH_HOME={home}", *cmd]
    return [shlex.quote(a) for a in cmd]


def run_remote(host: str, args: list[str], home: Path | None = None, timeout: float = 120) -> str:
    """Run `qlora-watch ARGS` on host; its stdout. RemoteError on failure."""
    ssh = ssh_binary()
    argv = [ssh, *SSH_OPTS, host, *_remote_cmd(args, home)]
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise RemoteError(f"ssh {host} qlora-watch {' '.join(args)}: no answer in {timeout:.0f} s") from None
    if res.returncode != 0:
        raise RemoteError(f"ssh {host} qlora-watch {' '.join(args)} failed: "
                          f"{res.stderr.strip() or res.returncode}")
    return res.stdout


def remote_socket(ssh: str, host: str, run: str | None, home: Path | None = None) -> str:
    """Ask the remote qlora-watch for the run's socket path (it restarts a dead supervisor)."""
    argv = [ssh, *SSH_OPTS, host, *_remote_cmd(["_socket"] + ([run] if run else []), home)]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    if res.returncode != 0:
        raise RemoteError(f"ssh {host} qlora-watch _socket failed: {res.stderr.strip() or res.returncode}")
    path = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else ""
    if not path.startswith("/"):
        raise RemoteError(f"unexpected answer from {host}: {res.stdout!r}")
    return path


def forward(ssh: str, host: str, remote: str, local: Path) -> subprocess.Popen:
    argv = [ssh, *SSH_OPTS, "-N", "-L", f"{local}:{remote}", host]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if local.exists():
            return proc
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise RemoteError(f"ssh forwarding failed: {err.strip() or proc.returncode}")
        time.sleep(0.05)
    proc.terminate()
    raise RemoteError("ssh forwarding did not come up within 30 s")


def attach_over_ssh(host: str, run: str | None, home: Path | None = None) -> int:
    from supervisor.control.client import AsyncRunClient
    from supervisor.tui.app import make_app

    try:
        ssh = ssh_binary()
        remote = remote_socket(ssh, host, run, home)
        tmp = Path(tempfile.mkdtemp(prefix="qlw-ssh-"))  # mkdtemp makes it 0700
        local = tmp / "run.sock"
        proc = forward(ssh, host, remote, local)
    except RemoteError as e:
        print(f"qlora-watch: {e}", file=sys.stderr)
        return 1
    try:
        make_app(AsyncRunClient(local)).run()
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0

"""`qlora-watch attach --ssh user@host [RUN]`: the dashboard runs here, the run stays there.

Only protocol frames cross the link: the system `ssh` client forwards a local Unix socket
(in a fresh 0700 folder) to the remote supervisor's socket (OpenSSH stream-local forwarding,
`-L local.sock:remote.sock`), and the dashboard talks to the local end. Nothing listens on
TCP on either side.
"""

from __future__ import annotations

import os
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


def remote_socket(ssh: str, host: str, run: str | None) -> str:
    """Ask the remote qlora-watch for the run's socket path (it restarts a dead supervisor)."""
    argv = [ssh, *SSH_OPTS, host, "qlora-watch", "_socket"] + ([run] if run else [])
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


def attach_over_ssh(host: str, run: str | None) -> int:
    from supervisor.control.client import AsyncRunClient
    from supervisor.tui.app import make_app

    try:
        ssh = ssh_binary()
        remote = remote_socket(ssh, host, run)
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

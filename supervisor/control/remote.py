"""`qlora-watch attach --ssh user@host [RUN]`: the dashboard runs here, the run stays there.

Only protocol frames cross the link: the system `ssh` client forwards a local Unix socket
(in a fresh 0700 folder) to the remote supervisor's socket (OpenSSH stream-local forwarding,
`-L local.sock:remote.sock`), and the dashboard talks to the local end. Nothing listens on
TCP on either side.

What goes wrong, in words: an sshd with `AllowTcpForwarding no` (or
`AllowStreamLocalForwarding no`) accepts the `-L` and then refuses every connection through it
("administratively prohibited"), so the forward is probed before the dashboard opens;
`qlora-watch` missing from the remote non-interactive PATH (ssh runs commands without the
login profile) is said with `--remote-cmd PATH` / `QLORA_WATCH_REMOTE_CMD`. When the link
drops, the dashboard shows "reconnecting" and a new forward is set up with back-off.
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
            "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=2"]
REMOTE_CMD_ENV = "QLORA_WATCH_REMOTE_CMD"
PROHIBITED = "administratively prohibited"


class RemoteError(Exception):
    pass


def ssh_binary() -> str:
    ssh = os.environ.get("QLORA_WATCH_SSH") or shutil.which("ssh")
    if not ssh:
        raise RemoteError("no `ssh` client found on PATH")
    return ssh


def remote_command(remote_cmd: str | None) -> str:
    return remote_cmd or os.environ.get(REMOTE_CMD_ENV) or "qlora-watch"


def not_found_message(host: str, cmd: str) -> str:
    return (f"`{cmd}` is not on the PATH that ssh gives commands on {host} (a non-interactive shell "
            "reads no login profile, so a venv or ~/.local/bin may be missing): pass "
            f"--remote-cmd /path/to/qlora-watch, or set {REMOTE_CMD_ENV}=/path/to/qlora-watch "
            f"(`ssh {host} 'command -v qlora-watch'` shows what ssh finds)")


def _remote_cmd(args: list[str], home: Path | None, remote_cmd: str | None = None) -> list[str]:
    """`qlora-watch ARGS` on the remote side; with `home`, under that QLORA_WATCH_HOME (a Slurm
    run's store on the shared filesystem). ssh joins argv into one remote shell line: quoted,
    so a path with spaces stays one word."""
    cmd = [remote_command(remote_cmd), *args]
    if home is not None:
        cmd = ["env", f"QLORA_WATCH_HOME={home}", *cmd]
    return [shlex.quote(a) for a in cmd]


def _ssh_remote(host: str, args: list[str], home: Path | None, remote_cmd: str | None,
                timeout: float, ssh: str | None = None) -> str:
    """Run `qlora-watch ARGS` on host; its stdout. RemoteError in words on failure."""
    if host.startswith("-"):
        raise RemoteError(f"--ssh {host!r}: expected user@host, not an option")
    cmd = remote_command(remote_cmd)
    argv = [ssh or ssh_binary(), *SSH_OPTS, host, *_remote_cmd(args, home, remote_cmd)]
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise RemoteError(f"ssh {host} {cmd} {' '.join(args)}: no answer in {timeout:.0f} s") from None
    err = res.stderr.strip()
    if res.returncode in (126, 127) or (res.returncode != 0 and (
            "command not found" in err or f"{cmd}: No such file" in err or f"{cmd}: not found" in err)):
        raise RemoteError(not_found_message(host, cmd))
    if res.returncode == 255:
        raise RemoteError(f"ssh {host}: {err.splitlines()[-1] if err else 'connection failed'}")
    if res.returncode != 0:
        raise RemoteError(f"ssh {host} {cmd} {' '.join(args)} failed: "
                          f"{err.splitlines()[-1] if err else res.returncode}")
    return res.stdout


def run_remote(host: str, args: list[str], home: Path | None = None, timeout: float = 120,
               remote_cmd: str | None = None) -> str:
    """Run `qlora-watch ARGS` on host; its stdout. RemoteError on failure."""
    return _ssh_remote(host, args, home, remote_cmd, timeout)


def remote_socket(ssh: str, host: str, run: str | None, home: Path | None = None,
                  remote_cmd: str | None = None) -> str:
    """Ask the remote qlora-watch for the run's socket path (it restarts a dead supervisor)."""
    out = _ssh_remote(host, ["_socket"] + ([run] if run else []), home, remote_cmd, 60, ssh=ssh)
    path = out.strip().splitlines()[-1] if out.strip() else ""
    if not path.startswith("/"):
        raise RemoteError(f"unexpected answer from {host}: {out!r}")
    return path


def forwarding_refused_message(host: str) -> str:
    return (f"the ssh server on {host} refuses Unix-socket forwarding (its sshd_config has "
            "`AllowTcpForwarding no` or `AllowStreamLocalForwarding no`): ask for "
            "`AllowStreamLocalForwarding yes` (a Match block for your user will do), or run the "
            f"dashboard there: `ssh -t {host} qlora-watch attach`")


def _probe(local: Path, timeout: float = 10.0) -> BaseException | None:
    """A `ping` through the forward: None when the remote supervisor answers."""
    from supervisor.control.client import request

    try:
        request(local, "ping", timeout=timeout)
    except Exception as e:  # noqa: BLE001 - why the link does not work is told by the caller
        return e
    return None


class Link:
    """One ssh forward to the remote run's socket; `ensure()` sets it up again after a drop."""

    def __init__(self, ssh: str, host: str, run: str | None, remote_cmd: str | None = None,
                 home: Path | None = None):
        self.ssh, self.host, self.run, self.remote_cmd, self.home = ssh, host, run, remote_cmd, home
        self.tmp = Path(tempfile.mkdtemp(prefix="qlw-ssh-"))  # mkdtemp makes it 0700
        self.local = self.tmp / "run.sock"
        self.err = self.tmp / "ssh.err"
        self.proc: subprocess.Popen | None = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and self.local.exists()

    def ensure(self) -> Path:
        """A working forward (set up again if ssh died); raises RemoteError."""
        if self.alive() and _probe(self.local, 5.0) is None:
            return self.local
        self._stop()
        remote = remote_socket(self.ssh, self.host, self.run, self.home, self.remote_cmd)
        self._forward(remote)
        return self.local

    def _errors(self) -> str:
        try:
            return self.err.read_text(errors="replace").strip()
        except OSError:
            return ""

    def _forward(self, remote: str) -> None:
        # LogLevel INFO: "open failed: administratively prohibited" is said at INFO; to a file
        argv = [self.ssh, *SSH_OPTS, "-o", "LogLevel=INFO", "-N", "-L", f"{self.local}:{remote}", self.host]
        with open(self.err, "wb") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=err)
        deadline = time.monotonic() + 30
        while not self.local.exists():
            if self.proc.poll() is not None:
                text = self._errors()
                if PROHIBITED in text or "forwarding" in text.lower():
                    raise RemoteError(forwarding_refused_message(self.host))
                raise RemoteError(f"ssh forwarding failed: {text or self.proc.returncode}")
            if time.monotonic() > deadline:
                self._stop()
                raise RemoteError("ssh forwarding did not come up within 30 s")
            time.sleep(0.05)
        failed = _probe(self.local)
        if failed is None:
            return
        time.sleep(0.2)  # ssh writes "open failed" a moment after closing the channel
        text = self._errors()
        self._stop()
        # sshd refuses a disallowed stream-local forward as "administratively prohibited" or,
        # OpenSSH 9, as "connect failed", like a missing socket: the socket being there says which
        if PROHIBITED in text or ("open failed" in text and self._remote_socket_exists(remote)):
            raise RemoteError(forwarding_refused_message(self.host))
        raise RemoteError(f"the forwarded socket does not answer ({failed}){': ' + text if text else ''}")

    def _remote_socket_exists(self, remote: str) -> bool:
        argv = [self.ssh, *SSH_OPTS, self.host, "test", "-S", shlex.quote(remote)]
        try:
            return subprocess.run(argv, capture_output=True, timeout=30,
                                  stdin=subprocess.DEVNULL).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False

    def _stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
            self.proc = None
        try:
            self.local.unlink()
        except OSError:
            pass

    def close(self) -> None:
        self._stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


def attach_over_ssh(host: str, run: str | None, remote_cmd: str | None = None,
                    home: Path | None = None) -> int:
    """The dashboard here on a run there; `home`: the remote QLORA_WATCH_HOME (a Slurm run's)."""
    import asyncio

    from supervisor.control.client import AsyncRunClient
    from supervisor.tui.app import make_app

    try:
        link = Link(ssh_binary(), host, run, remote_cmd, home)
    except RemoteError as e:
        print(f"qlora-watch: {e}", file=sys.stderr)
        return 1
    try:
        try:
            link.ensure()
        except RemoteError as e:
            print(f"qlora-watch: {e}", file=sys.stderr)
            return 1

        async def reconnect() -> AsyncRunClient:
            await asyncio.to_thread(link.ensure)  # ssh again, and the remote restarts a dead supervisor
            return AsyncRunClient(link.local)

        make_app(AsyncRunClient(link.local), reconnect=reconnect).run()
    finally:
        link.close()
    return 0

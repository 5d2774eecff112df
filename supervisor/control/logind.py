"""Will logging out end the run? systemd-logind's KillUserProcesses, lingering, and a scope.

With `KillUserProcesses=yes` and no linger, logind kills every process of a session when it
ends, a detached supervisor and its trainer included; without linger pam_systemd also removes
`$XDG_RUNTIME_DIR` (the socket is kept elsewhere for that: paths.py). At `start` qlora-watch
says so with the command that fixes it, and where `systemd-run --user` is usable it starts the
supervisor in a scope of its own, outside the login session. Stdlib only, no subprocess at
import; `QLW_LOGIND_ROOT` points the file checks at another root (tests).
"""

from __future__ import annotations

import os
import pwd
import shutil
from dataclasses import dataclass
from pathlib import Path

ROOT_ENV = "QLW_LOGIND_ROOT"
NO_SCOPE_ENV = "QLW_NO_SCOPE"


def _root() -> Path:
    return Path(os.environ.get(ROOT_ENV) or "/")


def user_name() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return os.environ.get("USER") or str(os.getuid())


@dataclass(frozen=True)
class Logind:
    in_use: bool  # systemd is PID 1 (logind manages sessions)
    kill_user_processes: bool | None  # None: not set in logind.conf (the distro's default)
    linger: bool | None  # None: unknown
    user: str

    @property
    def logout_kills(self) -> bool:
        return self.in_use and bool(self.kill_user_processes) and not self.linger

    def note(self, scoped: bool) -> str | None:
        """What `start` says, None when logout is harmless."""
        if not self.in_use or self.linger:
            return None
        fix = f"`loginctl enable-linger {self.user}`"
        if self.logout_kills:
            if scoped:
                return ("note: logind has KillUserProcesses=yes and linger is off for "
                        f"{self.user}; the supervisor runs in its own `systemd-run --user --scope`. "
                        f"To be sure the run outlives your logout: {fix}")
            return ("warning: logind has KillUserProcesses=yes and linger is off for "
                    f"{self.user}: logging out ends this run (supervisor and trainer). Fix: {fix}")
        return None


def check() -> Logind:
    from supervisor.preflight.doctor import logind_kill_user_processes

    root = _root()
    user = user_name()
    in_use = (root / "run/systemd/system").is_dir()
    linger_dir = root / "var/lib/systemd/linger"
    linger = (linger_dir / user).exists() if linger_dir.is_dir() else None
    return Logind(in_use=in_use, kill_user_processes=logind_kill_user_processes(root / "etc/systemd"),
                  linger=linger, user=user)


def user_manager_reachable() -> bool:
    """`systemd-run --user` needs the user's manager: its private socket in the runtime dir."""
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}"
    return (Path(runtime) / "systemd" / "private").exists() or (Path(runtime) / "bus").exists()


def scope_argv(argv: list[str], state: Logind | None = None) -> tuple[list[str], bool]:
    """argv run in a `systemd-run --user --scope` when logout would kill it and that works."""
    if os.environ.get(NO_SCOPE_ENV):
        return argv, False
    state = state or check()
    exe = shutil.which("systemd-run")
    if not state.logout_kills or exe is None or not user_manager_reachable():
        return argv, False
    return [exe, "--user", "--scope", "--quiet", "--collect", "--", *argv], True

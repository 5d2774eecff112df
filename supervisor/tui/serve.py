"""Serve the dashboard in a browser tab with textual-serve, on the loopback interface only.

textual-serve starts one process running `command_argv` per browser tab; each is an ordinary
dashboard client of the supervisor, so closing the tab detaches and the run goes on.
textual-serve has no authentication: anyone who can open the port can press `s`. Hence
loopback only; reach it from elsewhere through `ssh -L port:127.0.0.1:port`.
"""

from __future__ import annotations

import ipaddress
import shlex

from textual_serve.server import Server

LOOPBACK_NAMES = {"localhost"}


def _is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_server(command_argv: list[str], port: int, host: str = "127.0.0.1") -> Server:
    """A textual-serve Server for the dashboard command, not yet started."""
    if not _is_loopback(host):
        raise ValueError(f"refusing to serve the dashboard on {host!r}: loopback only (use ssh -L)")
    if not command_argv:
        raise ValueError("no command to serve")
    # textual-serve runs the command through a shell: quote every argument.
    command = shlex.join(command_argv)
    return Server(command, host=host, port=port, title="qlora-watch")


def serve(command_argv: list[str], port: int, host: str = "127.0.0.1") -> None:
    """Serve `command_argv` (a dashboard command) at http://host:port until Ctrl+C."""
    make_server(command_argv, port, host).serve()

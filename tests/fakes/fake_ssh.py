#!/usr/bin/env python3
"""A stand-in for the system `ssh` client, for tests on a machine with no sshd.

`fake_ssh [-o opt]... [-N] -L local.sock:remote.sock host` forwards a Unix socket like
OpenSSH's stream-local forwarding; `fake_ssh [-o opt]... host cmd...` runs cmd here
(`qlora-watch` is this checkout's CLI). It records its argv in $FAKE_SSH_LOG.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading


def pipe(a: socket.socket, b: socket.socket) -> None:
    try:
        while data := a.recv(65536):
            b.sendall(data)
    except OSError:
        pass
    finally:
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def forward(local: str, remote: str) -> int:
    old = os.umask(0o177)  # OpenSSH's StreamLocalBindMask default
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(local)
    os.umask(old)
    srv.listen(8)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    while True:
        conn, _ = srv.accept()
        up = socket.socket(socket.AF_UNIX)
        up.connect(remote)
        threading.Thread(target=pipe, args=(conn, up), daemon=True).start()
        threading.Thread(target=pipe, args=(up, conn), daemon=True).start()


def main(argv: list[str]) -> int:
    if os.environ.get("FAKE_SSH_LOG"):
        with open(os.environ["FAKE_SSH_LOG"], "a") as f:
            f.write(json.dumps(argv) + "\n")
    spec, rest, i = None, [], 0
    while i < len(argv):
        a = argv[i]
        if a in ("-o", "-p", "-i"):
            i += 2
            continue
        if a == "-L":
            spec = argv[i + 1]
            i += 2
            continue
        if a.startswith("-"):
            i += 1
            continue
        rest = argv[i:]
        break
    cmd = rest[1:]  # rest[0] is the host: everything runs here
    if spec:
        local, remote = spec.split(":", 1)
        return forward(local, remote)
    env = dict(os.environ)
    if cmd and cmd[0] == "env":  # `env QLORA_WATCH_HOME=... qlora-watch ...` (a Slurm run's store)
        cmd = cmd[1:]
        while cmd and "=" in cmd[0]:
            k, v = cmd.pop(0).split("=", 1)
            env[k] = v
    if cmd and cmd[0] == "qlora-watch":
        cmd = [sys.executable, "-m", "supervisor", *cmd[1:]]
    return subprocess.call(cmd, env=env)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

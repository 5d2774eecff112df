"""A dashboard-like client for benchmarks: attach to a run and read every message until it ends."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path


async def main(home: str, run_id: str) -> int:
    os.environ["QLORA_WATCH_HOME"] = home
    from supervisor import paths
    from supervisor.control.client import AsyncRunClient

    sock = paths.socket_path(run_id)
    for _ in range(100):
        if Path(sock).exists():
            break
        await asyncio.sleep(0.1)
    c = AsyncRunClient(sock)
    await c.connect()
    n = 0
    async for _msg in c.messages():
        n += 1
    await c.close()
    print(f"client received {n} live messages")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main(sys.argv[1], sys.argv[2])))

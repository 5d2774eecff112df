"""What an earlier supervisor left behind, dealt with before an attempt starts: trainer groups
it spawned but never recorded (strays), and deletes it began but did not finish."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import psutil

from supervisor import procgroup
from supervisor.checkpoints import folders as checkpoints
from supervisor.daemon.runio import RunIO
from supervisor.records import EventKind


async def stop_strays(io: RunIO, output_dir: Path) -> None:
    """Stop trainer groups of this run that the state does not name.

    A supervisor killed between spawning the wrapper and recording it in state.json leaves
    a trainer nobody tracks; launching again would put two trainers on one output folder.
    Such a wrapper is recognised by its --exit-file inside this run's folder (and our uid);
    its group is killed, and the complete checkpoints it wrote are adopted so that the
    relaunch resumes from them.
    """
    known = (io.status.wrapper or {}).get("pid")
    prefix = str(io.store.path / "attempts") + os.sep
    stopped = []
    for p in psutil.process_iter(["pid", "cmdline", "uids"]):
        try:
            cmd = p.info.get("cmdline") or []
            if p.pid == known or "supervisor.wrapper" not in cmd or "--exit-file" not in cmd:
                continue
            exit_file = cmd[cmd.index("--exit-file") + 1]
            uids = p.info.get("uids")
            if not exit_file.startswith(prefix) or uids is None or uids.real != os.getuid():
                continue
            if p.status() == psutil.STATUS_ZOMBIE:
                continue
        except (psutil.Error, IndexError):
            continue
        procgroup.signal_group(p.pid, signal.SIGKILL)
        await asyncio.to_thread(procgroup.wait_gone, p.pid, 10.0)
        stopped.append(p.pid)
    if not stopped:
        return
    adopted = checkpoints.adopt_checkpoints(output_dir, io.store.run_id)
    io.record(EventKind.STRAYS_STOPPED, f"stopped trainer group(s) {stopped} that a previous supervisor "
              "started but never recorded (two trainers must not share a run)"
              + (f"; adopted {', '.join(adopted)}" if adopted else ""), level="warning")


def finish_pending_deletes(io: RunIO, output_dir: Path) -> None:
    """Complete the phase 2 of deletes that an earlier supervisor did not finish."""
    if not output_dir.is_dir():
        return
    results = checkpoints.finish_pending_deletes(output_dir, io.store.path / "deletions.log")
    for r in results:
        if r.ok:
            io.record(EventKind.CHECKPOINT_PRUNED, f"finished the interrupted delete of {r.name}",
                      evidence={"bytes": r.size_bytes})
        else:
            io.record(EventKind.PRUNE_FAILED, f"could not finish deleting {r.name}: {r.error}",
                      level="warning")

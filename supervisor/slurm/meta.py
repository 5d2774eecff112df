"""A Slurm run's record, slurm.json beside run.json: the job id, the script and one entry per
job start (slurm/job.py). Below control/ and slurm/runs.py: both read it."""

from __future__ import annotations

import contextlib
import fcntl
import os
from typing import Any, Iterator

from supervisor.slurm import commands as slurm
from supervisor.store import RunStore, atomic_write, read_json

META = "slurm.json"


def is_slurm(store: RunStore) -> bool:
    return (store.path / META).exists()


def read_meta(store: RunStore) -> dict[str, Any]:
    return read_json(store.path / META) or {}


def write_meta(store: RunStore, meta: dict[str, Any]) -> None:
    import json

    atomic_write(store.path / META, json.dumps(meta, indent=1, default=str))


def job_id(store: RunStore) -> str | None:
    return read_meta(store).get("job_id") or None


@contextlib.contextmanager
def meta_lock(store: RunStore) -> Iterator[None]:
    """submit and the job's first start both update slurm.json: one at a time."""
    fd = os.open(store.path / "slurm.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def job_in_queue(store: RunStore) -> bool:
    """Is the run's job still in squeue (pending, running, completing)? False when unknown."""
    jid = job_id(store)
    try:
        return bool(jid) and slurm.job(jid) is not None
    except slurm.SlurmError:
        return False

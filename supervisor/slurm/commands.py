"""Slurm's commands as functions: sbatch, squeue, scontrol, scancel. Argv lists, never a shell.

Every failure is a `SlurmError` whose message says what to do (Slurm not installed here, the
controller not answering, a job id Slurm no longer knows); callers print it in one line.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from dataclasses import dataclass

TIMEOUT_S = 30.0
# squeue's states of a job that still holds or waits for a node (the rest are history)
QUEUED = frozenset({"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SUSPENDED",
                    "CONFIGURING", "RESIZING"})
ACTIVE = frozenset({"RUNNING", "COMPLETING", "STOPPED", "SIGNALING", "STAGE_OUT"})


class SlurmError(Exception):
    """A Slurm command is missing or failed; the message is one line for the user."""


@dataclass(frozen=True)
class Job:
    job_id: str
    state: str  # squeue's %T: PENDING, RUNNING, COMPLETING, ...
    reason: str  # squeue's %r: Priority, Resources, BeginTime, JobHeldUser, None
    nodes: str  # squeue's %N: the node list (compressed, e.g. gpu[01-02]); empty while pending

    @property
    def first_node(self) -> str | None:
        return first_node(self.nodes)

    def describe(self) -> str:
        if self.state == "PENDING":
            return f"PENDING ({self.reason})" if self.reason and self.reason != "None" else "PENDING"
        if self.state in ("RUNNING", "COMPLETING") and self.nodes:
            return f"{self.state} on {self.nodes}"
        return self.state


def binary(name: str) -> str:
    path = shutil.which(name)
    if not path:
        raise SlurmError(f"`{name}` is not on PATH: run this on a Slurm login node "
                         "(or load Slurm first, e.g. `module load slurm`)")
    return path


def run(argv: list[str], timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run a Slurm command; SlurmError on a missing binary, a timeout or a non-zero exit."""
    argv = [binary(argv[0]), *argv[1:]]
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                             stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{os.path.basename(argv[0])} did not answer within {timeout:.0f} s "
                         "(is slurmctld up? `scontrol ping`)") from None
    except OSError as e:
        raise SlurmError(f"cannot run {argv[0]}: {e.strerror}") from None
    if res.returncode != 0:
        err = " ".join((res.stderr or res.stdout or "").split()) or f"exit {res.returncode}"
        raise SlurmError(f"{os.path.basename(argv[0])} failed: {err}")
    return res


def sbatch(script: str, cwd: str | None = None) -> str:
    """Submit a batch script file; the job id."""
    out = run(["sbatch", "--parsable", script] if cwd is None
              else ["sbatch", "--parsable", f"--chdir={cwd}", script]).stdout.strip()
    job_id = out.splitlines()[-1].split(";")[0].strip() if out else ""
    if not job_id.isdigit():
        raise SlurmError(f"sbatch answered {out!r}, not a job id")
    return job_id


def squeue(job_ids: list[str]) -> dict[str, Job]:
    """The jobs Slurm still lists (pending, running, completing); absent ones have ended."""
    ids = [j for j in job_ids if j]
    if not ids:
        return {}
    try:
        out = run(["squeue", "-h", "-j", ",".join(ids), "-o", "%i|%T|%r|%N"]).stdout
    except SlurmError as e:
        if "Invalid job id" in str(e):  # none of them is known any more
            return {}
        raise
    jobs = {}
    for line in out.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 4:
            jobs[parts[0]] = Job(*parts)
    return jobs


def job(job_id: str) -> Job | None:
    return squeue([job_id]).get(job_id)


def job_state(job_id: str) -> str | None:
    """scontrol's JobState, also for a job that has left squeue (None: unknown to Slurm)."""
    try:
        out = run(["scontrol", "show", "job", "-o", job_id]).stdout
    except SlurmError as e:
        if "Invalid job id" in str(e):
            return None
        raise
    for field in out.split():
        if field.startswith("JobState="):
            return field.split("=", 1)[1]
    return None


def scancel(job_id: str, signal: str | None = None, batch: bool = False) -> None:
    argv = ["scancel"] + ([f"--signal={signal}"] if signal else []) + (["--batch"] if batch else [])
    try:
        run(argv + [job_id])
    except SlurmError as e:
        if "already completing or completed" in str(e) or "Invalid job id" in str(e):
            return
        raise


def requeue(job_id: str) -> None:
    run(["scontrol", "requeue", job_id])


def first_node(nodelist: str) -> str | None:
    """The first host of a Slurm node list, without asking Slurm: gpu[01-03,7],cpu1 -> gpu01."""
    s = (nodelist or "").strip()
    if not s or s.startswith("("):
        return None
    head, depth = "", 0
    for ch in s:
        if ch == "," and depth == 0:
            break
        depth += ch == "["
        depth -= ch == "]"
        head += ch
    if "[" not in head:
        return head
    prefix, rest = head.split("[", 1)
    first = rest.rstrip("]").split(",")[0].split("-")[0]
    return prefix + first + head.split("]", 1)[1] if "]" in head else prefix + first


def short_hostname() -> str:
    return socket.gethostname().split(".")[0]


def is_local(node: str | None) -> bool:
    """Is `node` the machine this runs on? Then no ssh is needed to reach its sockets."""
    if not node:
        return False
    short = node.split(".")[0]
    return short in {"localhost", short_hostname(), socket.getfqdn().split(".")[0]}

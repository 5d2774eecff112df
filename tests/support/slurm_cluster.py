"""A real single-node Slurm for tests: munged + slurmctld + slurmd, localhost only.

Everything lives in one temp folder: the munge key and socket, slurm.conf (free ports, this
host as the only node, `ProctrackType=proctrack/linuxproc`, `TaskPlugin=task/none`: no
cgroups needed), state, spool and logs. Clients find it through `SLURM_CONF` (set in the
returned env). Needs Debian's `slurm-wlm` and `munge` and root (slurmd runs jobs as their
user); `unavailable()` says why not, and the tests skip with that reason.

    python -m tests.support.slurm_cluster DIR     # bring one up by hand; Ctrl-C takes it down
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel")
SBIN = ("/usr/sbin", "/usr/bin")


def _which(name: str) -> str | None:
    return shutil.which(name) or next((f"{d}/{name}" for d in SBIN if os.access(f"{d}/{name}", os.X_OK)), None)


def unavailable() -> str | None:
    """Why a cluster cannot be started here, or None."""
    missing = [b for b in BINARIES if not _which(b)]
    if missing:
        return f"not installed: {', '.join(missing)} (apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "slurmd must run as root"
    return None


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


CONF = """\
ClusterName=qlwtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
AuthInfo=socket={munge_sock}
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
KillWait=10
MinJobAge=600
InactiveLimit=0
SlurmdTimeout=30
PlugStackConfig={d}/plugstack.conf
NodeName={host} NodeHostname={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class Cluster:
    dir: Path
    host: str
    env: dict[str, str]
    procs: list[subprocess.Popen] = field(default_factory=list)

    def cmd(self, *argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        res = subprocess.run([_which(argv[0]) or argv[0], *argv[1:]], env=self.env, text=True,
                             capture_output=True, timeout=timeout)
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: {res.stderr.strip() or res.returncode}")
        return res

    def squeue(self) -> list[str]:
        return [x for x in self.cmd("squeue", "-h", "-o", "%i %T %r").stdout.splitlines() if x.strip()]

    def logs(self) -> str:
        out = []
        for name in ("munged.log", "slurmctld.log", "slurmd.log"):
            p = self.dir / name
            if p.exists():
                out.append(f"--- {name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-40:]))
        return "\n".join(out)

    def stop(self) -> None:
        """Cancel what is left in the queue (a failed test's job), then stop the daemons."""
        try:
            ids = [x.split()[0] for x in self.squeue()]
            if ids:
                self.cmd("scancel", *ids, check=False)
                deadline = time.monotonic() + 20
                while self.squeue() and time.monotonic() < deadline:
                    time.sleep(0.3)
        except (OSError, RuntimeError, subprocess.SubprocessError):
            pass
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


def start(d: Path, cpus: int | None = None, timeout: float = 30.0) -> Cluster:
    """Bring a cluster up in folder d; raises RuntimeError with the daemons' logs if it fails."""
    d = Path(d).resolve()
    d.mkdir(parents=True, exist_ok=True)
    d.chmod(0o755)  # munged refuses a key or socket folder others can write
    for sub in ("state", "spool", "munge"):
        (d / sub).mkdir(exist_ok=True)
    (d / "munge").chmod(0o700)
    key = d / "munge" / "munge.key"
    if not key.exists():
        key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    host = socket.gethostname().split(".")[0]
    ctld_port, slurmd_port = _free_ports(2)
    munge_sock = d / "munge" / "munge.sock"
    (d / "plugstack.conf").write_text("")
    conf = d / "slurm.conf"
    conf.write_text(CONF.format(host=host, d=d, ctld_port=ctld_port, slurmd_port=slurmd_port,
                                munge_sock=munge_sock, cpus=cpus or os.cpu_count() or 1))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    for k in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SQUEUE_")) and k != "SLURM_CONF"]:
        del env[k]  # a test run inside a Slurm job must not talk to that job's cluster
    cl = Cluster(dir=d, host=host, env=env)
    try:
        cl.procs.append(subprocess.Popen(
            [_which("munged"), "-F", "-f", f"--socket={munge_sock}", f"--key-file={key}",
             f"--log-file={d / 'munged.log'}", f"--pid-file={d / 'munge' / 'munged.pid'}",
             f"--seed-file={d / 'munge' / 'munged.seed'}"],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
            start_new_session=True))
        _wait(lambda: munge_sock.exists(), timeout, "munged did not create its socket", cl)
        for daemon in ("slurmctld", "slurmd"):
            argv = [_which(daemon), "-D", "-f", str(conf)] + (["-i"] if daemon == "slurmctld" else [])
            cl.procs.append(subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                             stdout=open(d / f"{daemon}.out", "ab"),
                                             stderr=subprocess.STDOUT, start_new_session=True))
            if daemon == "slurmctld":
                _wait(lambda: cl.cmd("scontrol", "ping", check=False).stdout.count("UP") > 0,
                      timeout, "slurmctld did not answer scontrol ping", cl)
        _wait(lambda: _node_idle(cl), timeout, "the node did not become idle", cl)
    except BaseException:
        cl.stop()
        raise
    return cl


def _node_idle(cl: Cluster) -> bool:
    out = cl.cmd("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.strip()
    return out.startswith("idle")


def _wait(pred, timeout: float, what: str, cl: Cluster) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in cl.procs:
            if p.poll() is not None:
                raise RuntimeError(f"{what}: {p.args[0]} exited {p.returncode}\n{cl.logs()}")
        try:
            if pred():
                return
        except (OSError, subprocess.SubprocessError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{what} within {timeout:.0f} s\n{cl.logs()}")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    c = start(Path(sys.argv[1]))
    print(f"export SLURM_CONF={c.env['SLURM_CONF']}", flush=True)
    try:
        while all(p.poll() is None for p in c.procs):
            time.sleep(1)
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        c.stop()

#!/usr/bin/env python3
"""Soak test (RELIABILITY_PLAN D6): a fast fake trainer under a real supervisor, killed often.

    python bench/soak.py [--minutes 30] [--json summary.json]

The fake trainer (tests/fakes/fake_trainer.py) runs at ~100 steps/s with a checkpoint every
~2 s and keep=3 (`train.save_total_limit`). About every 20 s the soak SIGKILLs the trainer
(the supervisor must relaunch it from the newest complete checkpoint), and about every 60 s
it SIGKILLs the supervisor and restarts it the way a user would (`qlora-watch status`, which
calls runs.ensure_supervisor; the new supervisor re-adopts the trainer). Invariants are
checked twice a second throughout:

- state.json always parses;
- once a complete checkpoint existed, the newest complete checkpoint is never older than the
  newest complete one seen so far (nothing resumable is lost);
- checkpoint-N folders in the output dir <= keep + 2;
- no zombie among the run's processes (supervisor children, wrappers, trainers) for > 5 s;
- the supervisor's RSS (/proc/PID/status VmRSS) and open fds (/proc/PID/fd) stay flat:
  sampled 3 s after each restart and every 10 s over each supervisor's life.

Exit 0 when every invariant held, 1 otherwise; the summary is printed (and written as JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from supervisor.states import TERMINAL_VALUES  # noqa: E402
from supervisor.store import read_json  # noqa: E402

FAKE = ROOT / "tests" / "fakes" / "fake_trainer.py"
CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


def qlw(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "supervisor", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def write_recipe(work: Path, args: argparse.Namespace) -> Path:
    data = work / "data.jsonl"
    data.write_text(json.dumps({"text": "hello"}) + "\n")
    cmd = json.dumps([sys.executable, str(FAKE), "--steps", str(args.max_steps),
                      "--step-time", str(args.step_time), "--save-every", str(args.save_every)])
    text = textwrap.dedent(f"""
        name = "soak"
        oom_ladder = []
        [model]
        name = "fake-model"
        [model.tiny]
        hidden_size = 32
        num_layers = 1
        num_heads = 2
        num_kv_heads = 1
        intermediate_size = 64
        [data]
        path = "{data}"
        [train]
        output_dir = "{work / 'out'}"
        max_seq_len = 256
        per_device_batch = 1
        grad_accum = 1
        save_total_limit = {args.keep}
        [trainer]
        command = {cmd}
        [supervisor]
        sample_interval_s = 1.0
        stop_grace_s = 10
        log_max_bytes = 4000000
        log_backups = 2
        [guards.crash]
        backoff_base_s = 0.1
        backoff_max_s = 2
        max_restarts = 5
        [guards.oom]
        release_timeout_s = 20
        [guards.checkpoints]
        min_free_gib = 0
    """)
    p = work / "soak.toml"
    p.write_text(text)
    return p


def lock_pid(run: Path) -> int | None:
    try:
        return int((run / "supervisor.lock").read_text().strip())
    except (OSError, ValueError):
        return None


def proc_status(pid: int) -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            k, _, v = line.partition(":")
            out[k] = v.strip()
    except OSError:
        pass
    return out


def rss_kib(pid: int) -> int | None:
    v = proc_status(pid).get("VmRSS")
    return int(v.split()[0]) if v else None


def fd_count(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def alive(pid: int | None) -> bool:
    if not pid:
        return False
    st = proc_status(pid).get("State", "")
    return bool(st) and not st.startswith("Z")


def supervisor_alive(run: Path) -> int | None:
    from supervisor.control import runs
    from supervisor.store import RunStore

    if not runs.supervisor_running(RunStore(run)):
        return None
    pid = lock_pid(run)
    return pid if alive(pid) else None


def zombies(watch: set[int], sup_pid: int | None) -> set[int]:
    """Zombies among the run's processes: known wrappers/trainers, children of the supervisor."""
    out = set()
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        pid = int(d)
        st = proc_status(pid)
        if not st.get("State", "").startswith("Z"):
            continue
        ppid = int(st.get("PPid", "0") or 0)
        if pid in watch or (sup_pid and ppid == sup_pid):
            out.add(pid)
    return out


def checkpoints_now(out: Path) -> tuple[int, int | None, int]:
    """(number of checkpoint-N dirs, newest complete step, all checkpoint-* entries)."""
    from supervisor.checkpoints.folders import checkpoint_status

    n, newest, entries = 0, None, 0
    try:
        names = os.listdir(out)
    except OSError:
        return 0, None, 0
    for name in names:
        if name.startswith("checkpoint-"):
            entries += 1
        m = CKPT_RE.match(name)
        if not m:
            continue
        n += 1
        info = checkpoint_status(out / name)
        if info.complete and (newest is None or info.step > newest):
            newest = info.step
    return n, newest, entries


def trend(series: list[int]) -> dict:
    if not series:
        return {}
    third = max(1, len(series) // 3)
    return {"n": len(series), "first": series[0], "last": series[-1], "min": min(series),
            "max": max(series), "median_first_third": statistics.median(series[:third]),
            "median_last_third": statistics.median(series[-third:])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--step-time", type=float, default=0.01, help="seconds per fake step (100/s)")
    ap.add_argument("--save-every", type=int, default=200, help="steps between checkpoints (~2 s)")
    ap.add_argument("--keep", type=int, default=3)
    ap.add_argument("--trainer-kill-every", type=float, default=20.0)
    ap.add_argument("--supervisor-kill-every", type=float, default=60.0)
    ap.add_argument("--max-steps", type=int, default=10**8)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workdir", default=None, help="default: a fresh temporary folder")
    ap.add_argument("--json", default=None, help="also write the summary here")
    args = ap.parse_args()

    rng = random.Random(args.seed)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="qlw-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    home = work / "home"
    home.mkdir(exist_ok=True)
    os.environ["QLORA_WATCH_HOME"] = str(home)
    recipe = write_recipe(work, args)
    out = work / "out"

    res = qlw("start", str(recipe), "--detach", "--force")
    if res.returncode != 0:
        print(res.stdout, res.stderr)
        return 2
    run_id = res.stdout.strip().splitlines()[-1]
    run = home / "runs" / run_id
    print(f"soak: run {run_id} in {work} for {args.minutes:g} min", flush=True)

    t0 = time.monotonic()
    end = t0 + args.minutes * 60
    next_trainer_kill = t0 + args.trainer_kill_every * rng.uniform(0.75, 1.25)
    next_sup_kill = t0 + args.supervisor_kill_every * rng.uniform(0.75, 1.25)
    violations: list[str] = []
    counts = {"trainer_kills": 0, "supervisor_kills": 0, "supervisor_restarts": 0, "checks": 0,
              "state_parse_failures": 0, "max_checkpoint_dirs": 0, "max_checkpoint_entries": 0}
    restart_rss: list[int] = []
    restart_fds: list[int] = []
    life_rss: list[int] = []
    life_fds: list[int] = []
    best_seen: int | None = None
    zombie_first: dict[int, float] = {}
    watch: set[int] = set()
    last_life_sample = 0.0
    post_restart_sample_at: float | None = t0 + 3.0
    sup_pid = supervisor_alive(run)
    last_report = t0

    def violate(msg: str) -> None:
        stamp = f"t+{time.monotonic() - t0:7.1f}s {msg}"
        violations.append(stamp)
        print("VIOLATION", stamp, flush=True)

    while time.monotonic() < end:
        now = time.monotonic()
        counts["checks"] += 1
        raw = None
        try:
            raw = (run / "state.json").read_text()
            st = json.loads(raw)
        except (OSError, ValueError) as e:
            counts["state_parse_failures"] += 1
            violate(f"state.json does not parse: {e!r} ({len(raw or '')} bytes)")
            st = {}
        if st.get("state") in TERMINAL_VALUES:
            violate(f"run reached terminal state {st.get('state')}: {st.get('message')}")
            break
        w = st.get("wrapper") or {}
        if w.get("pid"):
            watch.add(int(w["pid"]))
        pidf = read_json(run / "attempts" / str(st.get("attempt") or 1) / "trainer.pid.json")
        if pidf and pidf.get("pid"):
            watch.add(int(pidf["pid"]))

        n, newest, entries = checkpoints_now(out)
        counts["max_checkpoint_dirs"] = max(counts["max_checkpoint_dirs"], n)
        counts["max_checkpoint_entries"] = max(counts["max_checkpoint_entries"], entries)
        if n > args.keep + 2:
            violate(f"{n} checkpoint dirs > keep+2 ({sorted(os.listdir(out))})")
        if best_seen is not None and (newest is None or newest < best_seen):
            # a concurrent delete of an *older* one cannot cause this; re-check once to be sure
            time.sleep(0.2)
            n2, newest2, _ = checkpoints_now(out)
            if newest2 is None or newest2 < best_seen:
                violate(f"newest complete checkpoint went from {best_seen} to {newest2}")
                newest = newest2
        if newest is not None:
            best_seen = newest if best_seen is None else max(best_seen, newest)

        cur_sup = supervisor_alive(run)
        if cur_sup is not None and cur_sup != sup_pid:
            sup_pid = cur_sup
            post_restart_sample_at = now + 3.0
        for z in zombies(watch, sup_pid):
            first = zombie_first.setdefault(z, now)
            if now - first > 5.0:
                violate(f"zombie pid {z} for more than 5 s")
                zombie_first[z] = float("inf")
        for z in list(zombie_first):
            if not proc_status(z).get("State", "").startswith("Z"):
                del zombie_first[z]

        if sup_pid and post_restart_sample_at is not None and now >= post_restart_sample_at:
            post_restart_sample_at = None
            r, f = rss_kib(sup_pid), fd_count(sup_pid)
            if r is not None and f is not None:
                restart_rss.append(r)
                restart_fds.append(f)
        if sup_pid and now - last_life_sample >= 10.0:
            last_life_sample = now
            r, f = rss_kib(sup_pid), fd_count(sup_pid)
            if r is not None and f is not None:
                life_rss.append(r)
                life_fds.append(f)

        if now >= next_trainer_kill:
            next_trainer_kill = now + args.trainer_kill_every * rng.uniform(0.75, 1.25)
            if pidf and alive(pidf.get("pid")):
                try:
                    os.kill(int(pidf["pid"]), signal.SIGKILL)
                    counts["trainer_kills"] += 1
                except ProcessLookupError:
                    pass
        if now >= next_sup_kill:
            next_sup_kill = now + args.supervisor_kill_every * rng.uniform(0.75, 1.25)
            pid = supervisor_alive(run)
            if pid:
                os.kill(pid, signal.SIGKILL)
                counts["supervisor_kills"] += 1
                time.sleep(rng.uniform(0.0, 1.0))
                r = qlw("status", run_id, "--json")  # restarts it (runs.ensure_supervisor)
                if r.returncode != 0:
                    violate(f"`status` failed after a supervisor kill: {r.stderr.strip()[:300]}")
                counts["supervisor_restarts"] += 1
        elif sup_pid is None or not alive(sup_pid):
            # died on its own? that is a finding; restart it the user's way and count it
            if supervisor_alive(run) is None:
                time.sleep(1.0)
                if supervisor_alive(run) is None:
                    violate("the supervisor died without being killed")
                    qlw("status", run_id, "--json")
        if now - last_report >= 60:
            last_report = now
            print(f"soak: t+{now - t0:5.0f}s step {st.get('step')} attempt {st.get('attempt')} "
                  f"state {st.get('state')} ckpts {n} newest {newest} kills "
                  f"{counts['trainer_kills']}/{counts['supervisor_kills']} rss "
                  f"{life_rss[-1] if life_rss else '?'} KiB fds {life_fds[-1] if life_fds else '?'}",
                  flush=True)
        time.sleep(0.5)

    # Wind down: stop the run, wait, make sure nothing is left.
    final_state = read_json(run / "state.json") or {}
    qlw("stop", run_id, "--now")
    wr = qlw("wait", run_id, "--timeout", "60", timeout=90)
    time.sleep(1.0)
    left = []
    import psutil

    for p in psutil.process_iter(["pid"]):
        try:
            if p.pid != os.getpid() and p.environ().get("QLORA_WATCH_HOME") == str(home):
                left.append(p.pid)
        except (psutil.Error, OSError):
            continue
    if left:
        violate(f"processes left after stop: {left}")
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    from supervisor.store import RunStore

    store = RunStore(run)
    events = store.events()
    kinds: dict[str, int] = {}
    for e in events:
        kinds[e.kind] = kinds.get(e.kind, 0) + 1
    steps = store.db().execute("SELECT COUNT(*), MAX(step) FROM steps").fetchone()
    store.close()
    rss_growth = (max(restart_rss) - min(restart_rss)) if restart_rss else 0
    fd_spread = (max(restart_fds + life_fds) - min(restart_fds + life_fds)) if restart_fds else 0
    # "flat": after-restart RSS does not trend up (last third within 15% of the first third)
    # and the fd count varies by at most 8 (sqlite WAL, sockets of attached clients).
    t_rss = trend(restart_rss)
    if t_rss and t_rss["median_last_third"] > 1.15 * t_rss["median_first_third"]:
        violate(f"supervisor RSS after restart grew: {t_rss}")
    if fd_spread > 8:
        violate(f"supervisor fd count varied by {fd_spread}")
    summary = {
        "minutes": round((time.monotonic() - t0) / 60, 1), "run_id": run_id, "workdir": str(work),
        **counts,
        "attempts": final_state.get("attempt"), "final_step_before_stop": final_state.get("step"),
        "steps_in_db": steps[0], "max_step_in_db": steps[1],
        "newest_complete_seen": best_seen,
        "events": {k: kinds[k] for k in sorted(kinds)},
        "supervisor_rss_kib_after_restart": t_rss,
        "supervisor_fds_after_restart": trend(restart_fds),
        "supervisor_rss_kib_over_life": trend(life_rss),
        "supervisor_fds_over_life": trend(life_fds),
        "rss_spread_after_restart_kib": rss_growth, "fd_spread": fd_spread,
        "final_wait": wr.stdout.strip(), "processes_left": left,
        "violations": violations[:50], "violation_count": len(violations),
    }
    text = json.dumps(summary, indent=1)
    print("\nSOAK SUMMARY")
    print(text, flush=True)
    if args.json:
        Path(args.json).write_text(text)
    return 0 if not violations else 1


if __name__ == "__main__":
    raise SystemExit(main())

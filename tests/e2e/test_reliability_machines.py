"""Issue #14, "robust on real machines": logout, shared GPUs, slow downloads, preemption,
the run's environment, secrets, serve's key, errors in words, `attach --ssh`. Real processes;
fakes only for the hardware this machine lacks (NVML). Rows: docs/reliability.md, section R."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import (
    HF,
    ROOT,
    create_run,
    fake_recipe,
    kinds,
    qlw,
    read_state,
    reap,
    supervisor_pid,
    wait_end,
    wait_for,
    wait_state,
    wait_step,
)

pytestmark = pytest.mark.timeout(120)


def _supervise(store, env: dict[str, str] | None = None) -> subprocess.Popen:
    """The supervisor as a batch job runs it: in the foreground of its own process group."""
    out = open(store.path / "supervisor.out", "ab")
    try:
        proc = subprocess.Popen([sys.executable, "-m", "supervisor", "_supervise", str(store.path)],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=str(ROOT), env={**os.environ, **(env or {})})
    finally:
        out.close()
    return proc


# ------------------------------------------------------------------------------ 4. preemption


@pytest.mark.parametrize("how", ["usr1-then-term", "term-under-slurm"])
def test_r4_preemption_saves_records_preempted_exits_0_and_resumes(
        qlw_home: Path, tmp_path: Path, how: str) -> None:
    """Slurm's --signal=USR1@120 then SIGTERM (or SIGTERM alone in a Slurm job) to the
    supervisor's process group: the trainer saves a complete checkpoint, the run is PREEMPTED,
    the supervisor exits 0, and `qlora-watch resume` completes the run from that checkpoint."""
    from supervisor.checkpoints.folders import checkpoint_status

    recipe = fake_recipe(tmp_path, ["--steps", "60", "--step-time", "0.05", "--save-every", "1000"])
    store = create_run(recipe)
    env = {"SLURM_JOB_ID": "4242"} if how == "term-under-slurm" else {}
    sup = _supervise(store, env)
    try:
        wait_step(qlw_home, store.run_id, 8)
        pgid = os.getpgid(sup.pid)
        if how == "usr1-then-term":
            os.killpg(pgid, signal.SIGUSR1)
            time.sleep(0.3)
        os.killpg(pgid, signal.SIGTERM)  # Slurm: SIGTERM, then SIGKILL after KillWait
        assert sup.wait(30) == 0
    finally:
        reap(sup, 5)
    st = read_state(qlw_home, store.run_id)
    assert st["state"] == "preempted", st
    assert "killed" not in st["message"] and "qlora-watch resume" in st["message"]
    ckpt = checkpoint_status(st["last_checkpoint"])
    assert ckpt.complete and ckpt.step is not None and 8 <= ckpt.step < 60
    assert "preempt" in kinds(qlw_home, store.run_id)

    res = qlw("resume", store.run_id, "--detach")
    assert res.returncode == 0, res.stderr
    assert wait_end(store.run_id, 60) == 0
    st = read_state(qlw_home, store.run_id)
    assert st["state"] == "completed" and st["resume_from"] == str(ckpt.path) and st["step"] == 60


def test_r4_preempted_while_waiting_to_relaunch(qlw_home: Path, tmp_path: Path) -> None:
    """No trainer alive (a back-off between attempts): PREEMPTED at once, exit 0."""
    recipe = fake_recipe(tmp_path, ["--steps", "60", "--step-time", "0.05", "--crash-at", "3"])
    recipe.write_text(recipe.read_text().replace("backoff_base_s = 0.05", "backoff_base_s = 30")
                      .replace("backoff_max_s = 0.2", "backoff_max_s = 30"))
    store = create_run(recipe)
    sup = _supervise(store)
    try:
        wait_state(qlw_home, store.run_id, "backoff")
        os.killpg(os.getpgid(sup.pid), signal.SIGUSR1)
        assert sup.wait(30) == 0
    finally:
        reap(sup, 5)
    assert read_state(qlw_home, store.run_id)["state"] == "preempted"
    wait_for(lambda: supervisor_pid(qlw_home, store.run_id) is None, what="supervisor gone")


# ------------------------------------------------------------------------------ 6. redaction

# ------------------------------------------------------------------------------ 1. logout


async def _attach_snapshot(sock: Path) -> dict:
    from supervisor.control.client import AsyncRunClient

    c = AsyncRunClient(sock)
    try:
        return await c.connect()
    finally:
        await c.close()


def _attach_ok(sock: Path) -> bool:
    import asyncio

    try:
        return bool(asyncio.run(asyncio.wait_for(_attach_snapshot(sock), 3)).get("state"))
    except Exception:  # noqa: BLE001 - not bound again yet
        return False


@pytest.mark.parametrize("what", ["folder", "socket"])
def test_r1_socket_removed_under_a_live_supervisor_is_bound_again(
        qlw_home: Path, tmp_path: Path, what: str) -> None:
    """pam_systemd removes the runtime dir at logout (or a tmp cleaner the socket): `attach`
    works again within 5 s, with the folder 0700 and the socket 0600 again."""
    import shutil
    import stat

    from supervisor import paths
    from tests.support import start, stop_now

    recipe = fake_recipe(tmp_path, ["--steps", "100000", "--step-time", "0.05"])
    run_id = start(recipe)
    try:
        wait_step(qlw_home, run_id, 2)
        sock = paths.socket_path(run_id)
        assert _attach_ok(sock)
        t0 = time.monotonic()
        if what == "folder":
            shutil.rmtree(sock.parent)
        else:
            sock.unlink()
        assert not _attach_ok(sock)
        wait_for(lambda: _attach_ok(sock), timeout=5, what="attach after the socket was removed")
        took = time.monotonic() - t0
        assert took < 5
        assert stat.S_IMODE(os.lstat(sock.parent).st_mode) == 0o700
        assert stat.S_IMODE(os.lstat(sock).st_mode) == 0o600
        assert (qlw_home / "runs" / run_id / "supervisor.log").read_text().count("bound again") == 1
    finally:
        stop_now(run_id)


def _logind_root(tmp_path: Path, kill: bool, linger: bool) -> Path:
    from supervisor.control.logind import user_name

    root = tmp_path / "root"
    (root / "run/systemd/system").mkdir(parents=True)
    (root / "etc/systemd/logind.conf.d").mkdir(parents=True)
    (root / "etc/systemd/logind.conf").write_text("[Login]\n#KillUserProcesses=no\n")
    if kill:
        (root / "etc/systemd/logind.conf.d/50-kill.conf").write_text("[Login]\nKillUserProcesses=yes\n")
    (root / "var/lib/systemd/linger").mkdir(parents=True)
    if linger:
        (root / "var/lib/systemd/linger" / user_name()).write_text("")
    return root


@pytest.mark.parametrize("kill, linger, said", [(True, False, True), (True, True, False),
                                                (False, False, False)])
def test_r1_start_says_when_logout_would_end_the_run(qlw_home: Path, tmp_path: Path,
                                                     kill: bool, linger: bool, said: bool) -> None:
    from supervisor.control.logind import user_name
    from tests.support import wait_end

    root = _logind_root(tmp_path, kill, linger)
    recipe = fake_recipe(tmp_path, ["--steps", "3", "--step-time", "0.01"])
    env = {**os.environ, "QLW_LOGIND_ROOT": str(root), "PATH": "/usr/bin:/bin"}  # no systemd-run
    res = qlw("start", str(recipe), "--detach", "--force", env=env)
    assert res.returncode == 0, res.stderr
    fix = f"loginctl enable-linger {user_name()}"
    assert (fix in res.stderr and "KillUserProcesses=yes" in res.stderr) == said, res.stderr
    assert wait_end(res.stdout.strip().splitlines()[-1], 30) == 0


# ------------------------------------------------------------------------------ 8. errors in words

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="drops privileges / mounts: needs root")


def _as_nobody(argv: list[str]) -> list[str]:
    """argv run as uid/gid 65534 (util-linux setpriv: the venv's interpreter stays reachable)."""
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *argv]


def _one_line_exit_2(res: subprocess.CompletedProcess, *words: str) -> None:
    err = res.stderr.strip()
    assert res.returncode == 2, (res.returncode, res.stdout, err)
    assert "Traceback" not in err and "Error:" not in err, err
    last = err.splitlines()[-1]
    assert last.startswith("qlora-watch: ") and all(w in last for w in words), last


@needs_root
@pytest.mark.parametrize("cmd", [["ls"], ["status"], ["stop"], ["attach"], ["start", "RECIPE", "--detach"]])
def test_r8_another_users_home_is_one_line_exit_2(tmp_path: Path, cmd: list[str]) -> None:
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="qlw-", dir="/tmp"))
    try:
        base.chmod(0o711)
        home = base / "home"
        (home / "runs").mkdir(parents=True, mode=0o700)
        home.chmod(0o700)  # root's
        recipe = fake_recipe(base, ["--steps", "3"])
        base.chmod(0o755)
        recipe.chmod(0o644)
        (base / "data.jsonl").chmod(0o644)
        args = [str(recipe) if a == "RECIPE" else a for a in cmd]
        res = subprocess.run(_as_nobody([sys.executable, "-m", "supervisor", *args]), capture_output=True,
                             text=True, cwd=str(base), timeout=60,
                             env={**os.environ, "QLORA_WATCH_HOME": str(home), "PYTHONPATH": str(ROOT)})
        _one_line_exit_2(res, str(home), "QLORA_WATCH_HOME", "belongs to root")
    finally:
        shutil.rmtree(base, ignore_errors=True)


@needs_root
def test_r8_stale_lock_of_another_user_is_one_line_exit_2(tmp_path: Path) -> None:
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="qlw-", dir="/tmp"))
    try:
        base.chmod(0o755)
        home = base / "home"
        home.mkdir()
        env = {**os.environ, "QLORA_WATCH_HOME": str(home), "PYTHONPATH": str(ROOT)}
        recipe = fake_recipe(base, ["--steps", "3"])
        made = subprocess.run([sys.executable, "-c", "import sys; from tests.support import create_run;"
                               "from pathlib import Path; print(create_run(Path(sys.argv[1])).run_id)",
                               str(recipe)], capture_output=True, text=True, cwd=str(ROOT), env=env, check=True)
        run_id = made.stdout.strip().splitlines()[-1]
        subprocess.run(["chown", "-R", "65534:65534", str(home)], check=True)
        lock = home / "runs" / run_id / "supervisor.lock"
        lock.write_text("4242")
        lock.chmod(0o600)  # root's: a lock left by a supervisor another user ran
        res = subprocess.run(_as_nobody([sys.executable, "-m", "supervisor", "status", run_id]),
                             capture_output=True, text=True, cwd=str(ROOT), timeout=60, env=env)
        _one_line_exit_2(res, str(lock), "belongs to root")
    finally:
        shutil.rmtree(base, ignore_errors=True)


MOUNTED_HOME = r"""
import json, os, subprocess, sys
mnt, recipe, mode = sys.argv[0].rsplit("/", 1)[0] + "/home", sys.argv[1], sys.argv[2]
os.makedirs(mnt + "/runs", exist_ok=True)
if mode == "ro":
    subprocess.run(["mount", "-o", "remount,ro", mnt], check=True)
else:
    with open(mnt + "/fill", "wb") as f:
        try:
            f.write(b"x" * 10_000_000)
        except OSError:
            pass
env = {**os.environ, "QLORA_WATCH_HOME": mnt}
res = subprocess.run([sys.executable, "-m", "supervisor", "start", recipe, "--detach", "--force"],
                     capture_output=True, text=True, env=env, timeout=60)
print(json.dumps({"rc": res.returncode, "err": res.stderr, "out": res.stdout}))
"""


@needs_root
@pytest.mark.parametrize("mode, words", [("ro", ("read-only file system", "QLORA_WATCH_HOME")),
                                         ("full", ("no space left", "free", "QLORA_WATCH_HOME"))])
def test_r8_read_only_or_full_home_is_one_line_exit_2(tmp_path: Path, mode: str, words: tuple) -> None:
    from tests.support import run_in_tmpfs

    recipe = fake_recipe(tmp_path, ["--steps", "3"])
    driver = MOUNTED_HOME.replace('sys.argv[1], sys.argv[2]', f'{str(recipe)!r}, {mode!r}')
    got = run_in_tmpfs(tmp_path / "home", "256k", driver, env={"PYTHONPATH": str(ROOT)})
    _one_line_exit_2(subprocess.CompletedProcess([], got["rc"], got["out"], got["err"]), *words)


# ------------------------------------------------------------------------------ 7. serve's key


def test_r7_serve_needs_its_token(tmp_path: Path) -> None:
    """`qlora-watch serve` prints one URL with a random token; a request without it (or with a
    wrong one, or a foreign Host) is refused, the page with it sets a cookie that lets the
    page's static files and websocket through; it listens on 127.0.0.1 only."""
    import socket
    import urllib.error
    import urllib.request

    import psutil

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "supervisor", "serve", "--port", str(port)],
                            cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        first = proc.stdout.readline()
        assert "?token=" in first, first
        url = first.split(" at ")[-1].strip()
        token = url.split("token=")[1]
        assert len(token) >= 32
        base = f"http://127.0.0.1:{port}"

        def get(path: str, **headers: str) -> tuple[int, str, dict]:
            req = urllib.request.Request(base + path, headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=5) as r:
                    return r.status, r.read().decode(errors="replace"), dict(r.headers)
            except urllib.error.HTTPError as e:
                return e.code, e.read().decode(errors="replace"), dict(e.headers)

        def ready() -> bool:
            try:
                return get("/")[0] == 403
            except OSError:
                return False

        wait_for(ready, timeout=30, what="serve listening")
        assert get("/")[0] == 403
        assert get("/?token=" + "x" * len(token))[0] == 403
        assert get("/static/js/textual.js")[0] == 403
        assert get("/ws")[0] == 403
        assert get(f"/?token={token}", Host=f"evil.example:{port}")[0] == 403  # DNS rebinding
        code, page, headers = get(f"/?token={token}")
        assert code == 200 and "qlora-watch" in page
        assert f'data-session-websocket-url="ws://127.0.0.1:{port}/ws?token={token}"' in page
        code, page2, _ = get(f"/?token={token}", Host=f"localhost:{port}")  # ssh -L users type this
        assert code == 200 and f"ws://localhost:{port}/ws?token={token}" in page2
        assert f"http://localhost:{port}/static/" in page2

        async def ws(url: str) -> object:
            import aiohttp

            async with aiohttp.ClientSession() as s:
                try:
                    async with s.ws_connect(url):
                        return True
                except aiohttp.WSServerHandshakeError as e:
                    return e.status

        import asyncio

        assert asyncio.run(ws(f"ws://127.0.0.1:{port}/ws?token={token}")) is True
        assert asyncio.run(ws(f"ws://127.0.0.1:{port}/ws")) == 403
        cookie = headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        jar = cookie.split(";")[0]
        assert get("/static/js/textual.js", Cookie=jar)[0] == 200
        assert get("/ws", Cookie="qlora_watch_token=nope")[0] == 403
        conns = [c for c in psutil.Process(proc.pid).net_connections("inet") if c.status == "LISTEN"]
        assert conns and all(c.laddr.ip == "127.0.0.1" for c in conns)
        # a second serve gets another token
        from supervisor.tui.serve import make_server

        assert make_server(["x"], port=1).token != make_server(["x"], port=1).token != token
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)


# ------------------------------------------------------------------------------ 2. shared GPUs


def _nvml_gpus_guarded(qlw_home: Path, tmp_path: Path, cvd: str | None) -> list[dict]:
    """2 FakeNVML GPUs: GPU 0 idle and hot (another job's card), GPU 1 busy and cool. The
    utilisation and thermal guards see a short window."""
    import json as _json

    from tests.support import PATCHED, events

    extra = f'[env]\nCUDA_VISIBLE_DEVICES = "{cvd}"\n' if cvd is not None else ""
    recipe = fake_recipe(tmp_path, ["--steps", "100000", "--step-time", "0.05", "--save-every", "100000"],
                         extra=extra + """
        [guards.utilisation]
        window_s = 2
        threshold_pct = 50
        [guards.thermal]
        margin_c = 5
    """)
    store = create_run(recipe)
    scenario = {"nvml": {"devices": [
        {"util_pct": 0, "temp_c": 86, "processes": {"1": 20000}},  # idle; 1 C from T.Limit
        {"util_pct": 97, "temp_c": 60}]}}
    out = open(store.path / "supervisor.out", "ab")
    sup = subprocess.Popen([sys.executable, str(PATCHED), str(store.path), _json.dumps(scenario)],
                           stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                           start_new_session=True, cwd=str(ROOT))
    out.close()
    try:
        wait_step(qlw_home, store.run_id, 80, timeout=60)  # > 4 s of training: two windows
        time.sleep(1.5)
        evs = [e for e in events(qlw_home, store.run_id) if e["kind"] == "guard"]
        snap = __import__("asyncio").run(_attach_snapshot(
            __import__("supervisor.paths", fromlist=["x"]).socket_path(store.run_id)))
        last = snap["samples"][-1]["gpus"]
    finally:
        qlw("stop", store.run_id, "--now")
        reap(sup, 30)
    return evs, last


def test_r2_only_the_runs_gpus_drive_its_guards(qlw_home: Path, tmp_path: Path) -> None:
    """CUDA_VISIBLE_DEVICES=1: no warning from the idle, hot GPU 0; the dashboard still gets
    GPU 0's readings, marked as not this run's, with the other job's memory told apart."""
    evs, gpus = _nvml_gpus_guarded(qlw_home, tmp_path, "1")
    assert evs == [], [e["message"] for e in evs]
    by = {g["index"]: g for g in gpus}
    assert by[0]["this_run"] is False and by[1]["this_run"] is True
    assert by[0]["others_mem_mib"] == pytest.approx(20000)


def test_r2_without_cuda_visible_devices_both_gpus_are_the_runs(qlw_home: Path, tmp_path: Path) -> None:
    """The control: with every GPU visible, idle GPU 0 halves the mean and GPU 0 is hot."""
    evs, gpus = _nvml_gpus_guarded(qlw_home, tmp_path, None)
    msgs = " | ".join(e["message"] for e in evs)
    assert "GPU utilisation averaged" in msgs and "GPU 0 is 1 C from its slowdown" in msgs, msgs
    assert all(g["this_run"] for g in gpus)


# ------------------------------------------------------------------------------ 3. downloads


def _download_recipe(tmp_path: Path, into: Path) -> Path:
    """A trainer that 'downloads' 1 MiB at 128 KiB/s (8 s) while loading, with the loading
    stall limit at 3 s: without the download counted as progress it would be relaunched."""
    cache = tmp_path / "hf" / "hub"
    return fake_recipe(tmp_path, ["--steps", "5", "--step-time", "0.02", "--download", str(into),
                                  "--download-bytes", str(1 << 20), "--download-rate", str(128 * 1024)],
                       extra=f'[env]\nHF_HUB_CACHE = "{cache}"\n[guards.stall]\nloading_s = 3\n')


def test_r3_slow_download_is_progress_not_a_stall(qlw_home: Path, tmp_path: Path) -> None:
    from tests.support import events, start

    repo = tmp_path / "hf" / "hub" / "models--fake-model"  # the recipe's model.name
    run_id = start(_download_recipe(tmp_path, repo))
    seen = wait_for(lambda: (read_state(qlw_home, run_id).get("download") or {}).get("active")
                    and qlw("status", run_id).stdout, timeout=20, what="a download in status")
    assert "downloading the model:" in seen and "/s" in seen, seen
    js = __import__("json").loads(qlw("status", run_id, "--json", check=True).stdout)
    assert js["download"]["bytes"] > 0 and js["download"]["rate_bps"] > 0
    assert wait_end(run_id, 60) == 0
    st = read_state(qlw_home, run_id)
    assert st["state"] == "completed" and st["attempt"] == 1, st  # no stall relaunch
    ks = kinds(qlw_home, run_id)
    assert "relaunch" not in ks and "download" in ks
    done = [e["message"] for e in events(qlw_home, run_id) if e["kind"] == "download"]
    assert any("download done: 1.0 MB" in m for m in done), done


def test_r3_the_control_bytes_elsewhere_are_a_stall(qlw_home: Path, tmp_path: Path) -> None:
    """The same trainer writing outside the HF cache: the stall guard relaunches it."""
    from tests.support import start, stop_now

    run_id = start(_download_recipe(tmp_path, tmp_path / "elsewhere"))
    try:
        wait_for(lambda: "relaunch" in kinds(qlw_home, run_id), timeout=30, what="a stall relaunch")
    finally:
        stop_now(run_id)


def test_r3_disk_checked_against_the_cached_download_size(qlw_home: Path, tmp_path: Path) -> None:
    """The Hub's index (metadata.total_size) is in the cache already: a download larger than
    the cache's free disk is said at launch."""
    import json as _json

    from tests.support import events, start

    repo = tmp_path / "hf" / "hub" / "models--fake-model"
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "model.safetensors.index.json").write_text(_json.dumps(
        {"metadata": {"total_size": 141 * 10**15}, "weight_map": {}}))  # 141 PB
    recipe = fake_recipe(tmp_path, ["--steps", "3", "--step-time", "0.02"],
                         extra=f'[env]\nHF_HUB_CACHE = "{tmp_path / "hf" / "hub"}"\n')
    run_id = start(recipe)
    assert wait_end(run_id, 60) == 0
    msgs = [e["message"] for e in events(qlw_home, run_id) if e["kind"] == "download_disk"]
    assert msgs and "the model download needs about 125.2 PB more" in msgs[0] and "HF_HOME" in msgs[0], msgs


# ------------------------------------------------------------------------------ 5. the run's environment


def test_r5_relaunch_after_readoption_uses_the_start_environment(qlw_home: Path, tmp_path: Path) -> None:
    """Start with QLW_TEST_PROBE=from-start; SIGKILL the supervisor; `status` from a shell with
    another value restarts it (re-adoption); the trainer is killed: the relaunch gets the value
    captured at start, and env.json is 0600."""
    import stat

    from tests.support import launches, stop_now, trainer_pid

    rec = tmp_path / "rec.jsonl"
    recipe = fake_recipe(tmp_path, ["--steps", "100000", "--step-time", "0.02", "--record", str(rec)])
    res = qlw("start", str(recipe), "--detach", "--force", check=True,
              env={**os.environ, "QLW_TEST_PROBE": "from-start", "HF_TOKEN": HF})
    run_id = res.stdout.strip().splitlines()[-1]
    try:
        wait_step(qlw_home, run_id, 3)
        envf = qlw_home / "runs" / run_id / "env.json"
        assert stat.S_IMODE(envf.stat().st_mode) == 0o600
        os.kill(supervisor_pid(qlw_home, run_id), signal.SIGKILL)
        wait_for(lambda: supervisor_pid(qlw_home, run_id) is None, what="supervisor gone")
        other = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
        qlw("status", run_id, check=True, env={**other, "QLW_TEST_PROBE": "from-a-later-shell"})
        wait_for(lambda: "adopted" in kinds(qlw_home, run_id), what="re-adoption")
        os.kill(trainer_pid(qlw_home, run_id), signal.SIGKILL)
        wait_for(lambda: len(launches(rec)) == 2, timeout=30, what="the relaunch")
        second = launches(rec)[1]
        assert second["qlw_env"]["QLW_TEST_PROBE"] == "from-start"
        assert "HF_TOKEN" in second["env_keys"]
        st = qlw("status", run_id, "--json", check=True).stdout
        assert HF not in st and "from-start" not in st  # the environment is never shown
    finally:
        stop_now(run_id)


def test_r5_supervisor_logs_rotate(qlw_home: Path, tmp_path: Path) -> None:
    """supervisor.log through a RotatingFileHandler; supervisor.out (the supervisor's own
    stdout) by copy-and-truncate while it runs: both stay near log_max_bytes, backups kept."""
    import stat

    from tests.support import start, stop_now

    recipe = fake_recipe(tmp_path, ["--steps", "100000", "--step-time", "0.01", "--save-every", "1"],
                         extra="")
    recipe.write_text(recipe.read_text().replace("stop_grace_s = 5", "stop_grace_s = 5\nlog_max_bytes = 4096\nlog_backups = 2"))
    run_id = start(recipe)
    run = qlw_home / "runs" / run_id
    try:
        wait_for(lambda: (run / "supervisor.log.2").exists(), timeout=60, what="supervisor.log rotated twice")
        with open(run / "supervisor.out", "a") as f:  # what a chatty library prints on stderr
            f.write("x" * 10_000 + "\n")
        wait_for(lambda: (run / "supervisor.out.1").exists(), timeout=10, what="supervisor.out rotated")
        for name in ("supervisor.log", "supervisor.log.1", "supervisor.log.2", "supervisor.out.1"):
            assert stat.S_IMODE((run / name).stat().st_mode) == 0o600, name
        assert not (run / "supervisor.log.3").exists()
        assert (run / "supervisor.log").stat().st_size <= 4096 + 512
        assert (run / "supervisor.out").stat().st_size <= 4096
    finally:
        stop_now(run_id)


# ------------------------------------------------------------------------------ 9. attach --ssh

SSHD = "/usr/sbin/sshd"


@pytest.fixture
def sshd(tmp_path_factory: pytest.TempPathFactory):
    """A real OpenSSH server on 127.0.0.1 with its own config, keys and port in a temp folder
    (no system config touched), and an `ssh` wrapper that reaches it as `testhost`. Yields a
    function `start(**sshd_config) -> ssh wrapper path`; servers stop at teardown."""
    import shutil
    import socket

    if not os.path.exists(SSHD) or not shutil.which("ssh") or os.geteuid() != 0:
        pytest.skip("needs openssh-server (sshd) and root")
    d = Path(tempfile_dir := tmp_path_factory.mktemp("sshd"))
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
    for name in ("host", "client"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
    (d / "authorized_keys").write_text((d / "client.pub").read_text())
    servers: list[subprocess.Popen] = []

    def start(**conf: str) -> Path:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        n = len(servers)
        cfg = d / f"sshd_config.{n}"
        cfg.write_text("\n".join([
            f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {d / 'host'}",
            f"PidFile {d}/sshd.{n}.pid", f"AuthorizedKeysFile {d / 'authorized_keys'}",
            "PasswordAuthentication no", "KbdInteractiveAuthentication no", "UsePAM no",
            "StrictModes no", "PermitRootLogin yes", "LogLevel ERROR",
            *[f"{k} {v}" for k, v in conf.items()], ""]))
        proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(cfg)], stdout=subprocess.DEVNULL,
                                stderr=open(d / f"sshd.{n}.log", "wb"), start_new_session=True)
        servers.append(proc)
        client = d / f"ssh_config.{n}"
        client.write_text(f"Host testhost\n  HostName 127.0.0.1\n  Port {port}\n  User root\n"
                          f"  IdentityFile {d / 'client'}\n  IdentitiesOnly yes\n  BatchMode yes\n"
                          "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n")
        wrapper = d / f"ssh.{n}"
        wrapper.write_text(f'#!/bin/sh\nexec ssh -F "{client}" "$@"\n')
        wrapper.chmod(0o755)
        wait_for(lambda: subprocess.run([str(wrapper), "testhost", "true"], capture_output=True,
                                        timeout=20).returncode == 0, timeout=20, what="sshd up")
        return wrapper

    yield start
    del tempfile_dir
    for p in servers:
        with __import__("contextlib").suppress(OSError):
            os.killpg(p.pid, signal.SIGTERM)
        reap(p, 10)


def _remote_qlw(tmp_path: Path, home: Path) -> Path:
    """qlora-watch as the remote box has it: a script that sshd's bare environment can run."""
    script = tmp_path / "bin dir" / "qlora-watch"  # a space: the path is quoted on the far side
    script.parent.mkdir()
    script.write_text(f'#!/bin/sh\nQLORA_WATCH_HOME="{home}" PYTHONPATH="{ROOT}" '
                      f'exec "{sys.executable}" -m supervisor "$@"\n')
    script.chmod(0o755)
    return script


def _live_run(tmp_path: Path) -> str:
    from tests.support import start

    return start(fake_recipe(tmp_path, ["--steps", "100000", "--step-time", "0.05"]))


def _attach_ssh(ssh: Path, run_id: str, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return qlw("attach", "--ssh", "testhost", run_id, *extra, timeout=90,
               env={**os.environ, "QLORA_WATCH_SSH": str(ssh), **(env or {})})


def test_r9_remote_path_without_qlora_watch_is_said(qlw_home: Path, tmp_path: Path, sshd) -> None:
    from tests.support import stop_now

    ssh = sshd()
    run_id = _live_run(tmp_path)
    try:
        res = _attach_ssh(ssh, run_id)
        assert res.returncode == 1
        err = res.stderr.strip()
        assert "not on the PATH that ssh gives commands on testhost" in err and "--remote-cmd" in err \
            and "QLORA_WATCH_REMOTE_CMD" in err and "Traceback" not in err, err
    finally:
        stop_now(run_id)


def test_r9_forwarding_refused_is_said(qlw_home: Path, tmp_path: Path, sshd) -> None:
    from tests.support import stop_now

    ssh = sshd(AllowTcpForwarding="no", AllowStreamLocalForwarding="no")
    run_id = _live_run(tmp_path)
    try:
        res = _attach_ssh(ssh, run_id, "--remote-cmd", str(_remote_qlw(tmp_path, qlw_home)))
        assert res.returncode == 1
        err = res.stderr.strip()
        assert "refuses Unix-socket forwarding" in err and "AllowTcpForwarding no" in err \
            and "AllowStreamLocalForwarding yes" in err, err
    finally:
        stop_now(run_id)


def test_r9_attach_over_a_real_sshd_and_reconnect(qlw_home: Path, tmp_path: Path, sshd) -> None:
    """Through a real sshd (the remote command from QLORA_WATCH_REMOTE_CMD): the dashboard
    shows live steps; the ssh forward is killed: it shows "reconnecting", not a frozen
    TRAINING, and then live steps again over a new forward."""
    import psutil

    pexpect = pytest.importorskip("pexpect")
    from tests.support import steps_seen, stop_now

    ssh = sshd()
    run_id = _live_run(tmp_path)
    env = {**os.environ, "TERM": "xterm-256color", "QLORA_WATCH_SSH": str(ssh),
           "QLORA_WATCH_REMOTE_CMD": str(_remote_qlw(tmp_path, qlw_home))}
    child = pexpect.spawn(sys.executable, ["-m", "supervisor", "attach", "--ssh", "testhost", run_id],
                          dimensions=(48, 160), env=env, timeout=60, cwd=str(ROOT))
    try:
        seen = steps_seen(child, 2)
        assert max(seen) > min(seen)

        def forwards() -> list[psutil.Process]:
            out = []
            for p in psutil.Process(child.pid).children(recursive=True):
                try:
                    if "-N" in p.cmdline() and "-L" in p.cmdline() and p.status() != psutil.STATUS_ZOMBIE:
                        out.append(p)
                except psutil.Error:
                    continue
            return out

        (fwd,) = wait_for(forwards, what="the ssh forward")
        fwd.kill()
        child.expect("RECONNECTING", timeout=30)
        wait_for(lambda: [p for p in forwards() if p.pid != fwd.pid], timeout=30, what="a new forward")
        child.expect("TRAINING", timeout=30)
        later = steps_seen(child, 2)
        assert max(later) > max(seen)
        child.send("d")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
        stop_now(run_id)

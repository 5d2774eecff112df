"""The dashboard against a real run: attach in a pseudo-terminal, watch, detach, re-attach."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from tests.support import ROOT, qlw, read_state, steps_seen, wait_for

pexpect = pytest.importorskip("pexpect")
pytestmark = pytest.mark.slow



def attach(home: Path, run_id: str):
    env = {**os.environ, "QLORA_WATCH_HOME": str(home), "TERM": "xterm-256color"}
    return pexpect.spawn(sys.executable, ["-m", "supervisor", "attach", run_id],
                         dimensions=(48, 160), env=env, timeout=60, cwd=str(ROOT))


@pytest.mark.timeout(400)
def test_attach_watch_detach_reattach_full_history(qlw_home: Path, tmp_path: Path) -> None:
    res = qlw("start", "recipes/tiny.toml", "--detach", "--set", f'train.output_dir="{tmp_path / "o"}"',
              "--set", "train.max_steps=400", "--set", "debug.step_sleep_s=0.15", check=True)
    run_id = res.stdout.strip().splitlines()[-1]
    try:
        wait_for(lambda: (read_state(qlw_home, run_id).get("step") or 0) >= 4, timeout=180,
                 what="training steps")
        child = attach(qlw_home, run_id)
        seen = steps_seen(child, 3)
        assert max(seen) > min(seen), seen  # live steps arrive
        child.send("d")
        child.expect(pexpect.EOF)
        child.close()
        assert "detached" in child.before.decode(errors="replace") or child.exitstatus == 0
        assert read_state(qlw_home, run_id)["state"] == "training"  # the run goes on
        before = read_state(qlw_home, run_id)["step"]
        time.sleep(2)
        child = attach(qlw_home, run_id)
        # the events panel shows the run from its first event: full history, not only what is new
        child.expect("attempt 1 started")
        later = steps_seen(child, 2)
        assert max(later) >= before
        child.send("e")  # the events view
        child.expect("trainer phase: loading_model")
        child.send("\x1b")
        time.sleep(1.0)  # else ESC + q reads as alt+q
        child.send("q")
        child.expect(pexpect.EOF)
        child.close()
    finally:
        qlw("stop", run_id, "--now")
        qlw("wait", run_id, "--timeout", "60")


@pytest.mark.timeout(200)
def test_attach_over_ssh_forwards_a_unix_socket(qlw_home: Path, tmp_path: Path) -> None:
    """attach --ssh runs the dashboard here against the remote socket, through `ssh -L`."""
    import json

    from tests.support import fake_recipe

    recipe = fake_recipe(tmp_path, ["--steps", "100000", "--step-time", "0.05"])
    run_id = qlw("start", str(recipe), "--detach", check=True).stdout.strip().splitlines()[-1]
    log = tmp_path / "ssh.log"
    env = {**os.environ, "QLORA_WATCH_HOME": str(qlw_home), "TERM": "xterm-256color",
           "QLORA_WATCH_SSH": str(ROOT / "tests" / "fakes" / "fake_ssh.py"), "FAKE_SSH_LOG": str(log),
           # fake_ssh.py runs under `env python3`: this interpreter's, even from an unactivated venv
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    child = pexpect.spawn(sys.executable, ["-m", "supervisor", "attach", "--ssh", "me@gpu-box", run_id],
                          dimensions=(48, 160), env=env, timeout=60, cwd=str(ROOT))
    try:
        seen = steps_seen(child, 2)
        assert max(seen) > min(seen)
        child.send("d")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
        qlw("stop", run_id, "--now")
        qlw("wait", run_id, "--timeout", "60")
    calls = [json.loads(x) for x in log.read_text().splitlines()]
    assert calls[0][-4:] == ["me@gpu-box", "qlora-watch", "_socket", run_id]
    fwd = next(c for c in calls if "-L" in c)
    local, remote = fwd[fwd.index("-L") + 1].split(":", 1)
    assert remote.endswith(f"{run_id}.sock") and local.endswith("run.sock")
    assert not Path(local).parent.exists()  # the private temp folder is cleaned up

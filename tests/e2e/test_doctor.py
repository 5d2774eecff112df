"""`qlora-watch doctor` on this CPU box, and the supervisord clash in a scratch venv."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from supervisor.preflight import doctor
from tests.support import qlw

CHECKS = {"supervisor package", "NVIDIA driver / NVML", "torch", "bitsandbytes", "liger-kernel",
          "unsloth", "flash-attn", "HF token", "HF cache", "runs folder", "lingering"}
SECRET = "hf_doctorNeverPrintsThis123"


def test_doctor_json_on_a_cpu_box(qlw_home: Path) -> None:
    res = qlw("doctor", "--json", env={**os.environ, "HF_TOKEN": SECRET})
    assert res.returncode == 0, res.stdout + res.stderr
    assert SECRET not in res.stdout + res.stderr
    checks = {c["name"]: c for c in json.loads(res.stdout)}
    assert set(checks) == CHECKS
    assert all(c["status"] in ("ok", "warn", "fail") for c in checks.values())
    nvml = checks["NVIDIA driver / NVML"]
    assert nvml["status"] == "warn" and "not available" in nvml["message"] and nvml["fix"]
    assert checks["supervisor package"]["status"] == "ok"
    assert checks["torch"]["status"] == "ok" and "CPU build" in checks["torch"]["message"]
    assert checks["HF token"]["status"] == "ok" and "HF_TOKEN" in checks["HF token"]["message"]
    assert str(qlw_home) in checks["runs folder"]["message"]
    text = doctor.render([doctor.Check(**c) for c in checks.values()])  # what `doctor` prints
    assert "0 fail" in text and "fix: " in text and SECRET not in text


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_doctor_reports_the_supervisord_clash(wheel: Path, tmp_path: Path) -> None:  # noqa: F811
    venv = tmp_path / "scratch"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    py = venv / "bin" / "python"
    # qlora-watch first, then supervisord over it: both write site-packages/supervisor/.
    for pkg in (str(wheel), "supervisor"):
        subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", pkg],
                       check=True, capture_output=True, timeout=240)
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # qlora-watch's own dependencies (pydantic, psutil, ...) from our venv, after the scratch ones.
    Path(site, "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["QLORA_WATCH_HOME"] = str(tmp_path / "home")
    qw = str(venv / "bin" / "qlora-watch")
    res = subprocess.run([qw, "doctor", "--json"], capture_output=True, text=True, env=env, timeout=240,
                         cwd=tmp_path)
    assert res.returncode == 1, res.stdout + res.stderr
    pkg = next(c for c in json.loads(res.stdout) if c["name"] == "supervisor package")
    assert pkg["status"] == "fail" and "supervisord" in pkg["message"] and "separate venv" in pkg["fix"]
    other = subprocess.run([qw, "ls"], capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path)
    assert other.returncode == 2 and "separate venv" in other.stderr and "Traceback" not in other.stderr

"""`qlora-watch doctor`'s checks in-process (the command itself: tests/e2e/test_doctor.py)."""

from __future__ import annotations

from pathlib import Path

from supervisor.preflight import doctor

SECRET = "hf_doctorNeverPrintsThis123"


def test_doctor_finds_kill_user_processes_and_the_token_file(tmp_path: Path) -> None:
    etc = tmp_path / "systemd"
    (etc / "logind.conf.d").mkdir(parents=True)
    (etc / "logind.conf").write_text("[Login]\n#KillUserProcesses=no\n")
    assert doctor.logind_kill_user_processes(etc) is None
    (etc / "logind.conf.d" / "10-kill.conf").write_text("[Login]\nKillUserProcesses=yes\n")
    assert doctor.logind_kill_user_processes(etc) is True
    token = tmp_path / "hf" / "token"
    token.parent.mkdir()
    assert doctor.hf_token_source({"HF_HOME": str(token.parent)}) is None
    token.write_text(SECRET)
    assert doctor.hf_token_source({"HF_HOME": str(token.parent)}) == f"the file {token}"


def test_torch_cuda_build_newer_than_the_driver_fails() -> None:
    stack = {"torch": {"version": "2.13.0+cu130", "cuda": "13.0", "available": False, "devices": 0}}
    c = doctor.check_torch(stack, driver_cuda=12040, gpus=1)
    assert c.status == "fail" and "CUDA 13.0" in c.message and "12.4" in c.message
    cpu = doctor.check_torch({"torch": {"version": "2.13.0+cpu", "cuda": None}}, 12040, gpus=2)
    assert cpu.status == "fail" and "CPU build" in cpu.message

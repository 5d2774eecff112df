"""The boundaries: the supervisor never loads torch or textual; the dashboard never the core."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support import ROOT


def loaded(modules: list[str]) -> set[str]:
    code = ("import sys\n" + "".join(f"import {m}\n" for m in modules)
            + "print(' '.join(sorted({n.split('.')[0] for n in sys.modules})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         check=True).stdout
    return set(out.split())


@pytest.mark.parametrize("module", [
    "supervisor.daemon.core", "supervisor.daemon.attempts", "supervisor.guards", "supervisor.telemetry.sampler",
    "supervisor.store", "supervisor.daemon.server", "supervisor.cli", "supervisor.control.runs",
    "supervisor.preflight.memory", "supervisor.wrapper", "supervisor.sinks.tbwriter", "supervisor.report.data",
])
def test_supervisor_side_loads_no_torch_or_textual(module: str) -> None:
    mods = loaded([module])
    assert not mods & {"torch", "transformers", "peft", "trl", "bitsandbytes", "textual"}, module


def test_dashboard_never_imports_the_core() -> None:
    code = ("import sys\nimport supervisor.tui.app\n"
            "bad = [n for n in sys.modules if n in ('supervisor.daemon.core', 'supervisor.daemon.attempts', "
            "'supervisor.store', 'supervisor.guards', 'supervisor.telemetry', 'supervisor.runner', 'torch')]\n"
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         check=True).stdout.strip()
    assert out == "[]"


def test_the_wrapper_starts_fast() -> None:
    """The exit-file wrapper sits between the supervisor and every trainer: stdlib only."""
    mods = loaded(["supervisor.wrapper"])
    assert not mods & {"psutil", "pydantic", "sqlite3", "torch"}

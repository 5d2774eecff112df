"""The architecture's boundaries: statically (pyproject.toml's import-linter contracts) and at run
time (each entry point imported in a fresh interpreter, then its sys.modules read): the core loads
no torch and no Textual, the dashboard no core module, the wrapper only the standard library.
Also: no test module imports another one (shared helpers live in tests/support/)."""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
import tomllib

import pytest

from tests.support import ROOT, TESTS

HEAVY = {"torch", "transformers", "peft", "trl", "bitsandbytes", "textual"}
# What the dashboard must never load: the supervisor's own process and what it runs on.
CORE = {"supervisor.daemon", "supervisor.store", "supervisor.guards", "supervisor.telemetry",
        "supervisor.runner", "torch"}

WRITE_ONE_SAMPLE = """
import tempfile
from pathlib import Path
from supervisor.records import HostSample, Sample
from supervisor.sinks.tbwriter import TelemetryTB
w = TelemetryTB(Path(tempfile.mkdtemp()) / "tb")
w.add_sample(Sample(t=1.0, host=HostSample(mem_available_mib=1.0)), 1)
w.close()
"""

CASES = [
    *(pytest.param(f"import {m}", HEAVY, id=m) for m in (
        "supervisor.daemon.core", "supervisor.daemon.attempts", "supervisor.daemon.server",
        "supervisor.guards", "supervisor.checkpoints.folders", "supervisor.telemetry",
        "supervisor.telemetry.sampler", "supervisor.store", "supervisor.cli", "supervisor.control.runs",
        "supervisor.preflight.check", "supervisor.wrapper", "supervisor.sinks.tbwriter",
        "supervisor.report.data",
    )),
    pytest.param("import tests.fakes.nvml", HEAVY, id="the fake NVML"),
    # the supervisor's TensorBoard file writer writes without torch or tensorflow
    pytest.param(WRITE_ONE_SAMPLE, HEAVY | {"tensorflow"}, id="tbwriter writing"),
    # a tracker's client is imported when a run is configured to use it, not before
    pytest.param("import supervisor.daemon.core, supervisor.sinks.trackers", {"wandb", "mlflow"},
                 id="no tracker until configured"),
    # guards get plain values and the recipe's config objects; they never load the schema
    pytest.param("import supervisor.guards, supervisor.ladder, supervisor.daemon.guard_window",
                 {"pydantic", "supervisor.recipe"}, id="guards load no pydantic"),
    # the dashboard is a client of the socket: it never loads the supervisor's process
    pytest.param("import supervisor.tui.app", CORE, id="dashboard"),
    # the exit-file wrapper sits between the supervisor and every trainer: stdlib only, fast
    pytest.param("import supervisor.wrapper", {"psutil", "pydantic", "sqlite3", "torch"},
                 id="wrapper starts fast"),
]


@pytest.mark.parametrize(("code", "never"), CASES)
def test_what_an_import_loads(code: str, never: set[str]) -> None:
    probe = code + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))\n"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT,
                         check=True, timeout=120).stdout
    loaded = json.loads(out.splitlines()[-1])
    bad = sorted(m for m in loaded if any(m == n or m.startswith(n + ".") for n in never))
    assert not bad, f"{code.strip()!r} loads {bad}"


def test_the_import_contracts_are_kept() -> None:
    """`lint-imports` (what `make check` runs) on pyproject.toml's contracts."""
    if subprocess.run([sys.executable, "-c", "import importlinter"], capture_output=True).returncode:
        pytest.fail("import-linter is not installed: pip install -e '.[test]'")
    res = subprocess.run(
        [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
         "sys.exit(lint_imports_command())", "--no-cache"],
        capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert "0 broken" in res.stdout


def test_every_core_module_is_in_the_core_contract() -> None:
    """A new module of supervisor/ is covered by the core contract (or is the trainer side or the
    dashboard, which have their own rules)."""
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    core = next(c for c in contracts if c["name"].startswith("The supervisor core"))
    top = {m.name for m in pkgutil.iter_modules([str(ROOT / "supervisor")])} - {"runner", "tui"}
    want, have = {f"supervisor.{m}" for m in top}, set(core["source_modules"])
    assert have == want, (f"pyproject.toml, contract {core['name']!r}: add {sorted(want - have)} to "
                          f"source_modules, remove {sorted(have - want)}")


def test_no_test_module_imports_another() -> None:
    """Helpers shared by tests live in tests/support/ (and stand-ins in tests/fakes/), not in a
    test module or conftest.py."""
    bad = []
    for path in sorted(TESTS.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level
                     else [])
            for name in names:
                parts = name.split(".")
                if parts[0] == "tests" and len(parts) > 1 and parts[1] not in ("support", "fakes"):
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {name}")
                if parts[-1] == "conftest" or parts[-1].startswith("test_"):
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {name}")
    assert not bad, "import from tests.support instead:\n" + "\n".join(sorted(set(bad)))

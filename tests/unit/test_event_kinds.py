"""Event kinds are one StrEnum of past facts whose values are the strings stored runs hold."""

from __future__ import annotations

import json
import re

from supervisor.records import Event, EventKind
from tests.support import ROOT

# What run stores, the socket protocol and [notify] rules have carried: renaming one breaks them.
STORED = {
    "launch", "adopted", "lost", "stray", "config_rewritten", "phase", "notice", "finished",
    "trainer_exited", "relaunch", "resume", "stop", "failed", "config_error", "state", "guard",
    "stacks", "gpu_release", "checkpoint_saved", "checkpoint_incomplete", "checkpoint_unmarked",
    "checkpoint_no_adapter", "checkpoint_quarantined", "checkpoint_pruned", "prune_failed",
    "preempt", "download", "download_disk",  # robustness (#14)
    "slurm",  # a job start (#18)
    "standby",  # the warm standby (#20)
}


def test_the_values_are_the_stored_strings() -> None:
    assert {k.value for k in EventKind} == STORED
    ev = Event(t=1.0, kind=EventKind.RELAUNCH_SCHEDULED)
    assert type(ev.kind) is str and ev.kind == "relaunch" == EventKind.RELAUNCH_SCHEDULED
    assert json.dumps({"kind": ev.kind}) == '{"kind": "relaunch"}'


def test_no_event_is_recorded_with_a_string_literal() -> None:
    literal = re.compile(r"""\brecord\(\s*["']|\bEvent\([^)]*\bkind=["']|\b_fail\([^)]*\bkind=["']""")
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in (ROOT / "supervisor").rglob("*.py")
                 if "tui" not in p.parts  # the dashboard only shows kinds (and its fixtures make some)
                 for i, line in enumerate(p.read_text().splitlines(), 1) if literal.search(line)]
    assert offenders == []

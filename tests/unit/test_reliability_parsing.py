"""RELIABILITY_PLAN E in-process: the line splitter and followers fuzzed, sanitize, a metrics line cut
mid-write, bad values. (With a real supervisor: tests/e2e/test_reliability_parsing.py.)"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import EVIL

pytestmark = pytest.mark.timeout(90)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.binary(max_size=300), st.sampled_from([b"\n", b"\r", b"\r\n", b"x" * 70000])),
                max_size=30))
def test_e1_line_splitter_is_bounded_and_loses_no_short_line(chunks: list[bytes]) -> None:
    from supervisor.wrapper import MAX_LINE, TRUNCATED, LineSplitter

    s = LineSplitter()
    out: list[bytes] = []
    for c in chunks:
        out += s.feed(c)
        assert len(s.buf) <= MAX_LINE
    out += s.flush()
    assert all(len(x) <= MAX_LINE + len(TRUNCATED) for x in out)
    assert all(b"\n" not in x and b"\r" not in x for x in out)
    data = b"".join(chunks)
    if max((len(p) for p in data.replace(b"\r", b"\n").split(b"\n")), default=0) <= MAX_LINE:
        assert out == [p for p in data.replace(b"\r", b"\n").split(b"\n") if p]
        assert s.truncated == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=2000), max_size=15), st.booleans())
def test_e2_followers_survive_random_bytes(tmp_path_factory, chunks: list[bytes], truncate: bool) -> None:
    """JsonlFollower and LogFollower fed random bytes (and a truncation): only dicts and
    strings come out, never an exception; a fragment is never parsed."""
    from supervisor.daemon.followers import MAX_LINE, JsonlFollower, LogFollower

    d = tmp_path_factory.mktemp("f")
    path = d / "f.log"
    path.write_bytes(b"")
    jf, lf = JsonlFollower(path), LogFollower(path)
    for i, c in enumerate(chunks):
        with open(path, "ab") as f:
            f.write(c)
        if truncate and i == len(chunks) // 2:
            os.truncate(path, 0)
        assert all(isinstance(o, dict) for o in jf.read())
        assert all(isinstance(x, str) for x in lf.read())
        assert len(jf.buf) <= MAX_LINE + 2000 and len(lf.buf) <= MAX_LINE + 2000


@pytest.mark.parametrize("line", EVIL)
def test_e3_sanitize_leaves_inert_text(line: str) -> None:
    from supervisor.sanitize import sanitize

    out = sanitize(line)
    assert not any(ord(ch) < 32 or 0x7F <= ord(ch) <= 0x9F for ch in out), repr(out)
    assert "52;" not in out and "owned title" not in out  # OSC payloads gone, not just ESC


def test_e4_metrics_line_cut_mid_write(tmp_path: Path) -> None:
    from supervisor.daemon.followers import JsonlFollower

    p = tmp_path / "events.jsonl"
    p.write_bytes(b'{"event": "step", "step": 11}\n{"event": "step", "step": 12, "lo')
    f = JsonlFollower(p)
    assert [o["step"] for o in f.read()] == [11]  # the fragment is buffered, not parsed
    assert f.read() == [] and f.bad_records == 0
    with open(p, "ab") as fh:
        fh.write(b'ss": 1.5}\n')
    assert f.read() == [{"event": "step", "step": 12, "loss": 1.5}]
    # A writer killed mid-line, then a new writer appending: one bad record, then clean.
    with open(p, "ab") as fh:
        fh.write(b'{"event": "step", "step": 13, "lo')
        fh.write(b'{"event": "step", "step": 13}\n{"event": "step", "step": 14}\n')
    assert [o["step"] for o in f.read()] == [14] and f.bad_records == 1


def test_e5_bad_values_are_skipped_or_blanked(tmp_path: Path) -> None:
    from supervisor.records import Step
    from supervisor.store import RunStore, continuous

    assert Step.from_trainer({"step": "garbage"}, 1) is None
    assert Step.from_trainer({}, 1) is None and Step.from_trainer({"step": None}, 1) is None
    s = Step.from_trainer({"step": 5, "loss": "NaN", "grad_norm": "Infinity", "lr": "fast", "epoch": 1e400,
                           "tokens": float("nan"), "max_steps": "1e400", "t": "yesterday"}, 2)
    assert s.step == 5 and math.isnan(s.loss) and math.isinf(s.grad_norm) and s.lr is None
    assert s.tokens is None and s.max_steps is None and s.t > 1e9
    store = RunStore(tmp_path)
    store.add_steps([Step(t=1.0, step=7, attempt=1, loss=2.0)], lineage=1)
    store.add_steps([Step(t=2.0, step=7, attempt=2, loss=1.5), Step(t=3.0, step=8, attempt=2, loss=float("nan"))],
                    lineage=1)  # the same step again after a resume: both attempts' rows kept
    rows = store.steps()
    assert [(r["step"], r["attempt"], r["loss"]) for r in rows[:2]] == [(7, 1, 2.0), (7, 2, 1.5)]
    line = continuous(rows)  # what charts draw: the later attempt's step 7 replaces the earlier
    assert [(r["step"], r["attempt"], r["loss"]) for r in line[:1]] == [(7, 2, 1.5)]
    assert math.isnan(rows[2]["loss"])  # NaN kept (the divergence guard counts it)

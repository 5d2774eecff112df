"""The steps table keeps every attempt's rows, and run stores written before that still open."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from supervisor.records import Step
from supervisor.report.data import load_attempts
from supervisor.store import RunStore, continuous

OLD_STEPS = """CREATE TABLE steps (
    lineage INTEGER NOT NULL, step INTEGER NOT NULL, attempt INTEGER NOT NULL, t REAL NOT NULL,
    loss REAL, grad_norm REAL, lr REAL, epoch REAL, tokens INTEGER, tokens_per_s REAL,
    step_time_s REAL, max_steps INTEGER,
    PRIMARY KEY (lineage, step)
)"""


def test_a_store_keyed_by_lineage_and_step_is_migrated_and_keeps_a_resumed_attempts_rows(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "db.sqlite")
    db.execute(OLD_STEPS)
    db.executemany("INSERT INTO steps (lineage, step, attempt, t, loss) VALUES (?,?,?,?,?)",
                   [(1, 10, 1, 1.0, 2.0), (1, 20, 1, 2.0, 1.8)])
    db.commit()
    db.close()
    store = RunStore(tmp_path)
    pk = [r[1] for r in sorted(store.db().execute("PRAGMA table_info(steps)"), key=lambda r: r[5]) if r[5]]
    assert pk == ["lineage", "attempt", "step"]
    # attempt 2 resumed from checkpoint-10 and redid step 20: both attempts' rows stay
    store.add_steps([Step(t=3.0, step=20, attempt=2, loss=1.7)], lineage=1)
    rows = store.steps()
    assert [(r["attempt"], r["step"], r["loss"]) for r in rows] == [(1, 10, 2.0), (1, 20, 1.8), (2, 20, 1.7)]
    assert [(r["attempt"], r["step"]) for r in continuous(rows)] == [(1, 10), (2, 20)]  # the charts' line
    for n in ("1", "2"):  # as the core launches an attempt: its folder and resolved recipe first
        (tmp_path / "attempts" / n).mkdir(parents=True)
        (tmp_path / "attempts" / n / "recipe.json").write_text("{}")
    a1, a2 = load_attempts(store, [], rows)  # the report: each attempt's own rows, none overwritten
    assert [r["step"] for r in a1.rows] == [10, 20] and [r["step"] for r in a2.rows] == [20]
    store.close()


def test_the_trainer_step_translator_is_the_one_the_store_reads_back(tmp_path: Path) -> None:
    s = Step.from_trainer({"t": 5.0, "step": "7", "loss": "NaN", "grad_norm": float("inf"), "tokens": 1e20}, attempt=3)
    assert s is not None and (s.step, s.attempt, s.tokens) == (7, 3, None)
    store = RunStore(tmp_path)
    store.add_steps([s], lineage=2)
    (row,) = store.steps()
    assert row["loss"] != row["loss"] and row["grad_norm"] == float("inf")  # NaN and inf survive SQLite
    store.close()

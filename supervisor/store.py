"""The run store: one folder per run with a SQLite database and an atomic state file.

Layout of `<state home>/runs/<run_id>/`:

    run.json              static facts (id, recipe, model, output_dir, created_at)
    recipe.toml           the recipe file as given (0600); attempts/N/recipe.json is what ran
    state.json            the live state, replaced atomically (tmp, fsync, rename, fsync dir)
    db.sqlite             WAL: samples, steps, events
    trainer.log[.1..]     the trainer's stdout+stderr, size-capped and rotated (by the wrapper)
    supervisor.log        the supervisor's own log
    supervisor.lock       flock held by the one live supervisor
    attempts/N/           recipe.json, events.jsonl (trainer's JSON lines), exit.json (wrapper)

SQLite in WAL mode with synchronous=NORMAL survives a SIGKILL of the writer at any instant
(a crash loses at most the last uncommitted transaction, never the file).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterator

from supervisor.numbers import num, wire
from supervisor.records import Event, Sample, Step, to_dict
from supervisor.status import RunInfo, RunStatus

STEPS_TABLE = """CREATE TABLE IF NOT EXISTS steps (
    lineage INTEGER NOT NULL, step INTEGER NOT NULL, attempt INTEGER NOT NULL, t REAL NOT NULL,
    loss REAL, grad_norm REAL, lr REAL, epoch REAL, tokens INTEGER, tokens_per_s REAL,
    step_time_s REAL, max_steps INTEGER,
    PRIMARY KEY (lineage, attempt, step)
)"""
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS samples (t REAL NOT NULL, data TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS samples_t ON samples(t);
{STEPS_TABLE};
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, t REAL NOT NULL, kind TEXT NOT NULL, level TEXT NOT NULL,
    message TEXT NOT NULL, guard TEXT, evidence TEXT, attempt INTEGER, acked INTEGER DEFAULT 0
);
"""

ADJECTIVES = (
    "amber azure bold brave calm clever coral crisp dapper eager fancy gentle glad golden "
    "happy hazel jolly keen lively lucky mellow merry misty noble olive proud quick quiet "
    "rapid rosy rustic shiny silent silver steady sunny swift tidy vivid warm wise witty zesty"
).split()
NOUNS = (
    "badger beacon birch bison comet condor cedar dune falcon fern finch fjord gecko harbor "
    "heron ibis island jaguar kestrel koala lagoon lark lemur lynx maple marten meadow moose "
    "newt orca otter owl panda pine puffin quail raven reef robin sable salmon tapir tern "
    "tiger walrus wren yak zebra"
).split()


# state.json and run.json carry this key: their rung ("rung", "start_rung") is numbered as
# supervisor/ladder.py says (rung 1: the first ladder change). Files written before it held the
# 0-based index of oom_ladder; readers get them renumbered.
RUNG_NUMBERING = "rung_numbering"


def _rungs_from_one(data: dict[str, Any], key: str) -> dict[str, Any]:
    rung = data.get(key)
    if data.get(RUNG_NUMBERING) != 1 and isinstance(rung, int) and not isinstance(rung, bool):
        data = {**data, key: rung + 1}
    data.setdefault(RUNG_NUMBERING, 1)
    return data


class RunNotFound(Exception):
    pass


def new_run_id(existing: set[str]) -> str:
    """A short, human-friendly id such as 'amber-falcon'; a digit is added on collision."""
    for _ in range(100):
        rid = f"{secrets.choice(ADJECTIVES)}-{secrets.choice(NOUNS)}"
        if rid not in existing:
            return rid
    return f"{secrets.choice(ADJECTIVES)}-{secrets.choice(NOUNS)}-{secrets.randbelow(10**4)}"


def atomic_write(path: Path, text: str, mode: int = 0o600) -> None:
    """Write via a temp file, fsync, rename, fsync the folder: readers see old or new."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from `path`, or None when missing or unreadable (never raises)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _finite(x: Any) -> float | str | None:
    """SQLite turns NaN into NULL; store non-finite values as text ('NaN', 'Infinity')."""
    f = num(x)
    return None if f is None else wire(f)


def _unfinite(x: Any) -> Any:
    return float(x) if isinstance(x, str) else x


class RunStore:
    """One run's folder. Opened by the supervisor (writer) and by CLI readers."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.run_id = self.path.name
        self._db: sqlite3.Connection | None = None
        self.state_error: str | None = None  # e.g. "state not saved: ENOSPC"
        self._written_at: float | None = None

    # -- files ------------------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return self.path / "state.json"

    @property
    def log_path(self) -> Path:
        return self.path / "trainer.log"

    def attempt_dir(self, n: int) -> Path:
        return self.path / "attempts" / str(n)

    def info(self) -> dict[str, Any]:
        return _rungs_from_one(read_json(self.path / "run.json") or {"run_id": self.run_id}, "start_rung")

    def read_state(self) -> dict[str, Any]:
        """The state file; a corrupt one is moved aside and reported, never trusted."""
        p = self.state_path
        if not p.exists():
            return {}
        data = read_json(p)
        if data is None:
            aside = p.with_name(f"state.json.corrupt-{int(time.time())}")
            lost = {"state": "lost", "message": f"state file was corrupt; moved to {aside.name}; "
                    "the previous run's state is unknown (nothing was signalled)"}
            try:
                os.replace(p, aside)
            except OSError:
                return lost
            # Replace it, or the next reader finds no state file and takes the run for new.
            self.write_state(lost)
            return lost
        return _rungs_from_one(data, "rung")

    def write_state(self, state: dict[str, Any]) -> bool:
        """Atomically replace state.json. On ENOSPC/EIO keep the old file and report it."""
        state = dict(state)
        state["updated_at"] = self._written_at = time.time()
        state[RUNG_NUMBERING] = 1
        try:
            atomic_write(self.state_path, json.dumps(state, indent=1, default=str, allow_nan=True))
        except OSError as e:
            self.state_error = f"state not saved: {errno.errorcode.get(e.errno or 0, str(e))}"
            return False
        self.state_error = None
        return True

    def read_status(self) -> RunStatus:
        """state.json as a RunStatus (an empty one for a new run); see read_state."""
        return RunStatus.from_json(self.read_state())

    def write_status(self, status: RunStatus) -> bool:
        """write_state of a RunStatus; sets its updated_at."""
        ok = self.write_state(status.to_json())
        if ok:
            status.updated_at = self._written_at
        return ok

    def run_info(self) -> RunInfo:
        """run.json as a RunInfo."""
        return RunInfo.from_json(self.info())

    # -- database ---------------------------------------------------------------------
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            conn = sqlite3.connect(self.path / "db.sqlite", timeout=5.0, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(SCHEMA)
            _migrate_steps_key(conn)
            self._db = conn
        return self._db

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def add_samples(self, samples: list[Sample]) -> None:
        rows = [(s.t, json.dumps(to_dict(s), allow_nan=True)) for s in samples]
        with self._tx() as c:
            c.executemany("INSERT INTO samples (t, data) VALUES (?, ?)", rows)

    def add_steps(self, steps: list[Step], lineage: int) -> None:
        rows = [
            (
                lineage, s.step, s.attempt, s.t, _finite(s.loss), _finite(s.grad_norm),
                _finite(s.lr), s.epoch, s.tokens, s.tokens_per_s, s.step_time_s, s.max_steps,
            )
            for s in steps
        ]
        # Keyed by attempt too: a resumed attempt redoes steps after its checkpoint, and both
        # attempts' rows are kept (readers take the later one, see continuous()).
        with self._tx() as c:
            c.executemany("INSERT OR REPLACE INTO steps VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", rows)

    def add_event(self, ev: Event) -> Event:
        with self._tx() as c:
            cur = c.execute(
                "INSERT INTO events (t, kind, level, message, guard, evidence, attempt, acked) "
                "VALUES (?,?,?,?,?,?,?,?)",
                (ev.t, ev.kind, ev.level, ev.message, ev.guard,
                 json.dumps(ev.evidence, default=str, allow_nan=True), ev.attempt, int(ev.acked)),
            )
            ev.id = cur.lastrowid
        return ev

    def ack_events(self, ids: list[int] | None) -> int:
        with self._tx() as c:
            if ids is None:
                cur = c.execute("UPDATE events SET acked=1 WHERE acked=0")
            else:
                cur = c.executemany("UPDATE events SET acked=1 WHERE id=?", [(i,) for i in ids])
            return cur.rowcount

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        c = self.db()
        c.execute("BEGIN")
        try:
            yield c
        except BaseException:
            c.execute("ROLLBACK")
            raise
        c.execute("COMMIT")

    # -- reading ----------------------------------------------------------------------
    def samples(self, limit: int | None = None, recent_full: int = 600) -> list[dict[str, Any]]:
        """All samples, or at most about `limit`: the last `recent_full` at full resolution and
        the rest evenly thinned in SQL (a 24 h run at 1 Hz is 86,400 rows; a chart is 200 wide)."""
        db = self.db()

        def every() -> list[dict[str, Any]]:
            return [json.loads(r[0]) for r in db.execute("SELECT data FROM samples ORDER BY rowid")]

        if not limit:
            return every()  # no COUNT needed
        lo, hi, n = db.execute("SELECT MIN(rowid), MAX(rowid), COUNT(*) FROM samples").fetchone()
        if not n:
            return []
        if n <= limit:
            return every()
        cut = hi - recent_full
        stride = max(1, (cut - lo) // max(1, limit - recent_full))
        rows = db.execute(
            "SELECT data FROM samples WHERE rowid > ? OR (rowid - ?) % ? = 0 ORDER BY rowid",
            (cut, lo, stride),
        )
        return [json.loads(r[0]) for r in rows]

    def steps(self, limit: int | None = None, recent_full: int = 1000) -> list[dict[str, Any]]:
        """Logged steps of every attempt, in the order they were trained (lineage, attempt, step);
        with `limit`, older ones thinned like samples(). continuous() drops redone ones."""
        cols = ("lineage", "step", "attempt", "t", "loss", "grad_norm", "lr", "epoch", "tokens",
                "tokens_per_s", "step_time_s", "max_steps")
        db = self.db()
        n = db.execute("SELECT COUNT(*) FROM steps").fetchone()[0]
        where, args = "", ()
        if limit and n > limit:
            stride = max(1, (n - recent_full) // max(1, limit - recent_full))
            where, args = "WHERE rn > ? OR rn % ? = 0 OR rn = 1", (n - recent_full, stride)
        rows = db.execute(
            f"SELECT {', '.join(cols)} FROM (SELECT *, ROW_NUMBER() OVER (ORDER BY lineage, attempt, step) "
            f"AS rn FROM steps) {where} ORDER BY lineage, attempt, step", args)
        out = []
        for r in rows:
            d = dict(zip(cols, r, strict=False))
            for k in ("loss", "grad_norm", "lr"):
                d[k] = _unfinite(d[k])
            out.append(d)
        return out

    def events(self, limit: int | None = None) -> list[Event]:
        """All events in order, or only the last `limit` of them."""
        q = "SELECT id, t, kind, level, message, guard, evidence, attempt, acked FROM events"
        if limit is not None and limit > 0:
            rows = self.db().execute(q + " ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
            rows.reverse()
        else:
            rows = self.db().execute(q + " ORDER BY id")
        out = [Event(id=r[0], t=r[1], kind=r[2], level=r[3], message=r[4], guard=r[5],
                     evidence=json.loads(r[6] or "{}"), attempt=r[7], acked=bool(r[8]))
               for r in rows]
        return out[-limit:] if limit and limit < 0 else out  # as before: all but the first -limit

    def log_tail(self, n: int = 200) -> list[str]:
        """The last n lines of the trainer's log (the current file only)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - 256 * 1024))
                data = f.read()
        except OSError:
            return []
        lines = data.decode("utf-8", errors="replace").splitlines()
        return lines[-n:]


def _migrate_steps_key(conn: sqlite3.Connection) -> None:
    """Databases written before attempts were keyed: (lineage, step) -> (lineage, attempt, step)."""
    pk = [r[1] for r in sorted(conn.execute("PRAGMA table_info(steps)"), key=lambda r: r[5]) if r[5]]
    if pk != ["lineage", "step"]:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("ALTER TABLE steps RENAME TO steps_old")
        conn.execute(STEPS_TABLE)
        conn.execute("INSERT INTO steps SELECT * FROM steps_old")
        conn.execute("DROP TABLE steps_old")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def continuous(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per lineage: when an attempt resumes at step s, earlier attempts' rows from s on
    were redone, so the later attempt's rows replace them (rows in store.steps() order)."""
    out: list[dict[str, Any]] = []
    for row in steps:
        while out and out[-1].get("lineage") == row.get("lineage") and out[-1]["step"] >= row["step"] \
                and out[-1].get("attempt") != row.get("attempt"):
            out.pop()
        out.append(row)
    return out


# ------------------------------------------------------------------------------ run folders


def create_run(runs_dir: Path, info: dict[str, Any], run_id: str | None = None) -> RunStore:
    runs_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if run_id is None:
        run_id = new_run_id({p.name for p in runs_dir.iterdir()})
    path = runs_dir / run_id
    path.mkdir(mode=0o700)
    (path / "attempts").mkdir(mode=0o700)
    info = {**info, "run_id": run_id, "created_at": time.time(), RUNG_NUMBERING: 1}
    atomic_write(path / "run.json", json.dumps(info, indent=1))
    return RunStore(path)


def list_runs(runs_dir: Path) -> list[RunStore]:
    """Runs, oldest first by creation time."""
    if not runs_dir.is_dir():
        return []
    stores = [RunStore(p) for p in runs_dir.iterdir() if (p / "run.json").is_file()]
    return sorted(stores, key=lambda s: (s.info().get("created_at") or 0, s.run_id))


def find_run(runs_dir: Path, ref: str | None) -> RunStore:
    """A run by unique id prefix; None means the latest run."""
    runs = list_runs(runs_dir)
    if not runs:
        raise RunNotFound("no runs yet: start one with `qlora-watch start RECIPE`")
    if not ref:
        return runs[-1]
    exact = [r for r in runs if r.run_id == ref]
    if exact:
        return exact[0]
    hits = [r for r in runs if r.run_id.startswith(ref)]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise RunNotFound(f"no run matches {ref!r}; `qlora-watch ls` lists them")
    raise RunNotFound(f"{ref!r} is ambiguous: {', '.join(r.run_id for r in hits)}")

"""The run store: one SQLite file per run directory.

Every write that completes a unit of work commits at once (WAL mode with synchronous=FULL, so a
commit that returned survives a crash of the process or the machine): a crash or Ctrl-C loses at
most the calls in flight, and a rerun resumes from what is here.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .errors import UserError
from .records import Instruction, Judgement, PseudoTarget, Response, stable_json

STORE_NAME = "run.sqlite"
SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS instructions (
    id TEXT PRIMARY KEY, text TEXT NOT NULL, input TEXT NOT NULL DEFAULT '',
    domain TEXT, task TEXT, origin TEXT NOT NULL, parent_id TEXT, mode TEXT,
    iteration INTEGER NOT NULL, reference TEXT, meta TEXT NOT NULL DEFAULT '{}',
    seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS pools (
    iteration INTEGER NOT NULL, pool TEXT NOT NULL, instruction_id TEXT NOT NULL,
    PRIMARY KEY (iteration, pool, instruction_id)
);
CREATE TABLE IF NOT EXISTS responses (
    instruction_id TEXT NOT NULL, role TEXT NOT NULL, model TEXT NOT NULL, iteration INTEGER NOT NULL,
    text TEXT NOT NULL, finish_reason TEXT, prompt_tokens INTEGER, completion_tokens INTEGER,
    PRIMARY KEY (instruction_id, role, model, iteration)
);
CREATE TABLE IF NOT EXISTS judgements (
    instruction_id TEXT NOT NULL, iteration INTEGER NOT NULL,
    raw_teacher_first TEXT, raw_student_first TEXT,
    teacher_first_scores TEXT, student_first_scores TEXT,
    parse_failures INTEGER NOT NULL DEFAULT 0, error TEXT,
    PRIMARY KEY (instruction_id, iteration)
);
CREATE TABLE IF NOT EXISTS pseudo_targets (
    id TEXT PRIMARY KEY, input_id TEXT NOT NULL, k INTEGER NOT NULL, text TEXT NOT NULL,
    method TEXT NOT NULL, teacher TEXT NOT NULL, params TEXT NOT NULL, logprobs TEXT
);
CREATE INDEX IF NOT EXISTS pseudo_targets_input ON pseudo_targets (input_id, k);
CREATE TABLE IF NOT EXISTS stages (
    iteration INTEGER NOT NULL, stage TEXT NOT NULL, finished_at REAL NOT NULL, detail TEXT NOT NULL,
    PRIMARY KEY (iteration, stage)
);
CREATE TABLE IF NOT EXISTS metrics (
    iteration INTEGER NOT NULL, name TEXT NOT NULL, value TEXT NOT NULL,
    PRIMARY KEY (iteration, name)
);
CREATE TABLE IF NOT EXISTS calls (
    key TEXT PRIMARY KEY, backend TEXT NOT NULL, model TEXT NOT NULL, role TEXT, iteration INTEGER,
    request TEXT NOT NULL, result TEXT NOT NULL, prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL, created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS failures (
    key TEXT NOT NULL, backend TEXT NOT NULL, model TEXT NOT NULL, role TEXT, iteration INTEGER,
    error TEXT NOT NULL, created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS config_changes (
    changed_at REAL NOT NULL, key TEXT NOT NULL, old TEXT NOT NULL, new TEXT NOT NULL, after TEXT NOT NULL
);
"""


class Store:
    """A run's state. Safe to share between threads of one process (one connection, one lock)."""

    def __init__(self, path: str | Path, *, readonly: bool = False) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        # The run's spending limits (a `lionkd.budget.Budget`), set when a command binds the run to its
        # config; every call cache opened on this store keeps to it.
        self.budget: Any = None
        if readonly:  # status, report, export: nothing is written, so a read-only disk or mount is fine
            self._db = _connect_readonly(self.path)
            self._db.row_factory = sqlite3.Row
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        with self.transaction():
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    self._db.execute(statement)
            self._db.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
            )

    @classmethod
    def open_run(cls, run_dir: str | Path) -> Store:
        return cls(Path(run_dir) / STORE_NAME)

    @classmethod
    def open_existing(cls, run_dir: str | Path) -> Store:
        """A run's store for reading (on a read-only disk too); a file that is not one is an error, and is
        left as it was."""
        path = Path(run_dir) / STORE_NAME
        if not path.is_file():
            raise UserError(f"{run_dir}: not a run directory (no {STORE_NAME})")
        if not _is_store(path):
            raise UserError(f"{path}: not a lionkd run store (empty, or another kind of file)")
        # Read-only only where it must be: a read-only connection cannot recover the journal of a run that
        # was killed, and would show the store as it was before the journal's last commits.
        writable = os.access(path, os.W_OK) and os.access(path.parent, os.W_OK)
        return cls(path, readonly=not writable)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """All statements inside commit together, or not at all."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    # ------------------------------------------------------------------ meta
    def get_meta(self, key: str) -> str | None:
        rows = self._query("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0]["value"] if rows else None

    def set_meta(self, key: str, value: str) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    # ------------------------------------------------------------------ instructions and pools
    def add_instructions(self, items: Iterable[Instruction]) -> int:
        """Insert new instructions (an id already present is kept as it was). Returns how many were new."""
        with self.transaction() as db:
            seq = db.execute("SELECT COALESCE(MAX(seq), 0) FROM instructions").fetchone()[0]
            added = 0
            for ins in items:
                seq += 1
                cur = db.execute(
                    "INSERT OR IGNORE INTO instructions (id, text, input, domain, task, origin, parent_id, mode,"
                    " iteration, reference, meta, seq) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                    (ins.id, ins.text, ins.input, ins.domain, ins.task, ins.origin, ins.parent_id, ins.mode,
                     ins.iteration, ins.reference, stable_json(ins.meta), seq),
                )
                added += cur.rowcount
        return added

    @staticmethod
    def _instruction(row: sqlite3.Row) -> Instruction:
        return Instruction(
            id=row["id"], text=row["text"], input=row["input"], domain=row["domain"], task=row["task"],
            origin=row["origin"], parent_id=row["parent_id"], mode=row["mode"], iteration=row["iteration"],
            reference=row["reference"], meta=json.loads(row["meta"]),
        )

    def instructions(self, ids: Sequence[str] | None = None) -> list[Instruction]:
        """All instructions in insertion order, or those with the given ids in the given order."""
        if ids is None:
            return [self._instruction(r) for r in self._query("SELECT * FROM instructions ORDER BY seq")]
        by_id: dict[str, Instruction] = {}
        for start in range(0, len(ids), 500):
            chunk = list(ids[start : start + 500])
            marks = ",".join("?" * len(chunk))
            for r in self._query(f"SELECT * FROM instructions WHERE id IN ({marks})", chunk):
                by_id[r["id"]] = self._instruction(r)
        return [by_id[i] for i in ids if i in by_id]

    def count_instructions(self) -> int:
        return self._query("SELECT COUNT(*) AS n FROM instructions")[0]["n"]

    def set_pool(self, iteration: int, pool: str, ids: Iterable[str]) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM pools WHERE iteration = ? AND pool = ?", (iteration, pool))
            db.executemany(
                "INSERT OR IGNORE INTO pools (iteration, pool, instruction_id) VALUES (?, ?, ?)",
                [(iteration, pool, i) for i in ids],
            )

    def pool(self, iteration: int, pool: str) -> list[str]:
        rows = self._query(
            "SELECT p.instruction_id FROM pools p JOIN instructions i ON i.id = p.instruction_id"
            " WHERE p.iteration = ? AND p.pool = ? ORDER BY i.seq",
            (iteration, pool),
        )
        return [r["instruction_id"] for r in rows]

    def pool_iterations(self) -> list[int]:
        return [r["iteration"] for r in self._query("SELECT DISTINCT iteration FROM pools ORDER BY iteration")]

    # ------------------------------------------------------------------ responses
    def add_response(self, r: Response) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO responses VALUES (?,?,?,?,?,?,?,?)",
                (r.instruction_id, r.role, r.model, r.iteration, r.text, r.finish_reason, r.prompt_tokens,
                 r.completion_tokens),
            )

    def responses(self, role: str, iteration: int, model: str | None = None) -> dict[str, Response]:
        sql = "SELECT * FROM responses WHERE role = ? AND iteration = ?"
        params: list[Any] = [role, iteration]
        if model is not None:
            sql += " AND model = ?"
            params.append(model)
        return {row["instruction_id"]: Response(**dict(row)) for row in self._query(sql, params)}

    def latest_responses(self, role: str) -> dict[str, str]:
        """Each instruction's most recent answer by `role`, across iterations."""
        rows = self._query(
            "SELECT instruction_id, text FROM responses WHERE role = ? ORDER BY iteration", (role,)
        )
        return {r["instruction_id"]: r["text"] for r in rows}

    # ------------------------------------------------------------------ judgements
    def add_judgement(self, j: Judgement) -> None:
        pairs = None
        if j.teacher_scores is not None and j.student_scores is not None:
            pairs = (
                json.dumps([j.teacher_scores[0], j.student_scores[0]]),
                json.dumps([j.teacher_scores[1], j.student_scores[1]]),
            )
        with self.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO judgements VALUES (?,?,?,?,?,?,?,?)",
                (j.instruction_id, j.iteration, j.raw_teacher_first, j.raw_student_first,
                 pairs[0] if pairs else None, pairs[1] if pairs else None, j.parse_failures, j.error),
            )

    def judgements(self, iteration: int) -> dict[str, Judgement]:
        out = {}
        for row in self._query("SELECT * FROM judgements WHERE iteration = ?", (iteration,)):
            tf = json.loads(row["teacher_first_scores"]) if row["teacher_first_scores"] else None
            sf = json.loads(row["student_first_scores"]) if row["student_first_scores"] else None
            out[row["instruction_id"]] = Judgement(
                instruction_id=row["instruction_id"], iteration=row["iteration"],
                raw_teacher_first=row["raw_teacher_first"], raw_student_first=row["raw_student_first"],
                teacher_scores=(tf[0], sf[0]) if tf and sf else None,
                student_scores=(tf[1], sf[1]) if tf and sf else None,
                parse_failures=row["parse_failures"], error=row["error"],
            )
        return out

    # ------------------------------------------------------------------ pseudo-targets
    def add_pseudo_targets(self, items: Iterable[PseudoTarget]) -> None:
        with self.transaction() as db:
            db.executemany(
                "INSERT OR REPLACE INTO pseudo_targets VALUES (?,?,?,?,?,?,?,?)",
                [(p.id, p.input_id, p.index, p.text, p.method, p.teacher, stable_json(p.params),
                  json.dumps(p.logprobs) if p.logprobs is not None else None) for p in items],
            )

    def pseudo_targets(self, input_id: str | None = None) -> list[PseudoTarget]:
        sql, params = "SELECT * FROM pseudo_targets", ()
        if input_id is not None:
            sql, params = sql + " WHERE input_id = ?", (input_id,)
        return [
            PseudoTarget(id=r["id"], input_id=r["input_id"], index=r["k"], text=r["text"], method=r["method"],
                         teacher=r["teacher"], params=json.loads(r["params"]),
                         logprobs=json.loads(r["logprobs"]) if r["logprobs"] else None)
            for r in self._query(sql + " ORDER BY input_id, k", params)
        ]

    # ------------------------------------------------------------------ stages and metrics
    def finish_stage(self, iteration: int, stage: str, detail: dict[str, Any] | None = None) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO stages VALUES (?,?,?,?)",
                (iteration, stage, time.time(), stable_json(detail or {})),
            )

    def stage_done(self, iteration: int, stage: str) -> bool:
        return bool(self._query("SELECT 1 FROM stages WHERE iteration = ? AND stage = ?", (iteration, stage)))

    def stages(self) -> list[dict[str, Any]]:
        rows = self._query("SELECT * FROM stages ORDER BY iteration, finished_at")
        return [{"iteration": r["iteration"], "stage": r["stage"], "finished_at": r["finished_at"],
                 "detail": json.loads(r["detail"])} for r in rows]

    def put_metrics(self, iteration: int, values: dict[str, Any]) -> None:
        with self.transaction() as db:
            db.executemany(
                "INSERT OR REPLACE INTO metrics VALUES (?,?,?)",
                [(iteration, k, json.dumps(v)) for k, v in values.items()],
            )

    def metrics(self) -> dict[int, dict[str, Any]]:
        out: dict[int, dict[str, Any]] = {}
        for r in self._query("SELECT * FROM metrics ORDER BY iteration, name"):
            out.setdefault(r["iteration"], {})[r["name"]] = json.loads(r["value"])
        return out

    # ------------------------------------------------------------------ the LLM call cache and ledger
    def get_call(self, key: str) -> dict[str, Any] | None:
        rows = self._query("SELECT result FROM calls WHERE key = ?", (key,))
        return json.loads(rows[0]["result"]) if rows else None

    def get_calls(self, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for start in range(0, len(keys), 500):
            chunk = list(keys[start : start + 500])
            marks = ",".join("?" * len(chunk))
            for r in self._query(f"SELECT key, result FROM calls WHERE key IN ({marks})", chunk):
                out[r["key"]] = json.loads(r["result"])
        return out

    def put_call(self, key: str, *, backend: str, model: str, request: dict[str, Any], result: dict[str, Any],
                 prompt_tokens: int, completion_tokens: int, role: str | None = None,
                 iteration: int | None = None) -> None:
        """Record a call that was actually sent. The first use owns the ledger entry; a cached reuse costs nothing."""
        with self.transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO calls VALUES (?,?,?,?,?,?,?,?,?,?)",
                (key, backend, model, role, iteration, stable_json(request), stable_json(result),
                 prompt_tokens, completion_tokens, time.time()),
            )

    def put_failure(self, key: str, *, backend: str, model: str, error: str, role: str | None = None,
                    iteration: int | None = None) -> None:
        with self.transaction() as db:
            db.execute("INSERT INTO failures VALUES (?,?,?,?,?,?,?)",
                       (key, backend, model, role, iteration, error, time.time()))

    def usage(self) -> list[dict[str, Any]]:
        """Calls and tokens per role, model and iteration (only calls that were really sent)."""
        rows = self._query(
            "SELECT role, model, iteration, COUNT(*) AS calls, SUM(prompt_tokens) AS prompt_tokens,"
            " SUM(completion_tokens) AS completion_tokens FROM calls"
            " GROUP BY role, model, iteration ORDER BY iteration, role, model"
        )
        fails = {
            (r["role"], r["model"], r["iteration"]): r["n"]
            for r in self._query("SELECT role, model, iteration, COUNT(*) AS n FROM failures"
                                 " GROUP BY role, model, iteration")
        }
        out = [dict(r) | {"failures": fails.pop((r["role"], r["model"], r["iteration"]), 0)} for r in rows]
        out += [{"role": k[0], "model": k[1], "iteration": k[2], "calls": 0, "prompt_tokens": 0,
                 "completion_tokens": 0, "failures": n} for k, n in fails.items()]
        return out

    # ------------------------------------------------------------------ config changes a user allowed
    def add_config_changes(self, changes: Iterable[tuple[str, str, str]], *, after: str) -> None:
        """(dotted key, old JSON, new JSON) applied from now on; `after` says where the run stood."""
        now = time.time()
        with self.transaction() as db:
            db.executemany("INSERT INTO config_changes VALUES (?,?,?,?,?)",
                           [(now, key, old, new, after) for key, old, new in changes])

    def config_changes(self) -> list[dict[str, Any]]:
        rows = self._query("SELECT * FROM config_changes ORDER BY changed_at, rowid")
        return [{"changed_at": r["changed_at"], "key": r["key"], "old": json.loads(r["old"]),
                 "new": json.loads(r["new"]), "after": r["after"]} for r in rows]

    def response_roles(self) -> list[str]:
        """Roles with at least one stored answer."""
        return [r["role"] for r in self._query("SELECT DISTINCT role FROM responses ORDER BY role")]

    def integrity_ok(self) -> bool:
        return self._query("PRAGMA integrity_check")[0][0] == "ok"


def _connect_readonly(path: Path) -> sqlite3.Connection:
    """A connection that never writes. Reading a WAL-mode file needs its `-shm` index, which SQLite makes
    beside the file; where it cannot (a read-only mount without one), the file is read as immutable: a
    run closed cleanly has everything in the file itself."""
    uri = f"file:{quote(str(path.absolute()))}"
    db = sqlite3.connect(f"{uri}?mode=ro", uri=True, check_same_thread=False, isolation_level=None, timeout=30)
    try:
        db.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
        return db
    except sqlite3.OperationalError:
        db.close()
    return sqlite3.connect(f"{uri}?immutable=1", uri=True, check_same_thread=False, isolation_level=None,
                           timeout=30)


def _is_store(path: Path) -> bool:
    """A SQLite file with lionkd's meta table, checked read-only so that nothing is written into another file."""
    try:
        db = _connect_readonly(path)
        try:
            rows = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall()
        finally:
            db.close()
    except sqlite3.Error:  # not a database, or one without our meta table
        return False
    return bool(rows)

"""The sweep database: one SQLite file (``sweep.sqlite``) in the output folder.

It holds everything a report needs, so ``polycom report DIR`` re-renders from it alone:

- ``sweep``: key/value rows: the compare config (JSON), creation time, versions, commit.
- ``runs``: one row per (activation, seed): status (pending / running / finished /
  stopped / diverged / failed / interrupted), run folder, resolved run config, parameter counts,
  the training summary, the post-training measurements, stop reason, error, timestamps.
- ``metrics``: every record of the run's ``metrics.jsonl`` (train / eval / coeffs / event),
  ingested after the run (and re-ingested on resumption, last record per step wins).
- ``latency``: inference latency per run, by measuring session; one session measures
  all runs interleaved, so the latest session's figures are comparable with each other.

SQLite commits are atomic and durable, so a sweep killed at any moment leaves the
database as it was after its last commit.
"""

from __future__ import annotations

import json
import math
import sqlite3
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

DB_NAME = "sweep.sqlite"

SCHEMA = """
CREATE TABLE IF NOT EXISTS sweep (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    activation        TEXT NOT NULL,
    seed              INTEGER NOT NULL,
    status            TEXT NOT NULL DEFAULT 'pending',
    out_dir           TEXT NOT NULL,
    config_json       TEXT,
    params_json       TEXT,
    meta_json         TEXT,
    summary_json      TEXT,
    measurements_json TEXT,
    stop_reason       TEXT,
    error             TEXT,
    attempts          INTEGER NOT NULL DEFAULT 0,
    created_at        TEXT NOT NULL,
    started_at        TEXT,
    finished_at       TEXT,
    measured_at       TEXT,
    updated_at        TEXT NOT NULL,
    UNIQUE (activation, seed)
);
CREATE TABLE IF NOT EXISTS metrics (
    run_id      INTEGER NOT NULL REFERENCES runs(id),
    kind        TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    step        INTEGER,
    tokens      REAL,
    wall_time_s REAL,
    record_json TEXT NOT NULL,
    PRIMARY KEY (run_id, seq)
);
CREATE INDEX IF NOT EXISTS metrics_by_kind ON metrics (run_id, kind, step);
CREATE TABLE IF NOT EXISTS latency (
    session     INTEGER NOT NULL,
    run_id      INTEGER NOT NULL REFERENCES runs(id),
    result_json TEXT NOT NULL,
    measured_at TEXT NOT NULL,
    PRIMARY KEY (session, run_id)
);
"""

# Outcomes that a re-run keeps (a crash, "failed", is retried; "diverged" is a result).
DONE_STATUSES = ("finished", "stopped", "diverged")


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=_json_default, allow_nan=False)


def _json_default(obj):
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def sanitize(obj: Any) -> Any:
    """Replace non-finite floats by None (JSON has no NaN/inf) recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: sanitize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [sanitize(v) for v in obj]
    return obj


class SweepDB:
    """Thin wrapper around the sweep's SQLite file."""

    def __init__(self, path: Path, create: bool = True):
        path = Path(path)
        if not create and not path.is_file():
            from ..errors import UserError

            raise UserError(f"no sweep database at {path}; run `polycom compare ... --out {path.parent}` first")
        self.path = path
        self.conn = sqlite3.connect(str(path), timeout=30.0)
        self.conn.row_factory = sqlite3.Row
        if create:
            with self.conn:
                self.conn.executescript(SCHEMA)
        else:
            try:
                self.conn.execute("SELECT 1 FROM runs LIMIT 1")
            except sqlite3.DatabaseError as exc:
                from ..errors import UserError

                raise UserError(f"{path} is not a polycom sweep database ({exc})") from None

    def close(self) -> None:
        self.conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ sweep key/values
    def get(self, key: str, default: Any = None) -> Any:
        row = self.conn.execute("SELECT value FROM sweep WHERE key = ?", (key,)).fetchone()
        return json.loads(row["value"]) if row else default

    def put(self, key: str, value: Any) -> None:
        with self.conn:
            self.conn.execute("INSERT OR REPLACE INTO sweep (key, value) VALUES (?, ?)", (key, _dumps(sanitize(value))))

    # ------------------------------------------------------------------ runs
    def ensure_run(self, activation: str, seed: int, out_dir: str) -> Dict[str, Any]:
        now = utc_now()
        with self.conn:
            self.conn.execute(
                "INSERT OR IGNORE INTO runs (activation, seed, status, out_dir, created_at, updated_at) VALUES (?, ?, 'pending', ?, ?, ?)",
                (activation, int(seed), out_dir, now, now),
            )
        return self.run(activation, seed)

    def run(self, activation: str, seed: int) -> Optional[Dict[str, Any]]:
        row = self.conn.execute("SELECT * FROM runs WHERE activation = ? AND seed = ?", (activation, int(seed))).fetchone()
        return self._decode(row) if row else None

    def run_by_id(self, run_id: int) -> Optional[Dict[str, Any]]:
        row = self.conn.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        return self._decode(row) if row else None

    def runs(self) -> List[Dict[str, Any]]:
        return [self._decode(r) for r in self.conn.execute("SELECT * FROM runs ORDER BY id")]

    def update_run(self, run_id: int, **fields: Any) -> None:
        if not fields:
            return
        cols, values = [], []
        for key, value in fields.items():
            if key.endswith("_json") and value is not None and not isinstance(value, str):
                value = _dumps(sanitize(value))
            cols.append(f"{key} = ?")
            values.append(value)
        cols.append("updated_at = ?")
        values.append(utc_now())
        with self.conn:
            self.conn.execute(f"UPDATE runs SET {', '.join(cols)} WHERE id = ?", (*values, run_id))

    @staticmethod
    def _decode(row: sqlite3.Row) -> Dict[str, Any]:
        d = dict(row)
        for key in list(d):
            if key.endswith("_json"):
                d[key[: -len("_json")]] = json.loads(d[key]) if d[key] else None
        return d

    # ------------------------------------------------------------------ metrics
    def ingest_metrics(self, run_id: int, metrics_path: Path) -> int:
        """Replace the run's metrics by the records of ``metrics.jsonl``.

        After a resumption the file may repeat steps (the run rolled back to its
        checkpoint); for train/eval/coeffs records the last one per step wins. Events are
        kept in order (exact duplicates dropped). A torn last line (a run killed while
        writing) is skipped.
        """
        records = list(read_jsonl(metrics_path))
        keyed: Dict[tuple, Dict[str, Any]] = {}
        events: List[Dict[str, Any]] = []
        seen_events = set()
        for rec in records:
            kind = rec.get("kind")
            if kind in ("train", "eval", "coeffs"):
                keyed[(kind, rec.get("step"))] = rec
            else:
                key = _dumps(sanitize(rec))
                if key not in seen_events:
                    seen_events.add(key)
                    events.append(rec)
        ordered = sorted(keyed.values(), key=lambda r: (r.get("step") or 0, r.get("kind"))) + events
        with self.conn:
            self.conn.execute("DELETE FROM metrics WHERE run_id = ?", (run_id,))
            self.conn.executemany(
                "INSERT INTO metrics (run_id, kind, seq, step, tokens, wall_time_s, record_json) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (run_id, str(r.get("kind")), i, r.get("step"), _num(r.get("tokens")), _num(r.get("wall_time_s")), _dumps(sanitize(r)))
                    for i, r in enumerate(ordered)
                ],
            )
        return len(ordered)

    # ------------------------------------------------------------------ latency sessions
    def latest_latency(self) -> Dict[int, Dict[str, Any]]:
        """run id -> latency of the most recent session (empty if none)."""
        row = self.conn.execute("SELECT MAX(session) AS s FROM latency").fetchone()
        if row is None or row["s"] is None:
            return {}
        rows = self.conn.execute("SELECT run_id, result_json FROM latency WHERE session = ?", (row["s"],))
        return {r["run_id"]: json.loads(r["result_json"]) for r in rows}

    def add_latency_session(self, results: Dict[int, Dict[str, Any]]) -> int:
        row = self.conn.execute("SELECT COALESCE(MAX(session), 0) + 1 AS s FROM latency").fetchone()
        session, now = int(row["s"]), utc_now()
        with self.conn:
            self.conn.executemany("INSERT INTO latency (session, run_id, result_json, measured_at) VALUES (?, ?, ?, ?)",
                                  [(session, run_id, _dumps(sanitize(r)), now) for run_id, r in results.items()])
        return session

    def metrics(self, run_id: int, kind: Optional[str] = None) -> List[Dict[str, Any]]:
        if kind is None:
            rows = self.conn.execute("SELECT record_json FROM metrics WHERE run_id = ? ORDER BY seq", (run_id,))
        else:
            rows = self.conn.execute("SELECT record_json FROM metrics WHERE run_id = ? AND kind = ? ORDER BY seq", (run_id, kind))
        return [json.loads(r["record_json"]) for r in rows]

    def eval_curve(self, run_id: int) -> tuple:
        """(tokens, val_loss) of the run's evaluations, in token order."""
        recs = [r for r in self.metrics(run_id, "eval") if r.get("val_loss") is not None and r.get("tokens") is not None]
        recs.sort(key=lambda r: r["tokens"])
        return [float(r["tokens"]) for r in recs], [float(r["val_loss"]) for r in recs]


def _num(x):
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def read_jsonl(path: Path) -> Iterable[Dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return
    with path.open("r", encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line from a killed writer
            if isinstance(rec, dict):
                yield rec


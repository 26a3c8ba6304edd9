"""The votes of a study in SQLite: one transaction per vote, WAL journal with full syncs, so a server killed at
any moment keeps every vote it acknowledged; a vote sent twice (a retry after a lost reply) is stored once.

Tables: ``raters`` (id, token, name, created), ``assignments`` (a rater's sequence: image, left and right
method, kind ``main`` / ``repeat`` / ``gold``, the assignment a repeat repeats), ``votes`` (one per
assignment: ``left`` / ``right`` / ``tie``, response time).
"""

from __future__ import annotations

import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

__all__ = ["VoteStore", "Assignment", "Vote", "ANSWERS"]

ANSWERS = ("left", "right", "tie")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS raters (
  id INTEGER PRIMARY KEY, token TEXT UNIQUE NOT NULL, name TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS assignments (
  id INTEGER PRIMARY KEY, rater INTEGER NOT NULL REFERENCES raters(id), seq INTEGER NOT NULL,
  image TEXT NOT NULL, left TEXT NOT NULL, right TEXT NOT NULL, kind TEXT NOT NULL, repeats INTEGER,
  UNIQUE (rater, seq));
CREATE TABLE IF NOT EXISTS votes (
  assignment INTEGER PRIMARY KEY REFERENCES assignments(id), answer TEXT NOT NULL, ms INTEGER,
  created REAL NOT NULL);
"""


@dataclass(frozen=True)
class Assignment:
    id: int
    rater: int
    seq: int
    image: str
    left: str
    right: str
    kind: str
    repeats: Optional[int] = None


@dataclass(frozen=True)
class Vote:
    """A vote with what it compared."""

    rater: int
    rater_name: str
    assignment: int
    image: str
    left: str
    right: str
    kind: str
    repeats: Optional[int]
    answer: str
    ms: Optional[int]


class VoteStore:
    """The study's SQLite file. Thread-safe (one connection per thread)."""

    def __init__(self, path):
        self.path = Path(path)
        self._local = threading.local()
        self._conn().executescript(_SCHEMA)  # idempotent (IF NOT EXISTS); executescript commits by itself

    def _conn(self) -> sqlite3.Connection:
        c = getattr(self._local, "conn", None)
        if c is None:
            c = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=True)
            c.execute("PRAGMA journal_mode=WAL")
            c.execute("PRAGMA synchronous=FULL")
            c.execute("PRAGMA foreign_keys=ON")
            self._local.conn = c
        return c

    class _Tx:
        def __init__(self, conn):
            self.c = conn

        def __enter__(self):
            self.c.execute("BEGIN IMMEDIATE")
            return self.c

        def __exit__(self, exc_type, exc, tb):
            self.c.execute("ROLLBACK" if exc_type else "COMMIT")
            return False

    def _tx(self):
        return self._Tx(self._conn())

    def close(self) -> None:
        c = getattr(self._local, "conn", None)
        if c is not None:
            c.close()
            self._local.conn = None

    # -- raters -----------------------------------------------------------------------------------------------
    def add_rater(self, name: str, plan) -> tuple[int, str]:
        """A new rater with its sequence; ``plan(rater_number, counts) -> [(image, left, right, kind,
        repeats_seq)]`` is called inside the transaction (``counts``: how often each main item was assigned so
        far, for balancing). Returns ``(rater id, token)``."""
        token = secrets.token_urlsafe(18)
        with self._tx() as c:
            cur = c.execute("INSERT INTO raters (token, name, created) VALUES (?, ?, ?)", (token, name, time.time()))
            rid = cur.lastrowid
            counts: dict = {}
            for image, left, right in c.execute(
                    "SELECT image, left, right FROM assignments WHERE kind = 'main'"):
                key = (image, *sorted((left, right)))
                counts[key] = counts.get(key, 0) + 1
            seq_ids: dict = {}
            for seq, (image, left, right, kind, rep) in enumerate(plan(rid, counts)):
                cur = c.execute("INSERT INTO assignments (rater, seq, image, left, right, kind, repeats) "
                                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                                (rid, seq, image, left, right, kind, seq_ids.get(rep) if rep is not None else None))
                seq_ids[seq] = cur.lastrowid
        return rid, token

    def rater(self, token: str) -> Optional[tuple[int, str]]:
        row = self._conn().execute("SELECT id, name FROM raters WHERE token = ?", (token,)).fetchone()
        return None if row is None else (int(row[0]), row[1])

    def raters(self) -> list[tuple[int, str]]:
        return [(int(r[0]), r[1]) for r in self._conn().execute("SELECT id, name FROM raters ORDER BY id")]

    # -- assignments and votes --------------------------------------------------------------------------------
    def next_assignment(self, rater: int) -> Optional[Assignment]:
        row = self._conn().execute(
            "SELECT a.id, a.rater, a.seq, a.image, a.left, a.right, a.kind, a.repeats FROM assignments a "
            "LEFT JOIN votes v ON v.assignment = a.id WHERE a.rater = ? AND v.assignment IS NULL "
            "ORDER BY a.seq LIMIT 1", (rater,)).fetchone()
        return None if row is None else Assignment(*row)

    def assignment(self, rater: int, aid: int) -> Optional[Assignment]:
        row = self._conn().execute(
            "SELECT id, rater, seq, image, left, right, kind, repeats FROM assignments WHERE id = ? AND rater = ?",
            (aid, rater)).fetchone()
        return None if row is None else Assignment(*row)

    def progress(self, rater: int) -> tuple[int, int]:
        """``(answered, total)`` of a rater."""
        c = self._conn()
        total = c.execute("SELECT COUNT(*) FROM assignments WHERE rater = ?", (rater,)).fetchone()[0]
        done = c.execute("SELECT COUNT(*) FROM votes v JOIN assignments a ON a.id = v.assignment "
                         "WHERE a.rater = ?", (rater,)).fetchone()[0]
        return int(done), int(total)

    def record_vote(self, rater: int, aid: int, answer: str, ms: Optional[int] = None) -> bool:
        """Store a vote in its own transaction. Returns ``False`` when this assignment was answered already
        (the first answer stands: a retried request is not a second vote).

        Raises:
            ValueError: unknown answer, or the assignment is not this rater's.
        """
        if answer not in ANSWERS:
            raise ValueError(f"answer must be one of {ANSWERS}, got {answer!r}")
        with self._tx() as c:
            row = c.execute("SELECT 1 FROM assignments WHERE id = ? AND rater = ?", (aid, rater)).fetchone()
            if row is None:
                raise ValueError("no such assignment for this rater")
            cur = c.execute("INSERT OR IGNORE INTO votes (assignment, answer, ms, created) VALUES (?, ?, ?, ?)",
                            (aid, answer, None if ms is None else int(ms), time.time()))
            return cur.rowcount == 1

    def votes(self) -> list[Vote]:
        rows = self._conn().execute(
            "SELECT a.rater, r.name, a.id, a.image, a.left, a.right, a.kind, a.repeats, v.answer, v.ms "
            "FROM votes v JOIN assignments a ON a.id = v.assignment JOIN raters r ON r.id = a.rater "
            "ORDER BY v.rowid").fetchall()
        return [Vote(*row) for row in rows]

    def count_votes(self) -> int:
        return int(self._conn().execute("SELECT COUNT(*) FROM votes").fetchone()[0])

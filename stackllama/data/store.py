"""An on-disk SQLite store that groups answers under their question.

Answers can come long after their question in a dump, so grouping in memory would grow
with the dump. Rows go into SQLite as they stream by (raw HTML, nothing converted yet);
afterwards `question_groups` reads back, in a fixed order, each question that has at least
two answers together with its answers. SQLite's page cache is capped, so memory stays
flat however large the dump.
"""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

_SCHEMA = """
CREATE TABLE questions (site INTEGER, id INTEGER, title TEXT, body TEXT, created TEXT,
                        owner_id INTEGER, owner_name TEXT, accepted_id INTEGER, tags TEXT,
                        PRIMARY KEY (site, id));
CREATE TABLE answers (site INTEGER, id INTEGER, parent_id INTEGER, score INTEGER, body TEXT,
                      owner_id INTEGER, owner_name TEXT, PRIMARY KEY (site, id));
CREATE TABLE users (site INTEGER, id INTEGER, name TEXT, PRIMARY KEY (site, id));
"""


@dataclass
class Answer:
    id: int
    score: int
    body: str
    owner_id: int | None
    owner_name: str


@dataclass
class QuestionGroup:
    """A question with all its answers, as read back from the store (HTML bodies)."""

    site: int
    id: int
    title: str
    body: str
    created: str
    owner_id: int | None
    accepted_id: int | None
    tags: str  # joined by "|"
    answers: list[Answer]


class PostStore:
    """Questions, answers and user names of one or more sites, on disk."""

    def __init__(self, path: Path, cache_mib: int = 4):
        self.path = Path(path)
        self.db = sqlite3.connect(self.path)
        self.db.executescript(
            f"PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; PRAGMA cache_size=-{cache_mib * 1024};"
            "PRAGMA temp_store=FILE;" + _SCHEMA
        )

    def _insert(self, table: str, rows: Sequence[tuple]) -> int:
        """Insert rows, ignoring duplicate ids; returns how many were duplicates."""
        if not rows:
            return 0
        marks = ",".join("?" * len(rows[0]))
        cur = self.db.executemany(f"INSERT OR IGNORE INTO {table} VALUES ({marks})", rows)
        return len(rows) - cur.rowcount

    def add_questions(self, rows: Sequence[tuple]) -> int:
        """(site, id, title, body, created, owner_id, owner_name, accepted_id, tags) rows; tags joined by |."""
        return self._insert("questions", rows)

    def add_answers(self, rows: Sequence[tuple]) -> int:
        """(site, id, parent_id, score, body, owner_id, owner_name) rows."""
        return self._insert("answers", rows)

    def add_users(self, rows: Sequence[tuple]) -> int:
        """(site, id, display_name) rows."""
        return self._insert("users", rows)

    def finish_loading(self) -> None:
        self.db.commit()
        self.db.execute("CREATE INDEX answers_by_parent ON answers (site, parent_id, id)")
        self.db.commit()

    def count(self, sql: str) -> int:
        return self.db.execute(sql).fetchone()[0]

    def count_orphan_answers(self) -> int:
        """Answers whose question is not in the dump (deleted, or a partial dump)."""
        return self.count(
            "SELECT count(*) FROM answers a LEFT JOIN questions q ON q.site = a.site AND q.id = a.parent_id "
            "WHERE q.id IS NULL"
        )

    def count_questions_by_answers(self) -> tuple[int, int]:
        """(questions with fewer than two answers, questions with at least two)."""
        row = self.db.execute(
            "SELECT sum(n < 2), sum(n >= 2) FROM (SELECT (SELECT count(*) FROM answers a "
            "WHERE a.site = q.site AND a.parent_id = q.id) AS n FROM questions q)"
        ).fetchone()
        return int(row[0] or 0), int(row[1] or 0)

    def question_groups(self) -> Iterator[QuestionGroup]:
        """Each question with >= 2 answers and its answers, ordered by (site, question id, answer id)."""
        cur = self.db.execute(
            """
            SELECT q.site, q.id, q.title, q.body, q.created, q.owner_id, q.accepted_id, q.tags,
                   a.id, a.score, a.body, a.owner_id, coalesce(u.name, a.owner_name, '')
            FROM questions q
            JOIN answers a ON a.site = q.site AND a.parent_id = q.id
            LEFT JOIN users u ON u.site = a.site AND u.id = a.owner_id
            WHERE (SELECT count(*) FROM answers c WHERE c.site = q.site AND c.parent_id = q.id) >= 2
            ORDER BY q.site, q.id, a.id
            """
        )
        for _, rows in itertools.groupby(cur, key=lambda r: (r[0], r[1])):
            rows = list(rows)
            q = rows[0]
            yield QuestionGroup(
                site=q[0], id=q[1], title=q[2], body=q[3], created=q[4], owner_id=q[5], accepted_id=q[6],
                tags=q[7],
                answers=[Answer(id=r[8], score=r[9], body=r[10], owner_id=r[11], owner_name=r[12]) for r in rows],
            )

    def close(self) -> None:
        self.db.close()

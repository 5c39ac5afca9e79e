"""Numbered schema migrations, one directory per SQL dialect.

Files are `NNNN_name.sql`; both dialects carry the same numbers so a schema version
means the same thing on SQLite and PostgreSQL. A released file is never edited: a
change is a new number. Each backend records applied versions in `schema_migrations`
and applies the pending ones in one transaction when it opens.
"""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass
from importlib import resources

DIALECTS = ("sqlite", "postgres")
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

# The version table itself is not a migration: the runner needs it before it can
# tell which migrations are pending. The SQL is valid in both dialects.
CREATE_VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    applied_at DOUBLE PRECISION NOT NULL
)
"""


class SchemaTooNewError(RuntimeError):
    """The database was migrated by a newer meshid; opening it could corrupt it."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def load_migrations(dialect: str) -> list[Migration]:
    """Read the migrations of one dialect in version order (blocking file I/O: call it
    from a thread when on the event loop)."""
    if dialect not in DIALECTS:
        raise ValueError(f"unknown SQL dialect {dialect!r}")
    found: list[Migration] = []
    for item in resources.files(__name__).joinpath(dialect).iterdir():
        match = _NAME.match(item.name)
        if match is None:
            continue
        found.append(Migration(int(match.group(1)), match.group(2), item.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    expected = list(range(1, len(found) + 1))
    if [m.version for m in found] != expected:
        # A gap or duplicate means a botched merge; refuse rather than skip a step.
        raise RuntimeError(f"{dialect} migrations are not numbered 1..n: {[m.version for m in found]}")
    return found


def pending(migrations: list[Migration], applied: set[int]) -> list[Migration]:
    """Migrations not yet applied; SchemaTooNewError if the database is ahead of us."""
    known = {m.version for m in migrations}
    unknown = sorted(applied - known)
    if unknown:
        raise SchemaTooNewError(
            f"database has schema version(s) {unknown} that this meshid does not know; "
            "upgrade meshid or restore a matching backup"
        )
    return [m for m in migrations if m.version not in applied]


def split_statements(sql: str) -> list[str]:
    """Split a SQLite script into statements (trigger bodies included) so they can run
    one by one inside our transaction: sqlite3's executescript would COMMIT first."""
    statements: list[str] = []
    buffer = ""
    for line in sql.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            statements.append(buffer.strip())
            buffer = ""
    leftover = "\n".join(ln for ln in buffer.splitlines() if ln.strip() and not ln.strip().startswith("--"))
    if leftover:
        raise RuntimeError(f"migration ends with an incomplete statement: {leftover[:80]!r}")
    return statements

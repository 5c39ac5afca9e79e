"""Pick the datastore from one configuration string.

- `postgresql://...` or `postgres://...` (a libpq URI, as asyncpg takes it): PostgreSQL.
- `sqlite:///var/lib/meshid/datastore.db`: SQLite at an absolute path (the URL's path,
  as in `file:` URLs; unlike SQLAlchemy, no fourth slash is needed), `sqlite:rel/x.db`
  for a relative one, `sqlite::memory:` for a throw-away in-memory database.
- anything else is a filesystem path to an SQLite database.
"""

from __future__ import annotations

import os

from issuer.datastore.base import DataStore
from issuer.datastore.postgres import PostgresDataStore
from issuer.datastore.sqlite import SqliteDataStore
from meshid.errors import ConfigError

_PG_SCHEMES = ("postgresql://", "postgres://")


def datastore_for(dsn_or_path: str | os.PathLike[str]) -> DataStore:
    """Build the datastore a DSN or path names, without connecting (config validation)."""
    text = os.fspath(dsn_or_path)
    if not text:
        raise ConfigError("datastore: empty DSN or path")
    if text.startswith(_PG_SCHEMES):
        return PostgresDataStore(text)
    if text.startswith("sqlite:"):
        path = text.removeprefix("sqlite:")
        if path.startswith("//"):
            host, _, rest = path[2:].partition("/")
            if host:
                raise ConfigError(f"datastore: {text!r} names a host; use sqlite:///absolute/path")
            path = "/" + rest
        if path in ("", "/"):
            raise ConfigError(f"datastore: {text!r} has no database path")
        return SqliteDataStore(path)
    if "://" in text:
        scheme = text.split("://", 1)[0]
        raise ConfigError(f"datastore: unsupported scheme {scheme!r} (use sqlite:// or postgresql://)")
    return SqliteDataStore(text)


async def open_datastore(dsn_or_path: str | os.PathLike[str]) -> DataStore:
    """Build the datastore, connect and apply pending migrations."""
    store = datastore_for(dsn_or_path)
    await store.open()
    return store

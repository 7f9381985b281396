"""The results table: finished, trustworthy entries in the database the workers share.

A search on a database storage also writes its entry to `autotune_results` in that database,
under the local cache's key (which includes the device fingerprint, so entries measured on other
machines stay separate keys). `autotune cache pull` merges the table into the local JSON cache and
`autotune cache push` the other way; the newest trustworthy entry per key wins. Dispatch still
reads the local file only: no database on the training hot path.
"""

from __future__ import annotations

import json

import sqlalchemy as sa

from autotune.cache import Cache, entry_key
from autotune.claims import create_tables, make_engine
from autotune.entry import Entry, EntryFormatError, newer
from autotune.errors import AutotuneError

_metadata = sa.MetaData()
results_table = sa.Table(
    "autotune_results", _metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("entry_json", sa.Text, nullable=False),
    sa.Column("created", sa.String(40), nullable=False),
)


class Results:
    """The results table of one database URL."""

    def __init__(self, url: str):
        self.url = url
        try:
            self.engine = make_engine(url)
            create_tables(self.engine, _metadata)
        except (sa.exc.SQLAlchemyError, ImportError) as exc:
            raise AutotuneError(f"cannot open the results table in {url!r}: {type(exc).__name__}: "
                                f"{str(exc).splitlines()[0] if str(exc) else ''}") from None

    def entries(self) -> dict[str, Entry]:
        """Every well-formed trustworthy entry, by key (malformed rows are skipped)."""
        found = {}
        with self.engine.connect() as conn:
            for key, text in conn.execute(sa.select(results_table.c.key, results_table.c.entry_json)):
                entry = _parse(text)
                if entry is not None and entry.trustworthy:
                    found[key] = entry
        return found

    def put(self, entries: list[Entry]) -> int:
        """Write the trustworthy entries that are newer than the table's; returns how many."""
        written = 0
        with self.engine.begin() as conn:  # SQLite: BEGIN IMMEDIATE, so read-then-write cannot race
            if self.engine.dialect.name == "postgresql":
                conn.execute(sa.text("LOCK TABLE autotune_results IN EXCLUSIVE MODE"))
            have = dict(conn.execute(sa.select(results_table.c.key, results_table.c.entry_json)).all())
            for entry in entries:
                if not entry.trustworthy:
                    continue
                key = entry_key(entry.problem, entry.device, entry.versions)
                old = _parse(have.get(key))
                if not newer(entry, old):
                    continue
                row = {"entry_json": json.dumps(entry.as_dict(), sort_keys=True), "created": entry.created}
                if key in have:
                    conn.execute(results_table.update().where(results_table.c.key == key).values(**row))
                else:
                    conn.execute(results_table.insert().values(key=key, **row))
                have[key] = row["entry_json"]
                written += 1
        return written


def _parse(text: str | None) -> Entry | None:
    if text is None:
        return None
    try:
        return Entry.from_dict(json.loads(text))
    except (ValueError, EntryFormatError):
        return None


_open: dict[str, Results] = {}


def for_url(url: str) -> Results:
    """This process's Results for `url` (one engine per database)."""
    if url not in _open:
        _open[url] = Results(url)
    return _open[url]


def pull(url: str, cache: Cache) -> tuple[int, int]:
    """Merge the table into the local cache: (entries taken, entries in the table)."""
    remote = for_url(url).entries()
    return cache.merge(remote.values()), len(remote)


def push(url: str, cache: Cache) -> tuple[int, int]:
    """Merge the local cache into the table: (entries written, entries in the local cache)."""
    local = [e for e in cache.entries().values() if e.trustworthy]
    return for_url(url).put(local), len(local)

"""Claims: which worker measures what, when many processes or machines share one Optuna storage.

Optuna's schema has no unique constraint on a config, so "measure it unless someone already
does" needs a table of our own, `autotune_claims`, in the same database (SQLAlchemy, which comes
with Optuna). A claim is a row keyed by (study, key): a config's key, `#confirm` (who re-times the
finalists) or `#problem` (who tunes a problem of `search model`). Every decision is one
transaction that serialises per study (PostgreSQL: an advisory lock on the study's name; SQLite:
BEGIN IMMEDIATE, the other writers wait), so two workers can never both win a claim or overspend
the shared budget. Live claims carry their worker's heartbeat (a thread beats every few seconds);
a claim whose heartbeat is older than AUTOTUNE_HEARTBEAT_TIMEOUT_S is released for another worker
to take. `--force` opens a new generation of a study (`<name>-g<N>`) instead of deleting one that
others may be running. Timestamps are the workers' clocks (seconds since the epoch): machines
sharing a database must keep their clocks within a small part of the timeout (NTP does).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid

import sqlalchemy as sa

from autotune.env_seconds import seconds_from_env
from autotune.errors import AutotuneError

HEARTBEAT_TIMEOUT_S = 60.0  # a live claim not beaten for this long belongs to a dead worker
HEARTBEAT_TIMEOUT_ENV = "AUTOTUNE_HEARTBEAT_TIMEOUT_S"  # overrides it (tests use a few seconds)
CONFIRM = "#confirm"  # the claim of the worker that re-times the finalists
PROBLEM = "#problem"  # the claim of the worker that tunes a problem of `search model`
# Claim states: live (a worker holds it), done, untrusted (a confirm the noise guard refused)
LIVE, DONE, UNTRUSTED = "live", "done", "untrusted"
# What claim() answers
MINE, BUSY, SPENT = "mine", "busy", "spent"
SQLITE_WAIT_S = 120.0  # how long an SQLite writer waits for the others' locks before failing
CREATE_ATTEMPTS = 8  # creating the tables races between workers on a new database: retry

_metadata = sa.MetaData()
claims_table = sa.Table(
    "autotune_claims", _metadata,
    sa.Column("study", sa.String(512), primary_key=True),
    sa.Column("key", sa.String(2048), primary_key=True),
    sa.Column("worker", sa.String(200), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("heartbeat", sa.Float, nullable=False),
)
generations_table = sa.Table(
    "autotune_generations", _metadata,
    sa.Column("study", sa.String(512), primary_key=True),
    sa.Column("generation", sa.Integer, nullable=False),
    sa.Column("started", sa.Float, nullable=False),
)


def heartbeat_timeout_s() -> float:
    """Seconds without a heartbeat after which a claim is released: $AUTOTUNE_HEARTBEAT_TIMEOUT_S, else 60."""
    return seconds_from_env(HEARTBEAT_TIMEOUT_ENV, HEARTBEAT_TIMEOUT_S)


def is_database_url(url: str | None) -> bool:
    """Whether an Optuna storage URL is a database (SQLAlchemy) rather than memory or a journal file."""
    return url is not None and url.startswith(("sqlite", "postgresql", "mysql"))


def generation_name(study: str, generation: int) -> str:
    """The Optuna study of one generation: the name itself for the first, `<name>-g<N>` after."""
    return study if generation == 0 else f"{study}-g{generation}"


def make_engine(url: str) -> sa.Engine:
    """An engine whose transactions serialise writers (see serialise_sqlite)."""
    if not url.startswith("sqlite"):
        return sa.create_engine(url, pool_pre_ping=True)
    return serialise_sqlite(sa.create_engine(url, connect_args={"timeout": SQLITE_WAIT_S}))


def serialise_sqlite(engine: sa.Engine) -> sa.Engine:
    """Every transaction on this SQLite engine is BEGIN IMMEDIATE and waits (the engine's
    connect timeout) for the other writers. pysqlite's own BEGIN is deferred: two transactions
    that read and then write can both take the read lock, and one then fails at once with
    "database is locked", whatever the timeout. Connections already pooled are dropped."""

    @sa.event.listens_for(engine, "connect")
    def _autocommit_driver(dbapi_connection, _record):
        dbapi_connection.isolation_level = None  # SQLAlchemy's BEGIN below is the only one

    @sa.event.listens_for(engine, "begin")
    def _begin_immediate(connection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()
    return engine


def creating_race(exc: BaseException) -> bool:
    """Whether `exc` is what a worker sees when another creates the same tables or rows at the
    same moment on a new database (CREATE TABLE IF NOT EXISTS and Optuna's alembic_version row
    both check, then write): worth a retry, unlike a wrong URL."""
    if isinstance(exc, sa.exc.IntegrityError):
        return True
    text = str(exc).lower()
    return isinstance(exc, sa.exc.SQLAlchemyError) and any(
        words in text for words in ("already exists", "duplicate key", "database is locked"))


def retry_creating(create):
    """create(), retried with a growing pause while it loses a creating race."""
    for attempt in range(CREATE_ATTEMPTS):
        try:
            return create()
        except sa.exc.SQLAlchemyError as exc:
            if attempt == CREATE_ATTEMPTS - 1 or not creating_race(exc):
                raise
            time.sleep(0.05 * 2**attempt)
    raise AssertionError("unreachable")


def create_tables(engine: sa.Engine, metadata: sa.MetaData) -> None:
    """CREATE TABLE IF NOT EXISTS, retried when another worker creates them at the same moment."""
    retry_creating(lambda: metadata.create_all(engine))


class Claims:
    """One worker's view of the claims in a database (one per process and storage URL)."""

    def __init__(self, url: str, *, worker: str | None = None, timeout_s: float | None = None):
        self.url = url
        self.worker = worker or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.timeout_s = timeout_s if timeout_s is not None else heartbeat_timeout_s()
        self.poll_s = min(1.0, self.timeout_s / 8)
        try:
            self.engine = make_engine(url)
            create_tables(self.engine, _metadata)
        except (sa.exc.SQLAlchemyError, ImportError, ValueError) as exc:  # the URL is the user's to fix
            raise AutotuneError(f"cannot open the Optuna storage {url!r}: {type(exc).__name__}: "
                                f"{str(exc).splitlines()[0] if str(exc) else ''}; give --storage a URL "
                                "such as sqlite:///results/studies.db") from None
        self.postgres = self.engine.dialect.name == "postgresql"

    # One serialised transaction per decision ---------------------------------------------------
    @contextlib.contextmanager
    def _locked(self, study: str):
        with self.engine.begin() as conn:
            if self.postgres:  # one writer per study at a time; released at commit
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtextextended(:s, 0))"), {"s": study})
            yield conn

    def _release_stale(self, conn, study: str) -> int:
        cutoff = time.time() - self.timeout_s
        c = claims_table.c
        return conn.execute(claims_table.delete().where(
            c.study == study, c.state == LIVE, c.heartbeat < cutoff)).rowcount

    # Generations ------------------------------------------------------------------------------
    def generation(self, study: str, fresh: bool) -> int:
        """The generation of `study` to work on. fresh (--force) starts a new one, unless the
        latest is still in progress (started less than a heartbeat timeout ago, or with a live
        claim, and not confirmed yet): then the workers started together with --force share it."""
        g = generations_table.c
        with self._locked(study) as conn:
            row = conn.execute(sa.select(g.generation, g.started).where(g.study == study)).first()
            now = time.time()
            if row is None:
                conn.execute(generations_table.insert().values(study=study, generation=0, started=now))
                return 0
            current, started = row
            if not fresh or self._in_progress(conn, generation_name(study, current), started, now):
                return current
            conn.execute(generations_table.update().where(g.study == study).values(
                generation=current + 1, started=now))
            return current + 1

    def _in_progress(self, conn, name: str, started: float, now: float) -> bool:
        self._release_stale(conn, name)
        c = claims_table.c
        confirmed = conn.execute(sa.select(c.state).where(c.study == name, c.key == CONFIRM)).scalar()
        if confirmed in (DONE, UNTRUSTED):
            return False
        live = conn.execute(sa.select(sa.func.count()).select_from(claims_table).where(
            c.study == name, c.state == LIVE)).scalar()
        return bool(live) or now - started < self.timeout_s

    # Claims -----------------------------------------------------------------------------------
    def claim(self, study: str, key: str, budget: int | None = None) -> str:
        """MINE when this worker now holds `key` (or held it already), BUSY when another live
        worker holds it or it is done, SPENT when `budget` configs of the study are done or held
        or a worker is already confirming (a config claim is one with a budget)."""
        c = claims_table.c
        with self._locked(study) as conn:
            self._release_stale(conn, study)
            row = conn.execute(sa.select(c.worker, c.state).where(c.study == study, c.key == key)).first()
            if row is not None:
                return MINE if (row.worker, row.state) == (self.worker, LIVE) else BUSY
            if budget is not None and (self._spent(conn, study) >= budget or conn.execute(
                    sa.select(c.state).where(c.study == study, c.key == CONFIRM)).first() is not None):
                return SPENT  # (a worker that stopped early confirms: nothing more is measured)
            conn.execute(claims_table.insert().values(study=study, key=key, worker=self.worker, state=LIVE,
                                                      heartbeat=time.time()))
            return MINE

    def _spent(self, conn, study: str) -> int:
        c = claims_table.c
        return conn.execute(sa.select(sa.func.count()).select_from(claims_table).where(
            c.study == study, ~c.key.startswith("#"))).scalar()

    def finish(self, study: str, key: str, state: str = DONE) -> None:
        """Mark this worker's claim done (or untrusted, for a confirm)."""
        c = claims_table.c
        with self._locked(study) as conn:
            conn.execute(claims_table.update().where(c.study == study, c.key == key).values(
                state=state, worker=self.worker, heartbeat=time.time()))

    def state(self, study: str, key: str) -> str | None:
        c = claims_table.c
        with self._locked(study) as conn:
            self._release_stale(conn, study)
            return conn.execute(sa.select(c.state).where(c.study == study, c.key == key)).scalar()

    def adopt(self, study: str, keys) -> None:
        """Configs already measured in the study (a study from before claims, or a worker killed
        between recording a trial and marking its claim done) count as done claims."""
        c = claims_table.c
        with self._locked(study) as conn:
            have = dict(conn.execute(sa.select(c.key, c.state).where(c.study == study)).all())
            fresh = [k for k in keys if have.get(k) != DONE]
            if fresh:
                conn.execute(claims_table.delete().where(c.study == study, c.key.in_(fresh)))
                conn.execute(claims_table.insert(), [dict(study=study, key=k, worker=self.worker, state=DONE,
                                                          heartbeat=time.time()) for k in fresh])

    def reopen(self, study: str, budget: int) -> None:
        """A finished study is searched again (the confirm claim released) when its confirm was
        refused by the noise guard or its budget was not spent (stopped early, a bigger --trials)."""
        c = claims_table.c
        with self._locked(study) as conn:
            confirm = conn.execute(sa.select(c.state).where(c.study == study, c.key == CONFIRM)).scalar()
            if confirm == UNTRUSTED or (confirm == DONE and self._spent(conn, study) < budget):
                conn.execute(claims_table.delete().where(c.study == study, c.key == CONFIRM))

    def next_step(self, study: str, budget: int, can_measure: bool) -> str:
        """After a worker's own search: "done" (the finalists were re-timed: read the result),
        "wait" (others still measure or confirm), "more" (dead workers' claims were released and
        the budget is not spent: measure again) or "confirm" (this worker now holds the confirm)."""
        c = claims_table.c
        with self._locked(study) as conn:
            self._release_stale(conn, study)
            confirm = conn.execute(sa.select(c.state).where(c.study == study, c.key == CONFIRM)).scalar()
            if confirm in (DONE, UNTRUSTED):
                return "done"
            if confirm == LIVE:
                return "wait"
            measuring = conn.execute(sa.select(sa.func.count()).select_from(claims_table).where(
                c.study == study, c.state == LIVE, ~c.key.startswith("#"))).scalar()
            if measuring:
                return "wait"
            if can_measure and self._spent(conn, study) < budget:
                return "more"
            conn.execute(claims_table.insert().values(study=study, key=CONFIRM, worker=self.worker, state=LIVE,
                                                      heartbeat=time.time()))
            return "confirm"

    # Heartbeats -------------------------------------------------------------------------------
    def beat(self) -> None:
        with self.engine.begin() as conn:
            conn.execute(claims_table.update().where(
                claims_table.c.worker == self.worker, claims_table.c.state == LIVE).values(heartbeat=time.time()))

    @contextlib.contextmanager
    def beating(self):
        """Beat for every live claim of this worker from a thread, while a candidate runs too."""
        stop = threading.Event()

        def run():
            while not stop.wait(self.timeout_s / 4):
                with contextlib.suppress(sa.exc.SQLAlchemyError):  # a missed beat is retried next turn
                    self.beat()

        thread = threading.Thread(target=run, name="autotune-heartbeat", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()

    def close(self) -> None:
        self.engine.dispose()


_open: dict[str, Claims] = {}


def for_storage(storage: str | None) -> Claims | None:
    """This process's Claims on a database storage URL (one engine and worker id per URL), None
    for an in-memory study, which no other worker can see."""
    if not storage:
        return None
    if storage not in _open:
        _open[storage] = Claims(storage)
    return _open[storage]


__all__ = ["Claims", "for_storage", "generation_name", "heartbeat_timeout_s", "CONFIRM", "PROBLEM", "MINE", "BUSY", "SPENT"]

"""The engine and the session scope: one engine per process and URL, SQLite tuned for WAL."""

from __future__ import annotations

import json
import logging
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
from sqlalchemy import URL, Connection, Engine, create_engine, event, make_url
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from mailer.config import settings
from mailer.errors import DatabaseUnavailable

log = logging.getLogger(__name__)
T = TypeVar("T")

_engines: dict[str, Engine] = {}


@dataclass
class _Pool:
    # connections each process keeps open; a threaded worker raises it to its thread count
    size: int = 5
    # a round trip before each checkout, so that a dead connection is replaced, not used
    pre_ping: bool = True


_pool = _Pool()
# what this process does, which sets its statement_timeout (MAILER_STATEMENT_TIMEOUTS): a web
# backend that imports mailer is a producer; the commands say what they are (set_role)
_role = "producer"
# a statement whose client has gone (killed mid-statement) is stopped by the server after this
# (PostgreSQL 14+), instead of running on and holding its locks
CONNECTION_CHECK_MS = 5000
_sessions: dict[str, sessionmaker[Session]] = {}
_READ_ONLY = "mailer_read_only"


def engine(url: str | None = None) -> Engine:
    url = url or settings().database_url
    if url not in _engines:
        _engines[url] = _create(url)
    return _engines[url]


def _create(url: str) -> Engine:
    if url.startswith("sqlite"):
        eng = create_engine(url, connect_args={"timeout": 60}, json_deserializer=_json_loads)
        event.listen(eng, "connect", _sqlite_pragmas)
        event.listen(eng, "begin", _sqlite_begin)
        return eng
    size = _pool.size
    eng = create_engine(
        _with_limits(url),
        pool_pre_ping=_pool.pre_ping,
        pool_size=size,
        max_overflow=size,
        json_deserializer=_json_loads,
    )
    event.listen(eng, "checkout", _checked_out)
    event.listen(eng, "checkin", _checked_in)
    return eng


def _with_limits(url: str) -> URL:
    """The URL with this role's statement_timeout and the connection check as startup
    options, added to any the URL has (a search_path, say): no round trip per connection."""
    parsed = make_url(url)
    timeout_ms = round(settings().statement_timeout(_role) * 1000)
    limits = (
        f"-c statement_timeout={timeout_ms}"
        f" -c client_connection_check_interval={CONNECTION_CHECK_MS}"
    )
    options = parsed.query.get("options")
    if isinstance(options, tuple):
        options = " ".join(options)
    return parsed.update_query_dict({"options": f"{options} {limits}" if options else limits})


def set_role(role: str) -> None:
    """What this process does from now on (worker, dispatcher, producer, cli): engines
    made from now on take that role's statement_timeout."""
    global _role
    if role != _role:
        _role = role
        reset()


# the connections this process has in use, which `cancel_all` interrupts
_in_use: weakref.WeakSet[Any] = weakref.WeakSet()


def _checked_out(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
    _in_use.add(dbapi_connection)


def _checked_in(dbapi_connection: Any, _record: Any) -> None:
    if dbapi_connection is not None:  # None: the connection was invalidated, and is gone
        _in_use.discard(dbapi_connection)


def cancel_all() -> int:
    """Ask the server to cancel the statement each of this process's PostgreSQL connections
    is running (a signal handler's way out of a long statement: the statement fails with
    QueryCanceled, its transaction rolls back and its locks go). Returns how many were
    asked."""
    asked = 0
    for connection in list(_in_use):
        try:
            connection.cancel()
            asked += 1
        except Exception as exc:  # a closed or broken connection has nothing to cancel
            log.debug("could not cancel a statement: %s", exc)
    return asked


def _json_loads(document: str | bytes) -> Any:
    """JSON columns (every delivery's context, as it is claimed) read by orjson, several times
    faster than the json module, which reads what orjson reads otherwise, or not at all:
    a run of 19 digits anywhere (an integer over 64 bits, which orjson makes a float; or a
    string that merely looks like one), and what orjson refuses (a lone surrogate, which
    SQLite keeps as an escape)."""
    raw = document if isinstance(document, bytes) else document.encode()
    if _LONG_NUMBER in raw.translate(_DIGITS):  # a C-level scan, cheaper than a regex
        return json.loads(document)
    try:
        return orjson.loads(document)
    except orjson.JSONDecodeError:
        return json.loads(document)


# every digit made "0" and every other byte " ": a run of 19 digits is then a run of 19 "0"
_DIGITS = bytes(0x30 if 0x30 <= byte <= 0x39 else 0x20 for byte in range(256))
_LONG_NUMBER = b"0" * 19


def set_pool(*, size: int | None = None, pre_ping: bool | None = None) -> None:
    """For engines created from now on: how many connections each keeps (and may double), and
    whether a connection is pinged before each use."""
    if size is not None:
        _pool.size = max(1, size)
    if pre_ping is not None:
        _pool.pre_ping = pre_ping


def _sqlite_begin(conn: Connection) -> None:
    # SQLAlchemy, not pysqlite, issues BEGIN: IMMEDIATE takes the write lock up front, so two
    # writers queue on busy_timeout instead of failing on a lock upgrade; a reading session
    # (read_scope) takes no lock, and reads beside a writer (WAL)
    reading = conn.get_execution_options().get(_READ_ONLY, False)
    conn.exec_driver_sql("BEGIN" if reading else "BEGIN IMMEDIATE")


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=60000")
    cursor.close()


@contextmanager
def session_scope(url: str | None = None) -> Iterator[Session]:
    """A session that commits on success and rolls back on any error."""
    url = url or settings().database_url
    if url not in _sessions:
        _sessions[url] = sessionmaker(engine(url), expire_on_commit=False)
    session = _sessions[url]()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


@contextmanager
def read_scope(url: str | None = None) -> Iterator[Session]:
    """A session for reads only, beside a writing one: on SQLite it takes no write lock."""
    with session_scope(url) as session:
        session.connection(execution_options={_READ_ONLY: True})
        yield session


def reset(*, after_fork: bool = False) -> None:
    """Drop every engine (when settings change, or in a child after a fork, where the
    parent's connections must be left alone rather than closed)."""
    for eng in _engines.values():
        eng.dispose(close=not after_fork)
    _engines.clear()
    _sessions.clear()


def dialect_insert(session: Session) -> Any:
    """The INSERT construct with ON CONFLICT support for the session's database."""
    return postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert


def retrying(work: Callable[[Session], T], *, what: str, budget: float = 60.0) -> T:
    """Run `work` in its own transaction, retrying while the database is unreachable or
    locked, for up to `budget` seconds; then DatabaseUnavailable."""
    deadline = time.monotonic() + budget
    pause = 0.2
    while True:
        try:
            with session_scope() as session:
                return work(session)
        except (OperationalError, InterfaceError) as exc:
            if time.monotonic() + pause > deadline:
                raise DatabaseUnavailable(f"database unavailable while {what}: {exc.orig}") from exc
            log.warning(
                "database unavailable while %s (%s); retrying in %.1f s",
                what,
                str(exc.orig).strip(),
                pause,
            )
            time.sleep(pause)
            pause = min(pause * 2, 5.0)

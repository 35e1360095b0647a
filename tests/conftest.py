"""Test set-up: real PostgreSQL and Redis when reachable (required on CI), else SQLite/fakeredis.

`MAILER_TEST_REQUIRE_SERVICES=1` (set by .ci/run) turns a missing service into a failure
instead of a fallback, so CI cannot pass without having run the integration tests.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import create_engine, text

from mailer import config, db
from mailer.celery_app import configure

REQUIRE = os.environ.get("MAILER_TEST_REQUIRE_SERVICES") == "1"
PG_URL = os.environ.get(
    "MAILER_TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
# a database number per test session (1-15), so that concurrent sessions rarely share one
REDIS_URL = os.environ.get(
    "MAILER_TEST_REDIS_URL", f"redis://127.0.0.1:6379/{1 + os.getpid() % 15}"
)
# a schema per test session, so that two sessions on one machine never share rows
PG_SCHEMA = f"mailer_test_{os.getpid()}"

Configure = Callable[..., config.Settings]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _missing(what: str, why: Exception) -> None:
    if REQUIRE:
        pytest.fail(f"{what} is required (MAILER_TEST_REQUIRE_SERVICES=1) but unreachable: {why}")


@pytest.fixture(scope="session")
def postgres_url() -> str | None:
    """A migrated schema of its own in the test database, or None where PostgreSQL is absent."""
    try:
        admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f"DROP SCHEMA IF EXISTS {PG_SCHEMA} CASCADE"))
            conn.execute(text(f"CREATE SCHEMA {PG_SCHEMA}"))
        admin.dispose()
    except Exception as exc:
        _missing("PostgreSQL", exc)
        return None
    sep = "&" if "?" in PG_URL else "?"
    url = f"{PG_URL}{sep}options=-csearch_path%3D{PG_SCHEMA}"
    from mailer import migrate

    migrate.upgrade(url)
    db.reset()
    return url


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite file, copied for each test that wants one."""
    path = tmp_path_factory.mktemp("sqlite") / "template.db"
    from mailer import migrate

    migrate.upgrade(f"sqlite:///{path}")
    db.reset()
    return path


@pytest.fixture(scope="session")
def broker_url() -> Iterator[str]:
    """Real Redis (its own db number, flushed) or, where absent, fakeredis on a TCP port."""
    try:
        client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
        client.ping()
        client.flushdb()
        yield REDIS_URL
        return
    except redis.RedisError as exc:
        _missing("Redis", exc)
    from fakeredis import TcpFakeServer

    port = free_port()
    server = TcpFakeServer(("127.0.0.1", port), server_type="redis")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"redis://127.0.0.1:{port}/0"
    server.shutdown()


@pytest.fixture
def configure_env(monkeypatch: pytest.MonkeyPatch) -> Configure:
    """Set MAILER_* variables for this test and reload everything that read them."""

    def apply(**variables: Any) -> config.Settings:
        for name, value in variables.items():
            monkeypatch.setenv(f"MAILER_{name.upper()}", str(value))
        settings = config.reload()
        db.reset()
        configure(settings)
        return settings

    monkeypatch.setenv("MAILER_BROKER_URL", "memory://")
    monkeypatch.setenv("MAILER_FROM", "sender@example.com")
    monkeypatch.setenv("MAILER_SMTP_URL", "smtp://127.0.0.1:9?tls=none")
    yield apply
    config.reload()
    db.reset()


@pytest.fixture
def sqlite_db(sqlite_template: Path, tmp_path: Path, configure_env: Configure) -> str:
    path = tmp_path / "mailer.db"
    shutil.copy(sqlite_template, path)
    url = f"sqlite:///{path}"
    configure_env(database_url=url)
    return url


TABLES = [
    "audit_log",
    "attempts",
    "suppressions",
    "deliveries",
    "messages",
    "campaigns",
    "templates",
    "relays",
]


@pytest.fixture
def pg_db(postgres_url: str | None, configure_env: Configure) -> str:
    if postgres_url is None:
        pytest.skip("PostgreSQL not reachable")
    eng = create_engine(postgres_url)
    with eng.begin() as conn:
        conn.execute(text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))
    eng.dispose()
    configure_env(database_url=postgres_url)
    return postgres_url


@pytest.fixture(params=["sqlite", "postgresql"])
def any_db(request: pytest.FixtureRequest) -> str:
    """Run the test on both databases."""
    return str(request.getfixturevalue("sqlite_db" if request.param == "sqlite" else "pg_db"))


@pytest.fixture
def smtp_server() -> Iterator[Any]:
    from mailer.testing.smtpserver import ScriptedSMTPServer

    with ScriptedSMTPServer() as server:
        yield server


@pytest.fixture
def clean_broker(broker_url: str) -> str:
    """The session's broker, emptied for this test."""
    redis.Redis.from_url(broker_url).flushdb()
    return broker_url


@pytest.fixture
def worker_process() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start `mailer worker` subprocesses with the test's environment; stopped at teardown."""
    started: list[subprocess.Popen[bytes]] = []

    def start(*args: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mailer", "worker", *args],
            env=dict(os.environ),
            stdout=subprocess.DEVNULL if not os.environ.get("MAILER_TEST_WORKER_LOGS") else None,
            stderr=subprocess.DEVNULL if not os.environ.get("MAILER_TEST_WORKER_LOGS") else None,
            start_new_session=True,
        )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in started:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture
def running_dispatcher() -> Iterator[Callable[[], None]]:
    """Start the dispatcher loop in a thread (as `mailer dispatcher` runs it)."""
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def start() -> None:
        from mailer import dispatcher

        thread = threading.Thread(target=dispatcher.run, kwargs={"stop": stop}, daemon=True)
        thread.start()
        threads.append(thread)

    yield start
    stop.set()
    for thread in threads:
        thread.join(timeout=10)


@pytest.fixture(scope="session")
def ca() -> Any:
    """A certificate authority of the tests' own (trustme)."""
    import trustme

    return trustme.CA()


@pytest.fixture(scope="session")
def server_ctx(ca: Any) -> Any:
    """A server-side TLS context with a certificate for 127.0.0.1 and localhost from `ca`."""
    import ssl

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
    return ctx

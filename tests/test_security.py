"""Security: JSON-only tasks (a pickle payload is never unpickled), verified TLS by default, and
relay credentials kept out of task arguments, Redis, the database and every log."""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import signal
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import trustme
from click.testing import CliRunner
from kombu.exceptions import ContentDisallowed
from kombu.serialization import dumps, loads, prepare_accept_content
from sqlalchemy import select

import mailer
from mailer import db, enqueue
from mailer.celery_app import app
from mailer.cli import cli
from mailer.models import Attempt, Delivery, Message, Relay
from mailer.replies import Phase
from mailer.testing.smtpserver import ScriptedSMTPServer
from mailer.transport.base import Outgoing
from mailer.transport.relay import parse_relay_url
from mailer.transport.smtp import SMTPSession
from tests.helpers import add_template, deliveries, wait_until

PASSWORD = "S3cretPassw0rd"


class _Touch:
    """Unpickling this creates `path`: proof that a pickle payload was deserialised."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


# --- JSON only ----------------------------------------------------------------------------------


def test_the_celery_app_accepts_json_only(configure_env) -> None:
    configure_env()
    assert app.conf.accept_content == ["json"]
    assert app.conf.task_serializer == "json"
    assert app.conf.result_serializer == "json"


def test_celerys_content_check_refuses_pickle_without_unpickling(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    content_type, encoding, body = dumps(_Touch(marker), serializer="pickle")
    with pytest.raises(ContentDisallowed, match="untrusted content of type pickle"):
        loads(body, content_type, encoding, accept=prepare_accept_content(app.conf.accept_content))
    assert not marker.exists()
    loads(body, content_type, encoding, accept=prepare_accept_content(["pickle"]))  # control
    assert marker.exists()


@pytest.mark.integration
def test_a_pickled_task_in_the_queue_is_not_executed_by_a_real_worker(
    sqlite_db: str,
    clean_broker: str,
    smtp_server,
    configure_env,
    worker_process,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MAILER_TEST_WORKER_LOGS", "1")  # the worker writes to our stdout/stderr
    configure_env(broker_url=clean_broker, smtp_url=smtp_server.url(tls="none"))
    marker = tmp_path / "unpickled"
    # what anyone who can write to Redis could publish: the task's name, a pickle for its args
    app.send_task("mailer.deliver", args=[_Touch(marker)], queue="bulk", serializer="pickle")
    client = redis.Redis.from_url(clean_broker)
    [queued] = client.lrange("bulk", 0, -1)
    assert json.loads(queued)["content-type"] == "application/x-python-serialize"
    add_template()
    enqueue.send_campaign("welcome", [{"email": "after@example.com", "name": "A"}])  # behind it
    worker = worker_process("--concurrency", "1")

    assert wait_until(lambda: _states() == {"sent"}, timeout=60), _states()
    assert not marker.exists(), "the worker unpickled a task payload"
    assert client.llen("bulk") == 0  # refused and dropped, not handed out again and again
    assert worker.poll() is None
    assert [m.rcpt_tos for m in smtp_server.messages] == [["after@example.com"]]
    worker.send_signal(signal.SIGTERM)
    worker.wait(timeout=30)
    assert "Refusing to deserialize untrusted content of type pickle" in "".join(capfd.readouterr())


def _states() -> set[str]:
    return {d.state.value for d in deliveries()}


# --- TLS is verified by default -----------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "smtp://relay.example.net",
        "smtp://relay.example.net:587",
        "smtp://apikey:secret@relay.example.net?tls=starttls",
        "smtp://relay.example.net?tls=opportunistic",
        "smtps://relay.example.net",
    ],
)
def test_tls_verifies_certificates_and_host_names_by_default(url: str) -> None:
    session = SMTPSession(parse_relay_url(url))
    context = session._ssl()
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname is True
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    session.close()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


def test_a_trusted_certificate_for_another_host_name_is_refused(
    ca: trustme.CA, ca_file: str
) -> None:
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("relay.example.net").configure_cert(server_ctx)  # not 127.0.0.1
    with ScriptedSMTPServer(tls="implicit", ssl_context=server_ctx, auth={"user": PASSWORD}) as srv:
        config = parse_relay_url(srv.url(user="user", password=PASSWORD))
        session = SMTPSession(dataclasses.replace(config, ca_file=ca_file, connect_timeout=5))
        result = session.send(Outgoing("news@example.com", ("a@example.com",), b"x\r\n", False))
        session.close()
        [refused] = result.results
        assert (refused.reply.code, refused.phase) == (None, Phase.TLS)
        assert "certificate is not trusted" in refused.reply.text
        assert "127.0.0.1" in refused.reply.text  # the name it was checked against
        assert srv.auth_attempts == 0 and srv.messages == []


# --- credentials never leave the settings -------------------------------------------------------


@pytest.fixture
def auth_server() -> Iterator[ScriptedSMTPServer]:
    with ScriptedSMTPServer(auth={"user": PASSWORD}) as server:
        yield server


_READ: dict[str, Any] = {
    "string": lambda client, key: client.get(key),
    "list": lambda client, key: client.lrange(key, 0, -1),
    "hash": lambda client, key: client.hgetall(key),
    "set": lambda client, key: client.smembers(key),
    "zset": lambda client, key: client.zrange(key, 0, -1, withscores=True),
}


def _redis_dump(url: str) -> str:
    """Every key and value in the broker's database, as text (`redis-cli --scan`, then each
    key read according to its type)."""
    client = redis.Redis.from_url(url)
    lines = []
    for key in client.scan_iter(count=1000):
        kind = client.type(key).decode()
        lines.append(f"{key!r} {kind} {_READ[kind](client, key)!r}")
    assert lines, "the broker's database is empty"
    return "\n".join(lines)


def _task_args(url: str, queue: str) -> list[Any]:
    """The arguments of every task waiting in `queue`."""
    out = []
    for raw in redis.Redis.from_url(url).lrange(queue, 0, -1):
        envelope = json.loads(raw)
        assert envelope["content-type"] == "application/json"
        args, kwargs, _ = json.loads(base64.b64decode(envelope["body"]))
        assert kwargs == {}
        out.extend(args)
    return out


def _database_dump() -> str:
    with db.session_scope() as session:
        rows: list[Any] = []
        for model in (Message, Delivery, Attempt, Relay):
            for row in session.scalars(select(model)):
                rows.append({c.key: getattr(row, c.key) for c in model.__mapper__.column_attrs})
        return repr(rows)


@pytest.mark.integration
def test_the_relay_password_appears_in_no_task_redis_key_database_row_or_log(
    sqlite_db: str,
    clean_broker: str,
    auth_server: ScriptedSMTPServer,
    configure_env,
    worker_process,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("MAILER_TEST_WORKER_LOGS", "1")  # the worker writes to our stdout/stderr
    smtp_url = f"smtp://user:{PASSWORD}@127.0.0.1:{auth_server.port}?tls=none"
    configure_env(broker_url=clean_broker, smtp_url=smtp_url, log_level="DEBUG")
    add_template()
    rows = [{"email": f"r{i}@example.com", "name": f"R{i}"} for i in range(20)]
    enqueue.send_campaign("welcome", rows)
    mailer.send(template="welcome", to="t@example.com", context={"name": "T"})

    queued = _redis_dump(clean_broker)
    ids = _task_args(clean_broker, "bulk") + _task_args(clean_broker, "transactional")
    assert sorted(i for chunk in ids for i in chunk) == sorted(d.id for d in deliveries())
    assert PASSWORD not in queued

    worker = worker_process("--concurrency", "2")
    assert wait_until(lambda: _states() == {"sent"}, timeout=60), _states()
    assert auth_server.auth_successes >= 1  # the password was really used
    after = _redis_dump(clean_broker)
    worker.send_signal(signal.SIGTERM)
    worker.wait(timeout=30)
    config_output = CliRunner().invoke(cli, ["config"]).output

    worker_output = "".join(capfd.readouterr())
    assert "mailer.deliver" in worker_output, "the worker's log was not captured"
    assert "user:***@" in config_output
    for where, text in [
        ("Redis while tasks were queued", queued),
        ("Redis after the worker ran", after),
        ("the worker's log (DEBUG)", worker_output),
        ("this process's log (DEBUG)", caplog.text),
        ("`mailer config`", config_output),
        ("the database", _database_dump()),
    ]:
        assert PASSWORD not in text, f"the relay password appears in {where}"

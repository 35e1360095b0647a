"""Hooks into the delivery use case: registered by MAILER_HOOKS, called at each point of a
chunk's life, a "not now" before a transaction honoured; through a real worker too."""

from __future__ import annotations

import logging
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

import mailer
from mailer import clock, config, enqueue, hooks
from mailer.delivery import deliver_chunk
from mailer.errors import ConfigError
from mailer.models import Attempt
from mailer.testing.smtpserver import ScriptedSMTPServer
from mailer.transport.memory import MemoryTransport
from tests import hooks_for_tests
from tests.helpers import add_template, attempts_of, count, deliveries, states, wait_until


def _ids() -> list[int]:
    return [d.id for d in deliveries()]


def _campaign(n: int) -> list[int]:
    add_template()
    enqueue.send_campaign(
        "welcome", [{"email": f"r{i}@example.com", "name": "x"} for i in range(n)]
    )
    return _ids()


def test_no_hooks_registered_means_none_to_call(configure_env: Any) -> None:
    assert hooks.for_settings(configure_env()) is None
    assert not hooks.asks_before_transaction(hooks.Hooks())
    assert hooks.asks_before_transaction(hooks_for_tests.NotNowFor())


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("tests.hooks_for_tests", "package.module:attribute"),
        ("tests.no_such_module:Hook", "cannot import"),
        ("tests.hooks_for_tests:HELD", "not a mailer.hooks.Hooks"),
        ("tests.hooks_for_tests:Missing", "not a mailer.hooks.Hooks"),
    ],
)
def test_a_wrong_hook_path_is_refused_at_start_up_naming_the_variable(
    value: str, says: str
) -> None:
    with pytest.raises(ConfigError, match=f"MAILER_HOOKS.*{says}"):
        config.load({"MAILER_HOOKS": value})


def test_hooks_are_read_from_a_comma_separated_list() -> None:
    paths = " tests.hooks_for_tests:Recording, mailer.hooks.chunklog:ChunkLog ,"
    loaded = config.load({"MAILER_HOOKS": paths})
    assert loaded.hooks == ("tests.hooks_for_tests:Recording", "mailer.hooks.chunklog:ChunkLog")
    assert config.load({}).hooks == ()


def test_not_now_hands_the_group_back_deferred_with_no_attempt_spent(
    any_db: str, configure_env: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    configure_env(hooks="tests.hooks_for_tests:NotNowFor")
    monkeypatch.setattr(hooks_for_tests, "HELD", {"r1@example.com", "r3@example.com"})
    ids = _campaign(5)
    transport = MemoryTransport()
    before = clock.now()
    report = deliver_chunk(ids, transport=transport)
    assert report.claimed == 5 and report.attempted == 3 and report.released == 2
    assert sorted(r for r, _ in transport.sent) == [f"r{i}@example.com" for i in (0, 2, 4)]
    by_address = {d.recipient: d for d in deliveries()}
    for address in ("r1@example.com", "r3@example.com"):
        held = by_address[address]
        assert held.state.value == "deferred" and held.attempts == 0
        assert held.next_attempt_at is not None
        due = held.next_attempt_at.replace(tzinfo=before.tzinfo)
        assert before + timedelta(minutes=59) < due < before + timedelta(minutes=61)
        assert attempts_of(address) == []
    assert {states()[f"r{i}@example.com"] for i in (0, 2, 4)} == {"sent"}
    assert count(Attempt) == 3


def test_not_now_over_real_sessions_keeps_the_others_going(
    sqlite_db: str, configure_env: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hooks_for_tests, "HELD", {"r2@example.com"})
    with ScriptedSMTPServer() as server:
        configure_env(
            smtp_url=server.url(tls="none"),
            smtp_sessions=4,
            hooks="tests.hooks_for_tests:NotNowFor",
        )
        ids = _campaign(9)
        deliver_chunk(ids)
        assert set(server.copies()) == {f"r{i}@example.com" for i in range(9)} - {"r2@example.com"}
    assert states()["r2@example.com"] == "deferred"
    assert deliveries(recipient="r2@example.com")[0].attempts == 0


def test_chunklog_logs_one_line_a_chunk(
    sqlite_db: str, configure_env: Any, caplog: pytest.LogCaptureFixture
) -> None:
    configure_env(hooks="mailer.hooks.chunklog:ChunkLog")
    add_template()
    mailer.send_campaign(
        "welcome",
        [{"email": a, "name": "x"} for a in ("a@example.com", "b@example.com", "c@example.com")],
    )
    transport = MemoryTransport()
    from mailer.replies import Phase, SMTPReply

    transport.script("b@example.com", Phase.RCPT, SMTPReply.of(550, "5.1.1 no such user"))
    transport.script("c@example.com", Phase.RCPT, SMTPReply.of(451, "4.3.0 busy"))
    with caplog.at_level(logging.INFO, logger="mailer.hooks.chunklog"):
        deliver_chunk(_ids(), transport=transport)
    lines = [r.getMessage() for r in caplog.records if r.name == "mailer.hooks.chunklog"]
    assert len(lines) == 1
    assert lines[0].startswith(
        "chunk on memory: claimed 3, delivered 1, hard_bounce 1, transient 1, in "
    )


@pytest.fixture
def recorded(
    pg_db: str,
    clean_broker: str,
    smtp_server: ScriptedSMTPServer,
    configure_env: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[ScriptedSMTPServer, Path]:
    """Settings for a real worker whose Recording hook writes to the file returned."""
    events = tmp_path / "hook-events.jsonl"
    monkeypatch.setenv("MAILER_TEST_HOOK_FILE", str(events))
    configure_env(
        broker_url=clean_broker,
        smtp_url=smtp_server.url(tls="none"),
        retry_first_delay=1,
        dispatch_interval=0.5,
        chunk_size=50,
        log_level="WARNING",
        hooks="tests.hooks_for_tests:Recording",
    )
    return smtp_server, events


@pytest.mark.integration
def test_a_recording_hook_sees_every_claim_and_verdict_once_through_a_real_worker(
    recorded: tuple[ScriptedSMTPServer, Path], worker_process: Any, running_dispatcher: Any
) -> None:
    smtp_server, events = recorded
    busy = {f"busy{i}@example.com" for i in range(15)}
    unknown = {f"nobody{i}@example.com" for i in range(10)}
    normal = {f"user{i}@example.com" for i in range(175)}
    for address in busy:
        smtp_server.reply("RCPT", "451 4.3.0 Mailbox busy, try again", recipient=address, times=1)
    for address in unknown:
        smtp_server.reply("RCPT", "550 5.1.1 No such user", recipient=address)
    add_template()
    rows = [{"email": a, "name": a.split("@")[0]} for a in sorted(busy | unknown | normal)]
    assert enqueue.send_campaign("welcome", rows).queued == 200
    worker_process("--concurrency", "2")
    running_dispatcher()
    assert wait_until(lambda: all(d.state.final for d in deliveries()), timeout=120)

    final = {d.id: d for d in deliveries()}
    assert Counter(d.state.value for d in final.values()) == {"sent": 190, "bounced": 10}
    seen = hooks_for_tests.read(str(events))
    claimed = Counter(i for e in seen if e["event"] == "claimed" for i in e["ids"])
    recorded = Counter(
        (i, code) for e in seen if e["event"] == "recorded" for i, code in e["verdicts"]
    )
    assert not [e for e in seen if e["event"] == "released"]
    from mailer import db

    with db.session_scope() as session:
        attempts = Counter((a.delivery_id, a.code) for a in session.query(Attempt))
    # every attempt row seen once as a verdict, and every delivery claimed once an attempt
    assert recorded == attempts
    assert claimed == Counter({i: d.attempts for i, d in final.items()})
    assert sorted(c for (_, c) in recorded.elements() if c != 250) == sorted(
        [451] * len(busy) + [550] * len(unknown)
    )

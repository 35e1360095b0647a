"""The outbox's gauges against the database, and the two ways they are served: the ASGI app
and `mailer metrics` on a port of its own."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import urllib.request
from datetime import timedelta
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

import mailer
from mailer import clock, db, metrics
from mailer.delivery import deliver_chunk
from mailer.models import Delivery, Message
from mailer.replies import Phase, SMTPReply
from mailer.transport.memory import MemoryTransport
from tests.conftest import free_port
from tests.helpers import add_template, deliveries, wait_until

WAITING = ("queued", "deferred", "sending")


def gauges(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _outbox(fake: clock.FakeClock) -> None:
    """A campaign partly sent (one deferred, one bounced), a transactional message queued an
    hour ago, another scheduled for tomorrow."""
    add_template()
    mailer.send("welcome", "early@example.com", context={"name": "E"})
    fake.advance(3600)
    mailer.send(
        "welcome", "later@example.com", context={"name": "L"}, send_at=fake() + timedelta(days=1)
    )
    mailer.send_campaign("welcome", [{"email": f"r{i}@example.com", "name": "x"} for i in range(8)])
    transport = MemoryTransport()
    transport.script("r1@example.com", Phase.RCPT, SMTPReply.of(451, "4.3.0 busy"))
    transport.script("r2@example.com", Phase.RCPT, SMTPReply.of(550, "5.1.1 no such user"))
    campaign = [d.id for d in deliveries() if d.recipient.startswith("r")]
    deliver_chunk(campaign[:4], transport=transport)
    fake.advance(60)


def _truth() -> tuple[dict[tuple[str, str], int], Any]:
    """What GROUP BY and min() over the deliveries say: {(priority, state): deliveries}, and
    the earliest due time of those waiting."""
    with db.session_scope() as session:
        rows = session.execute(
            select(Message.priority, Delivery.state, func.count())
            .join(Message, Delivery.message_id == Message.id)
            .group_by(Message.priority, Delivery.state)
        )
        every = {(str(p), str(s)): n for p, s, n in rows}
        oldest = session.scalar(
            select(func.min(Delivery.next_attempt_at)).where(
                Delivery.state.in_(["queued", "deferred"]), Delivery.next_attempt_at <= clock.now()
            )
        )
    return every, oldest


def test_the_queue_depth_and_the_oldest_due_agree_with_the_deliveries(
    any_db: str, configure_env: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    fake = clock.FakeClock()
    with clock.using(fake):
        _outbox(fake)
        every, oldest = _truth()
        seen = gauges(metrics.scrape(metrics.registry()).decode())
    depth = {key: n for key, n in every.items() if key[1] in WAITING}
    assert depth == {("bulk", "queued"): 4, ("bulk", "deferred"): 1, ("transactional", "queued"): 2}
    assert every == {**depth, ("bulk", "sent"): 2, ("bulk", "bounced"): 1}
    kept = {
        (dict(labels)["priority"], dict(labels)["state"]): n
        for (name, labels), n in seen.items()
        if name == "mailer_outbox_deliveries"
    }
    assert kept == every
    for priority in ("bulk", "transactional"):
        for state in WAITING:
            key = ("mailer_queue_depth", (("priority", priority), ("state", state)))
            assert seen[key] == depth.get((priority, state), 0), key
    # the first transactional message, due an hour and a minute ago; not the one for tomorrow,
    # nor the deferred one, due in minutes
    assert oldest is not None
    assert seen[("mailer_oldest_queued_seconds", ())] == pytest.approx(3660, abs=1)
    assert seen[("mailer_outbox_up", ())] == 1


def test_an_empty_outbox_has_nothing_due(sqlite_db: str, configure_env: Any) -> None:
    seen = gauges(metrics.scrape(metrics.registry()).decode())
    assert seen[("mailer_oldest_queued_seconds", ())] == 0
    assert seen[("mailer_queue_depth", (("priority", "bulk"), ("state", "queued")))] == 0


def test_an_unreadable_outbox_says_so_in_the_scrape(tmp_path: Any, configure_env: Any) -> None:
    configure_env(database_url=f"sqlite:///{tmp_path}/none.db")  # no schema
    seen = gauges(metrics.scrape(metrics.registry()).decode())
    assert seen[("mailer_outbox_up", ())] == 0
    assert not [k for k in seen if k[0] == "mailer_queue_depth"]


def _asgi(app: Any, method: str) -> tuple[int, bytes, dict[bytes, bytes]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": "/metrics", "headers": []}
    asyncio.run(app(scope, receive, send))
    return (
        sent[0]["status"],
        b"".join(m.get("body", b"") for m in sent[1:]),
        dict(sent[0]["headers"]),
    )


def test_the_asgi_app_serves_the_scrape(sqlite_db: str, configure_env: Any) -> None:
    add_template()
    mailer.send("welcome", "a@example.com", context={"name": "A"})
    app = metrics.asgi_app()
    status, body, headers = _asgi(app, "GET")
    assert status == 200
    assert headers[b"content-type"].startswith(b"text/plain")
    seen = gauges(body.decode())
    assert seen[("mailer_queue_depth", (("priority", "transactional"), ("state", "queued")))] == 1
    assert _asgi(app, "POST")[0] == 405


def test_mailer_metrics_serves_on_its_own_port(sqlite_db: str, configure_env: Any) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mailer", "metrics", "--port", str(port), "--bind", "127.0.0.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        bodies: list[bytes] = []

        def answered() -> bool:
            try:
                with urllib.request.urlopen(url, timeout=5) as answer:
                    bodies.append(answer.read())
                return True
            except OSError:
                return False

        assert wait_until(answered, timeout=30)
        assert gauges(bodies[0].decode())[("mailer_outbox_up", ())] == 1
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0

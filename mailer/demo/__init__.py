"""`mailer demo`: a whole campaign end to end on embedded parts, the production code path.

SQLite in a work folder, fakeredis serving a real TCP port as the broker, the scripted SMTP
server in this process; a real `celery worker` process and the dispatcher. Only the URLs
(and shorter retry delays, so the demo ends in seconds) differ from production.
"""

from __future__ import annotations

import csv
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from fakeredis import TcpFakeServer
from sqlalchemy import select

from mailer import config, db

if TYPE_CHECKING:
    from mailer.testing.smtpserver import ScriptedSMTPServer

HERE = Path(__file__).resolve().parent
RECIPIENTS = HERE / "recipients.csv"
TIMEOUT = 120.0


def run(workdir: Path) -> int:
    workdir.mkdir(parents=True, exist_ok=True)
    database = workdir / "demo.db"
    for stale in workdir.glob("demo.db*"):
        stale.unlink()
    broker_port = _free_port()
    broker = TcpFakeServer(("127.0.0.1", broker_port), server_type="redis")
    threading.Thread(target=broker.serve_forever, daemon=True).start()

    from mailer.testing.smtpserver import ScriptedSMTPServer

    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd logs every command
    smtp = ScriptedSMTPServer().start()
    addresses = [row["email"] for row in csv.DictReader(RECIPIENTS.open(encoding="utf-8"))]
    busy = sorted({a for a in addresses if a.startswith("busy")})
    unknown = sorted({a for a in addresses if a.startswith("nobody")})
    for address in busy:
        smtp.reply("RCPT", "450 4.2.1 Mailbox busy, try again later", recipient=address, times=1)
    for address in unknown:
        smtp.reply("RCPT", "550 5.1.1 No such user here", recipient=address)

    env = {
        "MAILER_DATABASE_URL": f"sqlite:///{database.resolve()}",
        "MAILER_BROKER_URL": f"redis://127.0.0.1:{broker_port}/0",
        "MAILER_SMTP_URL": smtp.url(tls="none"),
        "MAILER_FROM": "newsletter@example.com",
        "MAILER_RETRY_FIRST_DELAY": "2",
        "MAILER_DISPATCH_INTERVAL": "1",
        "MAILER_REPUBLISH_AFTER": "10",
        "MAILER_LOG_LEVEL": os.environ.get("MAILER_LOG_LEVEL", "WARNING"),
    }
    os.environ.update(env)
    _reconfigure()
    print(f"broker  fakeredis on 127.0.0.1:{broker_port}")
    print(
        f"relay   scripted SMTP server on 127.0.0.1:{smtp.port} "
        f"({len(busy)} mailboxes busy once (450), {len(unknown)} unknown (550 5.1.1))"
    )
    print(f"db      {database}")

    from mailer import dispatcher, enqueue, migrate, templates

    migrate.upgrade()
    with db.session_scope() as session:
        templates.add(
            session,
            "welcome",
            (HERE / "welcome.subject").read_text(),
            (HERE / "welcome.txt").read_text(),
            (HERE / "welcome.html").read_text(),
        )

    from mailer import recipients

    started = time.monotonic()
    result = enqueue.send_campaign("welcome", recipients.read(RECIPIENTS), name="demo newsletter")
    print(
        f"queued  campaign {result.campaign_id}: {result.queued} recipients "
        f"({result.duplicates} duplicate row dropped) in {time.monotonic() - started:.2f} s"
    )

    worker = subprocess.Popen(
        [sys.executable, "-m", "mailer", "worker", "--concurrency", "2"],
        env={**os.environ, **env},
    )
    stop = threading.Event()
    pump = threading.Thread(target=dispatcher.run, kwargs={"stop": stop}, daemon=True)
    pump.start()
    try:
        finished = _watch(result.campaign_id, started)
    finally:
        stop.set()
        worker.terminate()
        worker.wait(timeout=30)
        pump.join(timeout=10)
        smtp.stop()
        broker.shutdown()
    return _summary(result.campaign_id, smtp, busy, unknown, finished)


def _watch(campaign_id: int, started: float) -> bool:
    from mailer import queries

    shown = ""
    while time.monotonic() - started < TIMEOUT:
        with db.session_scope() as session:
            status = queries.campaign_status(session, campaign_id)
        line = " ".join(f"{k}={v}" for k, v in status.counts.items())
        if line != shown:
            print(
                f"[{time.monotonic() - started:5.1f}s] {status.progress:6.1%}  {line}", flush=True
            )
            shown = line
        if status.done == status.total:
            return True
        time.sleep(0.5)
    print(f"gave up after {TIMEOUT:.0f} s")
    return False


def _summary(
    campaign_id: int,
    smtp: ScriptedSMTPServer,
    busy: list[str],
    unknown: list[str],
    finished: bool,
) -> int:
    from mailer import queries
    from mailer.models import Attempt, Delivery

    with db.session_scope() as session:
        status = queries.campaign_status(session, campaign_id)
        rows = {r["recipient"]: r for r in queries.report(session, campaign_id)}
        first_replies = {
            recipient: f"{code} {reply}"
            for recipient, code, reply in session.execute(
                select(Delivery.recipient, Attempt.code, Attempt.reply)
                .join(Attempt, Attempt.delivery_id == Delivery.id)
                .where(Delivery.recipient.in_(busy), Attempt.outcome != "delivered")
            )
        }
    print("\nper state:")
    for state, n in status.counts.items():
        print(f"  {state:10} {n:5}")
    print("\nsample outcomes (recipient, state, attempts, last reply):")
    sample = [a for a in rows if not a.startswith(("busy", "nobody"))][:3] + busy[:3] + unknown[:3]
    for address in sample:
        r = rows[address]
        note = f"   first try: {first_replies[address]}" if address in first_replies else ""
        print(f"  {address:28} {r['state']:8} {r['attempts']}  {r['code']} {r['reply']}{note}")
    stored = smtp.copies()
    ok = (
        finished
        and all(rows[a]["state"] == "sent" and rows[a]["attempts"] == 2 for a in busy)
        and all(rows[a]["state"] == "bounced" for a in unknown)
        and all(stored[a.lower()] == 1 for a, r in rows.items() if r["state"] == "sent")
    )
    print(
        "\n"
        + (
            "demo OK: every 4xx recipient was sent on retry, every 5xx bounced, one copy each"
            if ok
            else "demo FAILED: see the outcomes above"
        )
    )
    return 0 if ok else 1


def _reconfigure() -> None:
    from mailer.celery_app import configure

    config.reload()
    db.reset()
    configure()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])

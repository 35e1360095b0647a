"""A real prefork worker with the metrics hook: every pool process's counts reach one scrape,
and they add up to the attempts in the database; a stopped worker's sessions stop counting."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from mailer import enqueue, metrics
from mailer.models import Attempt
from mailer.testing.smtpserver import ScriptedSMTPServer
from tests.helpers import add_template, count, deliveries, wait_until


def scraped(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """{sample name: [(labels, value), ...]} of a scrape's text."""
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found.setdefault(s.name, []).append((s.labels, s.value))
    return found


def total(samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **match: str) -> float:
    return sum(
        v
        for labels, v in samples.get(name, [])
        if all(labels.get(k) == x for k, x in match.items())
    )


def _stale_counts(directory: Path) -> None:
    """What a worker that ran before left in the directory: 1000 attempts."""
    code = "from mailer.hooks import metrics as m; m.ATTEMPTS.labels('delivered').inc(1000)"
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    subprocess.run([sys.executable, "-c", code], env=env, check=True)


def _attempts_by_process(directory: Path) -> dict[str, float]:
    """Attempts each process wrote, from its own file: {file name: attempts}."""
    out = {}
    for f in sorted(directory.glob("counter_*.db")):
        n = sum(
            s.value
            for family in MultiProcessCollector.merge([str(f)])
            for s in family.samples
            if s.name == "mailer_attempts_total"
        )
        out[f.name] = n
    return out


@pytest.mark.integration
def test_every_pool_process_counts_reach_the_scrape_and_add_up_to_the_attempts(
    pg_db: str,
    clean_broker: str,
    smtp_server: ScriptedSMTPServer,
    configure_env: Any,
    worker_process: Any,
    running_dispatcher: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    directory = tmp_path / "prometheus"
    directory.mkdir()
    _stale_counts(directory)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(directory))
    configure_env(
        broker_url=clean_broker,
        smtp_url=smtp_server.url(tls="none"),
        retry_first_delay=1,
        dispatch_interval=0.5,
        chunk_size=10,
        log_level="WARNING",
        hooks="mailer.hooks.metrics:Metrics",
    )
    busy = {f"busy{i}@gmail.com" for i in range(15)}
    unknown = {f"nobody{i}@outlook.com" for i in range(10)}
    normal = {f"user{i}@example.com" for i in range(175)}
    for address in busy:
        smtp_server.reply("RCPT", "451 4.3.0 Mailbox busy, try again", recipient=address, times=1)
    for address in unknown:
        smtp_server.reply("RCPT", "550 5.1.1 No such user", recipient=address)
    add_template()
    rows = [{"email": a, "name": a.split("@")[0]} for a in sorted(busy | unknown | normal)]
    assert enqueue.send_campaign("welcome", rows).queued == 200
    worker = worker_process("--concurrency", "2")
    running_dispatcher()
    assert wait_until(lambda: all(d.state.final for d in deliveries()), timeout=120)
    assert Counter(d.state.value for d in deliveries()) == {"sent": 190, "bounced": 10}
    attempts = count(Attempt)
    assert attempts == 215

    source = metrics.registry(sweep=True)
    # the last outcomes are counted just after their commit: wait for the scrape to see them
    assert wait_until(
        lambda: (
            total(scraped(metrics.scrape(source).decode()), "mailer_attempts_total") == attempts
        ),
        timeout=10,
    )
    seen = scraped(metrics.scrape(source).decode())
    by_process = _attempts_by_process(directory)
    print("attempts by process:", by_process)
    # both pool processes sent, and what each counted adds up to the attempts in the database
    assert len([n for n in by_process.values() if n > 0]) >= 2, by_process
    assert sum(by_process.values()) == attempts
    assert total(seen, "mailer_attempts_total", reply_class="delivered") == 190
    assert total(seen, "mailer_attempts_total", reply_class="transient") == 15
    assert total(seen, "mailer_attempts_total", reply_class="hard_bounce") == 10
    assert total(seen, "mailer_deliveries_total", domain_group="gmail") == 30
    assert (
        total(seen, "mailer_deliveries_total", outcome="hard_bounce", domain_group="microsoft")
        == 10
    )
    assert total(seen, "mailer_deliveries_total", domain_group="other") == 175
    assert total(seen, "mailer_enqueue_to_sent_seconds_count") == 190
    assert total(seen, "mailer_chunk_duration_seconds_count") >= 20
    assert total(seen, "mailer_smtp_sessions_open") >= 2  # both processes hold theirs

    worker.send_signal(signal.SIGTERM)
    worker.wait(timeout=60)
    after = scraped(metrics.scrape(metrics.registry(sweep=False)).decode())
    # the pool processes marked themselves dead: their sessions are gone, their counts stay
    assert total(after, "mailer_smtp_sessions_open") == 0
    assert total(after, "mailer_attempts_total") == attempts

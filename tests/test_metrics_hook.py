"""The metrics hook in one process: what it counts for a chunk, the domain groups, the
batched histogram, and the multiprocess directory's housekeeping."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, Histogram

import mailer
from mailer import metrics_domains, metrics_files
from mailer.delivery import deliver_chunk
from mailer.hooks import metrics as hook
from mailer.replies import Phase, SMTPReply
from mailer.transport.memory import MemoryTransport
from tests.helpers import add_template, deliveries


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.mark.parametrize(
    ("address", "group"),
    [
        ("ann@gmail.com", "gmail"),
        ("ann@GoogleMail.com", "gmail"),
        ("bob@hotmail.co.uk", "microsoft"),
        ("bob@outlook.com", "microsoft"),
        ("c@aol.com", "yahoo"),
        ("d@icloud.com", "apple"),
        ("e@web.de", "gmx"),
        ("f@example.com", "other"),
        ("g@mail.gmail.com.example.org", "other"),
        ("odd@name@yandex.ru", "yandex"),
    ],
)
def test_a_domain_falls_in_its_provider_group_else_other(address: str, group: str) -> None:
    assert metrics_domains.group(address) == group
    assert group in metrics_domains.GROUPS


def test_the_groups_are_few_whatever_the_domains() -> None:
    assert len(metrics_domains.GROUPS) <= 12
    assert {metrics_domains.group(f"x@d{i}.example") for i in range(1000)} == {"other"}


def test_observe_many_gives_what_observe_gives_one_by_one() -> None:
    values = [0.0, 0.05, 0.07, 1.0, 3.0, 59.9, 60.0, 7200.0, 1e9, 0.3]
    one, many = CollectorRegistry(), CollectorRegistry()
    buckets = hook.LATENCY_BUCKETS
    a = Histogram("latency_seconds", "x", registry=one, buckets=buckets)
    b = Histogram("latency_seconds", "x", registry=many, buckets=buckets)
    for value in values:
        a.observe(value)
    hook.observe_many(b, iter(values))
    hook.observe_many(b, iter([]))

    def samples(registry: CollectorRegistry) -> dict[Any, float]:
        found = {}
        for family in registry.collect():
            for s in family.samples:
                if not s.name.endswith("_created"):
                    found[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return found

    assert samples(one) == samples(many)
    assert samples(many)[("latency_seconds_count", ())] == len(values)


def test_a_chunk_is_counted_by_outcome_domain_group_and_reply_class(
    any_db: str, configure_env: Any
) -> None:
    configure_env(hooks="mailer.hooks.metrics:Metrics")
    add_template()
    addresses = ["a@gmail.com", "b@gmail.com", "c@outlook.com", "d@example.com", "e@example.com"]
    mailer.send_campaign("welcome", [{"email": a, "name": "x"} for a in addresses])
    transport = MemoryTransport()
    transport.script("c@outlook.com", Phase.RCPT, SMTPReply.of(550, "5.1.1 no such user"))
    transport.script("d@example.com", Phase.RCPT, SMTPReply.of(451, "4.3.0 busy"))
    before = {
        "gmail": sample(
            "mailer_deliveries_total", outcome="delivered", relay="memory", domain_group="gmail"
        ),
        "bounce": sample(
            "mailer_deliveries_total",
            outcome="hard_bounce",
            relay="memory",
            domain_group="microsoft",
        ),
        "transient": sample(
            "mailer_deliveries_total", outcome="transient", relay="memory", domain_group="other"
        ),
        "other": sample(
            "mailer_deliveries_total", outcome="delivered", relay="memory", domain_group="other"
        ),
        "attempts": sum(
            sample("mailer_attempts_total", reply_class=k)
            for k in ("delivered", "hard_bounce", "transient")
        ),
        "latency": sample("mailer_enqueue_to_sent_seconds_count", relay="memory"),
        "chunks": sample("mailer_chunk_duration_seconds_count", relay="memory"),
    }
    deliver_chunk([d.id for d in deliveries()], transport=transport)
    assert (
        sample("mailer_deliveries_total", outcome="delivered", relay="memory", domain_group="gmail")
        - before["gmail"]
        == 2
    )
    assert (
        sample(
            "mailer_deliveries_total",
            outcome="hard_bounce",
            relay="memory",
            domain_group="microsoft",
        )
        - before["bounce"]
        == 1
    )
    assert (
        sample("mailer_deliveries_total", outcome="transient", relay="memory", domain_group="other")
        - before["transient"]
        == 1
    )
    assert (
        sample("mailer_deliveries_total", outcome="delivered", relay="memory", domain_group="other")
        - before["other"]
        == 1
    )
    attempts = sum(
        sample("mailer_attempts_total", reply_class=k)
        for k in ("delivered", "hard_bounce", "transient")
    )
    assert attempts - before["attempts"] == 5
    # the three delivered, each from its enqueue a moment ago
    assert sample("mailer_enqueue_to_sent_seconds_count", relay="memory") - before["latency"] == 3
    assert sample("mailer_chunk_duration_seconds_count", relay="memory") - before["chunks"] == 1


def test_a_hook_that_holds_back_is_counted_as_released(
    sqlite_db: str, configure_env: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests import hooks_for_tests

    configure_env(hooks="tests.hooks_for_tests:NotNowFor,mailer.hooks.metrics:Metrics")
    monkeypatch.setattr(hooks_for_tests, "HELD", {"r1@example.com"})
    add_template()
    mailer.send_campaign("welcome", [{"email": f"r{i}@example.com", "name": "x"} for i in range(3)])
    labels = {"state": "deferred", "reason": "a hook said not now", "relay": "memory"}
    before = sample("mailer_deliveries_released_total", **labels)
    deliver_chunk([d.id for d in deliveries()], transport=MemoryTransport())
    assert sample("mailer_deliveries_released_total", **labels) - before == 1


def _gauge_process(directory: Path, value: int, *, mark_dead: bool) -> int:
    """A process that sets the open-sessions gauge in `directory` and exits (marking itself
    dead as a pool process does, or not, as one killed); returns its pid."""
    code = (
        "import os; from mailer.hooks import metrics as m; from mailer import metrics_files as f;"
        f"m.SESSIONS.set({value}); print(os.getpid(), flush=True);"
        + ("f.mark_dead(os.getpid(), f.directory());" if mark_dead else "")
        + "os._exit(0)"
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, check=True)
    return int(out.stdout.split()[0])


def test_a_dead_process_gauges_are_swept_and_a_clean_start_empties_the_directory(
    tmp_path: Path,
) -> None:
    killed = _gauge_process(tmp_path, 3, mark_dead=False)
    exited = _gauge_process(tmp_path, 5, mark_dead=True)
    names = {p.name for p in tmp_path.iterdir()}
    assert f"gauge_livesum_{killed}.db" in names
    assert f"gauge_livesum_{exited}.db" not in names
    alive = tmp_path / f"gauge_livesum_{os.getpid()}.db"
    alive.write_bytes((tmp_path / f"gauge_livesum_{killed}.db").read_bytes())
    assert metrics_files.sweep(tmp_path) == [killed]
    assert {p.name for p in tmp_path.glob("gauge_*")} == {alive.name}
    assert metrics_files.clean(tmp_path) >= 1
    assert list(tmp_path.iterdir()) == []


def test_a_failure_to_count_is_logged_and_the_mail_still_goes(
    sqlite_db: str,
    configure_env: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    configure_env(hooks="mailer.hooks.metrics:Metrics")
    add_template()
    mailer.send_campaign("welcome", [{"email": f"r{i}@example.com", "name": "x"} for i in range(3)])

    def unwritable(*_: Any) -> Any:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(hook.DELIVERIES, "labels", unwritable)
    monkeypatch.setattr(hook.CHUNK_DURATION, "labels", unwritable)
    monkeypatch.setattr(hook, "_failures", 0)
    transport = MemoryTransport()
    report = deliver_chunk([d.id for d in deliveries()], transport=transport)
    assert report.attempted == 3 and len(transport.sent) == 3
    warnings = [r for r in caplog.records if r.name == "mailer.hooks.metrics"]
    assert [r.levelname for r in warnings] == ["WARNING"]
    assert "could not count outcomes" in warnings[0].getMessage()

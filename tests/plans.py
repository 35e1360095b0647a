"""Each hot statement as mailer builds it, captured from the engine and EXPLAINed: the plan
tests' machinery, and a report when run by hand:

    .venv/bin/python tests/plans.py [DELIVERIES]    # builds a schema, prints each plan
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy.orm import Session

from mailer import (
    actions,
    breakdowns,
    browse,
    bulk,
    clock,
    config,
    db,
    delivery,
    dispatcher,
    outcomes,
    overview,
    queries,
    relay_health,
    suppressions,
)
from mailer.config import load
from mailer.filters import DeliveryFilter
from mailer.models import Delivery, DeliveryState
from mailer.replies import ReplyClass

S = DeliveryState
WATCHED = ("deliveries", "attempts")
_VERBS = ("SELECT", "UPDATE", "INSERT", "DELETE", "WITH")


@dataclass
class Statement:
    sql: str
    params: Any
    seconds: float = 0.0
    plan: dict[str, Any] = field(default_factory=dict)

    def scans(self) -> list[tuple[str, str, str]]:
        """(node type, relation, index) of every node that reads a watched table."""
        return [
            (n["Node Type"], n.get("Relation Name", ""), n.get("Index Name", ""))
            for n in _nodes(self.plan)
            if n.get("Relation Name") in WATCHED
        ]

    def seq_scans(self) -> list[str]:
        return [rel for kind, rel, _ in self.scans() if kind == "Seq Scan"]

    def rows_read(self, relation: str) -> int:
        """Rows an analyzed plan read from `relation`: those it kept and those its filters
        dropped, in every loop."""
        return sum(
            round(
                (n.get("Actual Rows", 0) + n.get("Rows Removed by Filter", 0))
                * n.get("Actual Loops", 1)
            )
            for n in _nodes(self.plan)
            if n.get("Relation Name") == relation
        )


def _nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", ()):
        yield from _nodes(child)


def capture(url: str, work: Callable[[Session], Any]) -> list[Statement]:
    """Run `work` in a transaction that is rolled back, keeping each statement it sent (with
    its parameters, as the driver got them, and its time), then EXPLAIN each."""
    eng = db.engine(url)
    seen = _run(eng, [], work, analyze=False)
    _explain(eng, seen)
    return seen


def capture_analyzed(url: str, setup: list[str], work: Callable[[Session], Any]) -> list[Statement]:
    """Run the `setup` statements, ANALYZE, then `work` (which must only read), and EXPLAIN
    ANALYZE each statement it sent, all in one transaction that is rolled back: the plans of
    an outbox that `setup` shaped, with the rows each node read."""
    return _run(db.engine(url), setup, work, analyze=True)


def _run(
    eng: Engine, setup: list[str], work: Callable[[Session], Any], *, analyze: bool
) -> list[Statement]:
    seen: list[Statement] = []
    started: list[float] = []

    def before(_c: Any, _cur: Any, sql: str, params: Any, _ctx: Any, many: bool) -> None:
        if sql.lstrip().split(None, 1)[0].upper() in _VERBS:
            # an executemany is explained with its first row's parameters
            seen.append(Statement(sql, params[0] if many and params else params))
            started.append(time.perf_counter())

    def after(_c: Any, _cur: Any, sql: str, _p: Any, _ctx: Any, many: bool) -> None:
        if started and seen and seen[-1].sql is sql:
            seen[-1].seconds = time.perf_counter() - started.pop()

    # the work's own commits (a batch's) become savepoints of one transaction rolled back
    with eng.connect() as conn:
        outer = conn.begin()
        try:
            for sql in setup:
                conn.exec_driver_sql(sql)
            if setup:
                conn.exec_driver_sql("ANALYZE")
            event.listen(eng, "before_cursor_execute", before)
            event.listen(eng, "after_cursor_execute", after)
            try:
                with Session(bind=conn, join_transaction_mode="create_savepoint") as session:
                    work(session)
            finally:
                event.remove(eng, "before_cursor_execute", before)
                event.remove(eng, "after_cursor_execute", after)
            if analyze:
                for st in seen:
                    st.plan = _plan(conn, "EXPLAIN (ANALYZE, FORMAT JSON) " + st.sql, st.params)
        finally:
            outer.rollback()
    return seen


def _plan(conn: Any, sql: str, params: Any) -> dict[str, Any]:
    rows = conn.exec_driver_sql(sql, params).scalar()
    document = rows if isinstance(rows, list) else json.loads(rows)
    return dict(document[0]["Plan"])


def _explain(eng: Engine, statements: list[Statement]) -> None:
    with eng.connect() as conn:
        for st in statements:
            st.plan = _plan(conn, "EXPLAIN (FORMAT JSON) " + st.sql, st.params)
        conn.rollback()


# --- the hot statements, as each role runs them ------------------------------------------------


@dataclass
class Scene:
    """What the statements are run against: the outbox's shape (see outbox_scale)."""

    deliveries: int
    campaign: int  # a campaign to act on (its message has the same id)
    now: datetime
    campaign_size: int = 100_000

    def deferred_ids(self, n: int) -> list[int]:
        # deliveries whose number is 88-91 modulo 100 wait for a retry an hour from now
        first = (self.campaign - 1) * 100_000
        return [first + k * 100 + 88 + j for k in range(n // 4 + 1) for j in range(4)][:n]


def worker_chunk(scene: Scene) -> Callable[[Session], Any]:
    """A worker's chunk of 500: claim, load its message, check suppressions, record."""

    def work(session: Session) -> None:
        later = scene.now + timedelta(hours=2)  # the deferred ones are due by then
        lease = later + timedelta(minutes=5)
        claimed = outcomes.claim(session, scene.deferred_ids(500), later, lease)
        ids = list({c.message_id for c in claimed}) or [scene.campaign]
        session.connection().execute(delivery._sources(True), {"ids": ids}).all()
        suppressions.suppressed(session, [c.recipient.lower() for c in claimed])
        rows = [
            {
                "id": c.id,
                "state": S.SENT,
                "attempts": c.attempts + 1,
                "next_attempt_at": later,
                "last_phase": "data",
                "last_code": 250,
                "last_enhanced": "2.0.0",
                "last_reply": "250 2.0.0 Ok",
            }
            for c in claimed
        ]
        assert len(rows) == 500, len(rows)
        fence = {"state": S.SENDING.value, "lease_until": lease}
        constant = {"lease_until": None, "updated_at": later}
        bulk.update_rows(session, Delivery, "id", rows, fence=fence, constant=constant)

    return work


def dispatcher_pass(scene: Scene, *, due: bool) -> Callable[[Session], Any]:
    """A dispatcher pass's statements (expire, the due scan of each priority, the publishing
    UPDATE) with an empty queue; `due`: two hours from now, when the deferred deliveries are
    due."""

    def work(session: Session) -> None:
        when = scene.now + timedelta(hours=2 if due else 0)
        settings = load()
        outcomes.expire(session, when, since=when - timedelta(days=4))
        relay_health.block(session, settings.smtp.name, when)
        found = dispatcher.due(session, settings, when, queue_empty=True)
        dispatcher.mark_published(session, [i for i, _ in found], when)

    return work


def running_campaign(scene: Scene, published_ago: str) -> list[str]:
    """Statements that make campaign `scene.campaign + 2` a running one: every delivery queued,
    due an hour ago and published `published_ago` (an interval), waiting for a worker."""
    message = scene.campaign + 2
    return [
        "UPDATE deliveries SET state = 'queued', next_attempt_at = now() - interval '1 hour', "
        f"published_at = now() - interval '{published_ago}' WHERE message_id = {message}"
    ]


def dispatch_scan(
    when: datetime, *, queue_empty: bool, republish_after: int
) -> Callable[[Session], Any]:
    """The dispatcher's scan for what to publish (its read only)."""

    def work(session: Session) -> Any:
        settings = load()
        settings = replace(settings, republish_after=republish_after)
        return dispatcher.due(session, settings, when, queue_empty=queue_empty)

    return work


def cli(scene: Scene) -> dict[str, Callable[[Session], Any]]:
    chosen = DeliveryFilter(campaign_id=scene.campaign, states=(S.FAILED, S.UNKNOWN))
    everything = DeliveryFilter(campaign_id=scene.campaign)
    addresses = [f"someone{i}@example.org" for i in range(100)]
    return {
        "status": lambda s: queries.campaign_status(s, scene.campaign),
        "report": lambda s: list(itertools.islice(queries.report(s, scene.campaign), 10)),
        "retry dry run": lambda s: outcomes.retry_candidates(
            s, chosen.ids(), include_suppressed=False
        ),
        "retry": lambda s: outcomes.requeue(s, chosen.ids(), scene.now, include_suppressed=False),
        "cancel": lambda s: outcomes.cancel(s, everything.ids(), scene.now),
        "suppress add": lambda s: suppressions.add_checked(s, addresses, "manual", scene.now),
        "suppress remove": lambda s: suppressions.remove(s, addresses),
    }


def _page(f: DeliveryFilter, after: int | None = None) -> Callable[[Session], Any]:
    return lambda s: browse.deliveries_page(s, f, after)


def dashboard(scene: Scene) -> dict[str, Callable[[Session], Any]]:
    """The web's pages (browse.py) and the actions' dry runs and bulk statements."""
    c = scene.campaign
    first = (c - 1) * scene.campaign_size + 1
    someone = f"user{first + 7}@example{(first + 7) % 100}.com"
    everything = DeliveryFilter(campaign_id=c)
    failed = DeliveryFilter(campaign_id=c, states=(S.FAILED, S.UNKNOWN))
    pages = {
        "page: campaign": everything,
        "page: campaign, failed": failed,
        "page: campaign, class": DeliveryFilter(campaign_id=c, reply_class=ReplyClass.HARD_BOUNCE),
        "page: campaign, domain": DeliveryFilter(campaign_id=c, domain="example7.com"),
        "page: campaign, 4xx, reply text": DeliveryFilter(
            campaign_id=c, code="4xx", reply_contains="ok"
        ),
        "page: recipient": DeliveryFilter(recipient=someone),
    }
    operator = actions.Actor("plans", actions.Role.OPERATOR)
    out = {name: _page(f) for name, f in pages.items()}
    out["page: campaign, next"] = _page(everything, first + 50)
    out.update(
        {
            "breakdown": lambda s: breakdowns.compute(s, c, sent=0, now=clock.now()),
            "recipient history": lambda s: browse.recipient_history(s, someone),
            "export csv": lambda s: list(itertools.islice(browse.export_csv(s, failed), 100)),
            "audit page": lambda s: browse.audit_page(s, None),
            "overview": lambda s: (
                overview.queue_depth(s, overview.Rates()),
                overview.transactional_latency(s),
                overview.oldest_due(s, scene.now),
            ),
            "suppressions page": lambda s: browse.suppressions_page(s, None, "user5"),
            "suppressions search": lambda s: browse.suppressions_page(s, "example7.", "user5"),
            "preview retry": lambda s: actions.preview(s, actions.Action.RETRY, failed),
            "preview cancel": lambda s: actions.preview(s, actions.Action.CANCEL, everything),
            "preview suppress": lambda s: actions.preview(s, actions.Action.SUPPRESS, failed),
            "preview unsuppress": lambda s: actions.preview(s, actions.Action.UNSUPPRESS, failed),
            "preview pause": lambda s: actions.preview_campaign(s, c),
            "suppress by filter": lambda s: actions.suppress(s, operator, failed, now=scene.now),
            "unsuppress by filter": lambda s: actions.unsuppress(s, operator, failed),
            "retry by filter": lambda s: actions.retry(s, operator, failed, now=scene.now),
        }
    )
    return out


def scenes(scene: Scene) -> dict[str, Callable[[Session], Any]]:
    return {
        "worker chunk": worker_chunk(scene),
        "dispatcher pass (none due)": dispatcher_pass(scene, due=False),
        "dispatcher pass (due)": dispatcher_pass(scene, due=True),
        **cli(scene),
        **dashboard(scene),
    }


def describe(name: str, statements: list[Statement]) -> str:
    lines = [f"== {name}"]
    for st in statements:
        first = " ".join(st.sql.split())[:110]
        scans = ", ".join(f"{k} {r}{' ' + i if i else ''}" for k, r, i in st.scans()) or "-"
        lines.append(f"  {st.seconds * 1000:8.1f} ms  {first}\n              {scans}")
    return "\n".join(lines)


def main() -> None:
    import os

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import outbox_scale

    base = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    schema = os.environ.get("PLANS_SCHEMA", "s1_scale")
    if os.environ.get("PLANS_BUILD") == "1":
        size = int(os.environ.get("PLANS_CAMPAIGN_SIZE", "100000"))
        outbox_scale.build(base, schema, n, campaign_size=size)
    url = outbox_scale.url_for(base, schema)
    os.environ["MAILER_DATABASE_URL"] = url
    config.reload()
    size = int(os.environ.get("PLANS_CAMPAIGN_SIZE", "100000"))
    scene = Scene(n, int(os.environ.get("PLANS_CAMPAIGN", "5")), clock.now(), size)
    only = os.environ.get("PLANS_ONLY")
    for name, work in scenes(scene).items():
        if only and only not in name:
            continue
        print(describe(name, capture(url, work)), flush=True)


if __name__ == "__main__":
    main()

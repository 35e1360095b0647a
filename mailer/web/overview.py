"""The overview page: campaigns with live progress, the queue, the transactional latency, the
oldest due delivery, relays."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from mailer import clock, config, db
from mailer import overview as reads
from mailer.web.app import PageRoute
from mailer.web.render import page

# one per process: the rate of a campaign is the change of its counts between two polls
RATES = reads.Rates()


@dataclass(frozen=True)
class Overview:
    campaigns: list[reads.CampaignRow]
    before: int | None
    queue: reads.QueueDepth
    latency: reads.Latency | None
    oldest: reads.Oldest | None
    relays: list[reads.RelayRow]
    relay_name: str


def read(before: int | None) -> Overview:
    with db.read_scope() as session:
        rows, more = reads.campaigns(session, RATES, before)
        return Overview(
            campaigns=rows,
            before=more,
            queue=reads.queue_depth(session, RATES),
            latency=reads.transactional_latency(session),
            oldest=reads.oldest_due(session, clock.now()),
            relays=reads.relays(session),
            relay_name=config.settings().smtp.name,
        )


def _before(request: Request) -> int | None:
    value = request.query_params.get("before", "")
    return int(value) if value.isdigit() else None


async def show(request: Request) -> Response:
    before = _before(request)
    data = await run_in_threadpool(read, before)
    return page(request, "overview.html", data=data, page_before=before, **_helpers())


async def live(request: Request) -> Response:
    before = _before(request)
    data = await run_in_threadpool(read, before)
    return page(request, "overview_live.html", data=data, page_before=before, **_helpers())


def _helpers() -> dict[str, Any]:
    from mailer.web.render import duration

    return {"duration": duration, "now": clock.now()}


def routes() -> Iterable[PageRoute]:
    return [PageRoute("/", show), PageRoute("/live/overview", live)]

"""A campaign's page: counts per state, reply class and domain, its deliveries by filter a page
at a time (keyset on the id), and the CSV export of any filter."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from mailer import breakdowns, browse, db, queries
from mailer.errors import MailerError
from mailer.filters import FORMS, DeliveryFilter
from mailer.models import DeliveryState
from mailer.replies import ReplyClass
from mailer.web.actions import failed, filter_params
from mailer.web.app import PageRoute
from mailer.web.render import page

PAGE_SIZE = 50
# the filter fields offered on a campaign's page (the campaign is the page's own)
FIELDS = [k for k in FORMS if k not in ("campaign", "message", "delivery")]


@dataclass(frozen=True)
class CampaignView:
    status: queries.CampaignStatus
    deliveries: browse.Page[browse.DeliveryRow]


def _filter(request: Request) -> tuple[dict[str, str], DeliveryFilter]:
    """The page's filter: the query string's fields, within this campaign."""
    params = {k: v for k, v in filter_params(request.query_params).items() if k in FIELDS}
    campaign_id = int(request.path_params["campaign_id"])
    return params, DeliveryFilter.from_params({**params, "campaign": str(campaign_id)})


def _after(request: Request) -> int | None:
    value = request.query_params.get("after", "")
    return int(value) if value.isdigit() else None


def read(campaign_id: int, f: DeliveryFilter, after: int | None) -> CampaignView:
    with db.read_scope() as session:
        return CampaignView(
            status=queries.campaign_status(session, campaign_id),
            deliveries=browse.deliveries_page(session, f, after, PAGE_SIZE),
        )


def _breakdown(campaign_id: int) -> breakdowns.Breakdown:
    # a session that may write: breakdowns.get keeps what it computes
    with db.session_scope() as session:
        queries.campaign(session, campaign_id)  # NotFound for a campaign that is not
        return breakdowns.get(session, campaign_id)


def _status(campaign_id: int) -> queries.CampaignStatus:
    with db.read_scope() as session:
        return queries.campaign_status(session, campaign_id)


async def show(request: Request) -> Response:
    campaign_id = int(request.path_params["campaign_id"])
    try:
        params, f = _filter(request)
        view = await run_in_threadpool(read, campaign_id, f, _after(request))
    except (MailerError, ValueError) as exc:
        return failed(request, exc)
    scoped = {"campaign": str(campaign_id), **params}
    return page(
        request,
        "campaign.html",
        view=view,
        params=params,
        fields=FIELDS,
        forms=FORMS,
        states=[s.value for s in DeliveryState],
        classes=[c.value for c in ReplyClass],
        query=urlencode(params),
        scoped_query=urlencode(scoped),
        next_query=_next_query(params, view.deliveries.next_after),
    )


def _next_query(params: dict[str, str], after: Any) -> str | None:
    return None if after is None else urlencode({**params, "after": str(after)})


async def live(request: Request) -> Response:
    campaign_id = int(request.path_params["campaign_id"])
    try:
        status = await run_in_threadpool(_status, campaign_id)
    except MailerError as exc:
        return failed(request, exc)
    return page(request, "campaign_live.html", status=status)


async def breakdown(request: Request) -> Response:
    """The counts by reply class and domain: a fragment of its own, which the page loads after
    it is shown (when breakdowns.get computes it again, it reads the whole campaign's index
    entries; the rest of the page does not)."""
    campaign_id = int(request.path_params["campaign_id"])
    try:
        found = await run_in_threadpool(_breakdown, campaign_id)
    except MailerError as exc:
        return failed(request, exc)
    # htmx asks for the fragment; a link followed without it gets a whole page
    name = "campaign_breakdown" + ("" if request.headers.get("hx-request") else "_page")
    return page(request, f"{name}.html", breakdown=found, campaign_id=campaign_id)


async def export(request: Request) -> Response:
    campaign_id = int(request.path_params["campaign_id"])
    try:
        _, f = _filter(request)
        await run_in_threadpool(_status, campaign_id)  # NotFound before the download starts
    except (MailerError, ValueError) as exc:
        return failed(request, exc)

    def lines() -> Iterator[str]:
        with db.read_scope() as session:
            yield from browse.export_csv(session, f)

    name = f"campaign-{campaign_id}-deliveries.csv"
    return StreamingResponse(
        lines(),
        media_type="text/csv; charset=utf-8",
        headers={"content-disposition": f'attachment; filename="{name}"'},
    )


def routes() -> Iterable[PageRoute]:
    return [
        PageRoute("/campaigns/{campaign_id:int}", show),
        PageRoute("/campaigns/{campaign_id:int}/live", live),
        PageRoute("/campaigns/{campaign_id:int}/breakdown", breakdown),
        PageRoute("/campaigns/{campaign_id:int}/export.csv", export),
    ]

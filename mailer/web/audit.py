"""The audit list: every operator action, newest first (who, when, what, how many)."""

from __future__ import annotations

import json
from collections.abc import Iterable

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from mailer import browse, db
from mailer.web.app import PageRoute
from mailer.web.render import page

PAGE_SIZE = 50


def read(after: int | None) -> browse.Page[browse.AuditRow]:
    with db.read_scope() as session:
        return browse.audit_page(session, after, PAGE_SIZE)


async def listing(request: Request) -> Response:
    value = request.query_params.get("after", "")
    found = await run_in_threadpool(read, int(value) if value.isdigit() else None)
    return page(request, "audit.html", found=found, as_json=_as_json)


def _as_json(target: dict[str, object]) -> str:
    return json.dumps(target, ensure_ascii=False, sort_keys=True)


def routes() -> Iterable[PageRoute]:
    return [PageRoute("/audit", listing)]

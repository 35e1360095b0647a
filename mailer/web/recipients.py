"""Search by recipient: every message to an address, each attempt with the server's reply,
what mailer concluded and why, and when it tries next."""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlencode

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from mailer import browse, db
from mailer.web.app import PageRoute
from mailer.web.render import page

MAX_ADDRESS = 320


def read(address: str) -> list[browse.MessageHistory]:
    with db.read_scope() as session:
        return browse.recipient_history(session, address)


async def search(request: Request) -> Response:
    address = request.query_params.get("q", "").strip()[:MAX_ADDRESS]
    history = await run_in_threadpool(read, address) if "@" in address else []
    return page(
        request,
        "recipients.html",
        q=address,
        history=history,
        searched="@" in address,
        scoped_query=urlencode({"recipient": address}),
    )


def routes() -> Iterable[PageRoute]:
    return [PageRoute("/recipients", search)]

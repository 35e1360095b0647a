"""The suppression list: search, add and remove (a dry-run count first), import, export."""

from __future__ import annotations

import csv
import io
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from urllib.parse import urlencode

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from mailer import actions, browse, db, recipients
from mailer.errors import InputError, MailerError
from mailer.models import Role
from mailer.web.actions import actor, confirm, failed, finished, in_session
from mailer.web.app import PageRoute
from mailer.web.render import page

PAGE_SIZE = 50
MAX_ADDRESSES = 1000
CHANGES = {
    "add": (
        actions.Action.SUPPRESS,
        "Suppress addresses",
        "{n} of these addresses would be added.",
    ),
    "remove": (
        actions.Action.UNSUPPRESS,
        "Unsuppress addresses",
        "{n} of these addresses would be taken off the list.",
    ),
}


def read(search: str, after: str | None) -> browse.Page[browse.SuppressionRow]:
    with db.read_scope() as session:
        return browse.suppressions_page(session, search, after, PAGE_SIZE)


async def listing(request: Request) -> Response:
    search = request.query_params.get("q", "").strip()[:320]
    after = request.query_params.get("after") or None
    found = await run_in_threadpool(read, search, after)
    following = None
    if found.next_after is not None:
        following = urlencode({"q": search, "after": found.next_after})
    return page(request, "suppressions.html", q=search, found=found, following=following)


def _addresses(text: str) -> list[str]:
    found = [a for a in text.replace(",", " ").split() if a]
    if not found:
        raise InputError("give one address or more, one a line")
    if len(found) > MAX_ADDRESSES:
        raise InputError(f"at most {MAX_ADDRESSES} addresses at once: import a file for more")
    return found


async def preview(request: Request) -> Response:
    """POST, not GET: the addresses stay out of URLs and logs."""
    form = await request.form()
    change = str(form.get("do") or "")
    reason = str(form.get("reason") or "added by an operator")[:500]
    try:
        if change not in CHANGES:
            raise InputError("do is add or remove")
        action, title, line = CHANGES[change]
        given = _addresses(str(form.get("addresses") or ""))
        n = await in_session(actions.preview_addresses, action, given)
    except (MailerError, ValueError) as exc:
        return failed(request, exc)
    hidden = {"addresses": "\n".join(given), "reason": reason}
    return confirm(
        request,
        title,
        line.format(n=f"{n:,}"),
        ", ".join(given[:20]),
        f"/suppressions/{change}",
        hidden,
        back="/suppressions",
    )


async def change(request: Request) -> Response:
    form = await request.form()
    adding = request.url.path.endswith("/add")
    who = actor(request)
    try:
        given = _addresses(str(form.get("addresses") or ""))
        if adding:
            reason = str(form.get("reason") or "added by an operator")[:500]
            done = await in_session(
                lambda s: actions.suppress_addresses(s, who, given, reason=reason)
            )
        else:
            done = await in_session(actions.unsuppress_addresses, who, given)
    except (MailerError, ValueError) as exc:
        return failed(request, exc)
    line = f"{done.count:,} {'added to' if adding else 'taken off'} the suppression list."
    return finished(request, "Suppression list", line, done, "/suppressions")


def _import(path: Path, who: actions.Actor, reason: str, name: str) -> actions.Done:
    with db.session_scope() as session:
        return actions.import_suppressions(
            session, who, recipients.read(path), reason=reason, source=name
        )


async def upload(request: Request) -> Response:
    """A CSV or JSON Lines file with an 'email' column, as the export writes it."""
    form = await request.form()
    file = form.get("file")
    reason = str(form.get("reason") or "imported")[:500]
    if not isinstance(file, UploadFile) or not file.filename:
        return failed(request, InputError("choose a .csv or .jsonl file to import"))
    suffix = Path(file.filename).suffix.lower()
    with tempfile.NamedTemporaryFile(suffix=suffix) as saved:
        while chunk := await file.read(1 << 20):
            saved.write(chunk)
        saved.flush()
        try:
            done = await run_in_threadpool(
                _import, Path(saved.name), actor(request), reason, file.filename
            )
        except MailerError as exc:
            return failed(request, InputError(f"{file.filename}: {exc}"))
    line = f"{done.count:,} added ({done.target['read'] - done.count:,} were already listed)."
    return finished(request, "Import", line, done, "/suppressions")


async def export(request: Request) -> Response:
    who = actor(request)

    def lines() -> Iterator[str]:
        with db.session_scope() as session:
            _, entries = actions.export_suppressions(session, who)
            session.commit()  # the audit row is kept even if the download is cut short
            yield _line(["email", "reason", "created_at"])
            for entry in entries:
                yield _line([entry.address, entry.reason, entry.created_at.isoformat()])

    return StreamingResponse(
        lines(),
        media_type="text/csv; charset=utf-8",
        headers={"content-disposition": 'attachment; filename="suppressions.csv"'},
    )


def _line(values: list[str]) -> str:
    out = io.StringIO()
    csv.writer(out).writerow(values)
    return out.getvalue()


def routes() -> Iterable[PageRoute]:
    op = Role.OPERATOR
    return [
        PageRoute("/suppressions", listing),
        PageRoute("/suppressions/export.csv", export),
        PageRoute("/suppressions/preview", preview, op, ("POST",)),
        PageRoute("/suppressions/add", change, op, ("POST",)),
        PageRoute("/suppressions/remove", change, op, ("POST",)),
        PageRoute("/suppressions/import", upload, op, ("POST",)),
    ]

"""Operators' actions: each shows its dry-run count first, then runs on confirmation.

GET shows how many rows the action would change (mailer.actions' preview, nothing written)
and a form to confirm; POST runs the action through mailer.actions, the implementation the
CLI shares, which checks the role and writes the audit row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlencode

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import Response

from mailer import actions, db
from mailer.errors import MailerError, NotFound, PermissionDenied
from mailer.filters import FORMS, DeliveryFilter
from mailer.models import Role
from mailer.web.accounts import Account
from mailer.web.app import PageRoute
from mailer.web.render import page, refusal

T = TypeVar("T")


@dataclass(frozen=True)
class Wording:
    title: str
    preview: str  # "{n} ..." before the confirmation
    done: str  # "{n} ..." after it


FILTER_ACTIONS: dict[str, tuple[actions.Action, Wording]] = {
    "retry": (
        actions.Action.RETRY,
        Wording(
            "Retry",
            "{n} deliveries would be queued again with a fresh attempt budget.",
            "{n} deliveries queued again; the dispatcher publishes them on its next pass.",
        ),
    ),
    "cancel": (
        actions.Action.CANCEL,
        Wording(
            "Cancel",
            "{n} deliveries not yet sent would be cancelled.",
            "{n} deliveries cancelled.",
        ),
    ),
    "suppress": (
        actions.Action.SUPPRESS,
        Wording(
            "Suppress",
            "{n} addresses would be added to the suppression list.",
            "{n} addresses added to the suppression list.",
        ),
    ),
    "unsuppress": (
        actions.Action.UNSUPPRESS,
        Wording(
            "Unsuppress",
            "{n} addresses would be taken off the suppression list.",
            "{n} addresses taken off the suppression list.",
        ),
    ),
}


def actor(request: Request) -> actions.Actor:
    user: Account = request.state.user
    return actions.Actor(user.name, user.role)


def filter_params(values: Mapping[str, Any]) -> dict[str, str]:
    """The filter's fields of a query string or a form, and nothing else."""
    return {k: str(values[k]) for k in FORMS if isinstance(values.get(k), str) and values[k]}


async def in_session(work: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`work(session, ...)` in one transaction, in a thread (the event loop never waits)."""

    def run() -> T:
        with db.session_scope() as session:
            return work(session, *args, **kwargs)

    return await run_in_threadpool(run)


def failed(request: Request, exc: MailerError | ValueError) -> Response:
    if isinstance(exc, PermissionDenied):
        return refusal(request, 403, "Not allowed", str(exc))
    if isinstance(exc, NotFound):
        return refusal(request, 404, "Not found", str(exc))
    return refusal(request, 400, "Cannot do that", str(exc))


def _verb(request: Request) -> tuple[str, actions.Action, Wording]:
    verb = str(request.path_params["action"])
    if verb not in FILTER_ACTIONS:
        raise NotFound(f"no action {verb!r}: the actions are {', '.join(FILTER_ACTIONS)}")
    return (verb, *FILTER_ACTIONS[verb])


async def preview_filter(request: Request) -> Response:
    try:
        verb, action, words = _verb(request)
        params = filter_params(request.query_params)
        target = DeliveryFilter.from_params(params)
        include = verb == "retry" and request.query_params.get("include_suppressed") == "1"
        n = await in_session(actions.preview, action, target, include_suppressed=include)
    except (MailerError, ValueError) as exc:
        return failed(request, exc)
    hidden = {**params, **({"include_suppressed": "1"} if include else {})}
    return confirm(
        request,
        words.title,
        words.preview.format(n=f"{n:,}"),
        target.describe(),
        f"/actions/{verb}",
        hidden,
        back=_back(params),
    )


async def run_filter(request: Request) -> Response:
    form = await request.form()
    try:
        verb, _, words = _verb(request)
        params = filter_params(form)
        target = DeliveryFilter.from_params(params)
        include = verb == "retry" and form.get("include_suppressed") == "1"
        who = actor(request)
        run = {
            "retry": lambda s: actions.retry(s, who, target, include_suppressed=include),
            "cancel": lambda s: actions.cancel(s, who, target),
            "suppress": lambda s: actions.suppress(s, who, target),
            "unsuppress": lambda s: actions.unsuppress(s, who, target),
        }[verb]
        done = await in_session(run)
    except (MailerError, ValueError) as exc:
        return failed(request, exc)
    return finished(
        request, words.title, words.done.format(n=f"{done.count:,}"), done, _back(params)
    )


def _back(params: Mapping[str, str]) -> str:
    campaign = params.get("campaign")
    rest = {k: v for k, v in params.items() if k != "campaign"}
    if campaign:
        return f"/campaigns/{campaign}" + (f"?{urlencode(rest)}" if rest else "")
    if params.get("recipient"):
        return "/recipients?" + urlencode({"q": params["recipient"]})
    return "/"


def confirm(  # noqa: PLR0913 (what the confirmation page shows, each named)
    request: Request,
    title: str,
    count_line: str,
    target: str,
    action_url: str,
    hidden: Mapping[str, str],
    back: str,
) -> Response:
    return page(
        request,
        "confirm.html",
        title=title,
        count_line=count_line,
        target=target,
        action_url=action_url,
        hidden=hidden,
        back=back,
    )


def finished(request: Request, title: str, line: str, done: actions.Done, back: str) -> Response:
    return page(request, "done.html", title=title, line=line, done=done, back=back)


# --- campaigns and relays --------------------------------------------------------------------


def _campaign_id(request: Request) -> int:
    return int(request.path_params["campaign_id"])


async def preview_pause(request: Request) -> Response:
    campaign_id = _campaign_id(request)
    pausing = request.url.path.endswith("/pause")
    try:
        n = await in_session(actions.preview_campaign, campaign_id)
    except (MailerError, ValueError) as exc:
        return failed(request, exc)
    line = (
        f"{n:,} waiting deliveries would be held back until the campaign is resumed."
        if pausing
        else f"{n:,} waiting deliveries would be handed out again."
    )
    verb = "pause" if pausing else "resume"
    return confirm(
        request,
        f"{verb.capitalize()} campaign {campaign_id}",
        line,
        f"campaign={campaign_id}",
        f"/campaigns/{campaign_id}/{verb}",
        {},
        back=f"/campaigns/{campaign_id}",
    )


async def run_pause(request: Request) -> Response:
    campaign_id = _campaign_id(request)
    pausing = request.url.path.endswith("/pause")
    who = actor(request)
    act = actions.pause_campaign if pausing else actions.resume_campaign
    try:
        done = await in_session(act, who, campaign_id)
    except (MailerError, ValueError) as exc:
        return failed(request, exc)
    line = f"campaign {campaign_id} {'paused' if pausing else 'resumed'} ({done.count:,} waiting)."
    return finished(request, "Campaign", line, done, f"/campaigns/{campaign_id}")


def _relay(values: Mapping[str, Any]) -> str | None:
    name = values.get("relay")
    return name if isinstance(name, str) and name else None


async def preview_relay(request: Request) -> Response:
    relay = _relay(request.query_params)
    n = await in_session(actions.preview_relay, relay)
    line = (
        "The relay is paused or resting: resuming lets the workers use it at once."
        if n
        else "The relay is healthy: resuming changes nothing."
    )
    hidden = {"relay": relay} if relay else {}
    return confirm(
        request,
        "Resume the relay",
        line,
        f"relay={relay or 'configured'}",
        "/relays/resume",
        hidden,
        back="/",
    )


async def run_relay(request: Request) -> Response:
    form: FormData = await request.form()
    relay = _relay(form)
    try:
        done = await in_session(actions.resume_relay, actor(request), relay)
    except (MailerError, ValueError) as exc:
        return failed(request, exc)
    return finished(request, "Relay", f"relay {done.target['relay']} resumed.", done, "/")


def routes() -> Iterable[PageRoute]:
    op = Role.OPERATOR
    return [
        PageRoute("/actions/{action}", preview_filter, op),
        PageRoute("/actions/{action}", run_filter, op, ("POST",)),
        PageRoute("/campaigns/{campaign_id:int}/pause", preview_pause, op),
        PageRoute("/campaigns/{campaign_id:int}/pause", run_pause, op, ("POST",)),
        PageRoute("/campaigns/{campaign_id:int}/resume", preview_pause, op),
        PageRoute("/campaigns/{campaign_id:int}/resume", run_pause, op, ("POST",)),
        PageRoute("/relays/resume", preview_relay, op),
        PageRoute("/relays/resume", run_relay, op, ("POST",)),
    ]

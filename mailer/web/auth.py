"""Who is asking: the signed session, the trusted-proxy header, CSRF tokens and roles.

Every route but /login, /healthz and /static is built by `guard`, which answers a visitor
without a session with the login page, refuses a POST without the session's CSRF token and a
user whose role is below the route's, all before the route runs.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from mailer import clock, db
from mailer.config import WebSettings
from mailer.models import Role
from mailer.web import accounts
from mailer.web.ratelimit import Limiter
from mailer.web.render import page, refusal

Endpoint = Callable[[Request], Awaitable[Response]]
CSRF_FIELD = "csrf"
CSRF_HEADER = "x-csrf-token"


@dataclass(frozen=True)
class Auth:
    """What the guard needs, fixed when the app is made."""

    web: WebSettings
    per_user: Limiter
    per_address: Limiter


def csrf_token(request: Request) -> str:
    """The session's token, made on first use (a visitor gets one before logging in)."""
    token = request.session.get("csrf")
    if not token:
        token = request.session["csrf"] = secrets.token_urlsafe(32)
    return str(token)


async def csrf_ok(request: Request) -> bool:
    expected = request.session.get("csrf")
    if not expected:
        return False
    given = request.headers.get(CSRF_HEADER)
    if given is None:
        form = await request.form()
        value = form.get(CSRF_FIELD)
        given = value if isinstance(value, str) else None
    return given is not None and hmac.compare_digest(given.encode(), str(expected).encode())


def peer(request: Request) -> str:
    return request.client.host if request.client else ""


def client_address(request: Request, web: WebSettings) -> str:
    """The address a login is counted against: behind a trusted proxy, the last address it
    added to X-Forwarded-For (what the proxy saw), else the connection's own."""
    address = peer(request)
    if _trusted(address, web):
        forwarded = request.headers.get("x-forwarded-for", "")
        hops = [hop.strip() for hop in forwarded.split(",") if hop.strip()]
        if hops:
            return hops[-1]
    return address


def _trusted(address: str, web: WebSettings) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in web.trusted_proxies)


def _lookup(name: str) -> accounts.Account | None:
    with db.read_scope() as session:
        return accounts.get(session, name)


async def current_user(request: Request, auth: Auth) -> accounts.Account | None:
    """The signed-in account, checked against the database on each request (a removed user
    or a changed password ends the session), or the one a trusted proxy names."""
    header = auth.web.trusted_header
    if header and _trusted(peer(request), auth.web):
        name = request.headers.get(header)
        if name:
            return await run_in_threadpool(_lookup, name.strip())
    name, stamp = request.session.get("user"), request.session.get("stamp")
    if not isinstance(name, str) or not isinstance(stamp, str):
        return None
    account = await run_in_threadpool(_lookup, name)
    if account is None or not accounts.same_stamp(account.stamp, stamp):
        request.session.pop("user", None)
        return None
    return account


def guard(endpoint: Endpoint, role: Role, auth: Auth) -> Endpoint:
    """The endpoint behind login, CSRF (on POST) and role checks."""

    async def guarded(request: Request) -> Response:
        user = await current_user(request, auth)
        if user is None:
            return _to_login(request)
        request.state.user = user
        csrf_token(request)
        if request.method == "POST" and not await csrf_ok(request):
            return csrf_refused(request)
        if not user.may(role):
            return refusal(
                request,
                403,
                "Not allowed",
                f"You are signed in as {user.name} ({user.role.value}); this needs the "
                f"{role.value} role. An admin can change it with `mailer user add`.",
            )
        return await endpoint(request)

    return guarded


def csrf_refused(request: Request) -> Response:
    return refusal(
        request,
        403,
        "Form expired or forged",
        "This request did not carry the page's security token (CSRF), so nothing was done. "
        "Go back, reload the page and submit it again.",
    )


def _to_login(request: Request) -> Response:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    location = f"/login?next={quote(target, safe='')}"
    if request.headers.get("hx-request"):
        return Response(status_code=401, headers={"HX-Redirect": location})
    if request.method != "GET":
        return refusal(request, 401, "Signed out", "Your session ended: sign in again.")
    return RedirectResponse(location, status_code=303)


def safe_next(target: str | None) -> str:
    """Only a path on this site: never another host (an open redirect)."""
    if not target or not target.startswith("/") or target.startswith("//"):
        return "/"
    parts = urlsplit(target)
    return "/" if parts.scheme or parts.netloc or "\\" in target else target


def login_routes(auth: Auth) -> tuple[Endpoint, Endpoint, Endpoint]:
    """GET /login, POST /login, POST /logout."""

    async def form(request: Request) -> Response:
        csrf_token(request)
        return page(request, "login.html", next=safe_next(request.query_params.get("next")))

    async def submit(request: Request) -> Response:
        if not await csrf_ok(request):
            return csrf_refused(request)
        data = await request.form()
        name = str(data.get("name") or "").strip()
        password = str(data.get("password") or "")
        target = safe_next(str(data.get("next") or "/"))
        keys = (f"user:{name.lower()}", f"addr:{client_address(request, auth.web)}")
        if auth.per_user.blocked(keys[0]) or auth.per_address.blocked(keys[1]):
            return page(
                request,
                "login.html",
                http_status=429,
                next=target,
                error="Too many failed sign-ins: wait a quarter of an hour and try again.",
            )
        account = await run_in_threadpool(_authenticate, name, password)
        if account is None:
            auth.per_user.failed(keys[0])
            auth.per_address.failed(keys[1])
            return page(
                request, "login.html", http_status=401, next=target, error="Wrong name or password."
            )
        auth.per_user.clear(keys[0])
        request.session.clear()  # a new session on login: nothing fixed before it survives
        request.session.update({"user": account.name, "stamp": account.stamp})
        csrf_token(request)
        return RedirectResponse(target, status_code=303)

    async def logout(request: Request) -> Response:
        if not await csrf_ok(request):
            return csrf_refused(request)
        request.session.clear()
        return RedirectResponse("/login", status_code=303)

    return form, submit, logout


def _authenticate(name: str, password: str) -> accounts.Account | None:
    with db.session_scope() as session:
        return accounts.authenticate(session, name, password, clock.now())

"""The application: middleware (signed session, security headers), routes, error pages."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mailer import config
from mailer.config import WebSettings
from mailer.errors import ConfigError
from mailer.models import Role
from mailer.web import auth, ratelimit
from mailer.web.render import STATIC, refusal

SESSION_COOKIE = "mailer_session"
SESSION_SECONDS = 12 * 3600
LOGIN_LIMIT_PER_USER = (5, 900.0)  # failures, seconds
LOGIN_LIMIT_PER_ADDRESS = (20, 900.0)

# scripts and styles from this site only: a reply that slipped past escaping still could not
# run inline code; htmx is told not to evaluate anything (meta htmx-config in base.html)
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'"
)


@dataclass(frozen=True)
class PageRoute:
    """A route of a page family: who may use it is said where it is declared."""

    path: str
    endpoint: auth.Endpoint
    role: Role = Role.VIEWER
    methods: Sequence[str] = ("GET",)


class SecurityHeaders:
    """Headers on every response: the CSP, no framing, no sniffing, no caching of pages."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = str(scope.get("path", "")).startswith("/static/")

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [
                    (b"content-security-policy", CSP.encode()),
                    (b"x-frame-options", b"DENY"),
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"same-origin"),
                ]
                if not static:
                    headers.append((b"cache-control", b"no-store"))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, sending)


def page_modules() -> list[Iterable[PageRoute]]:
    from mailer.web import actions, audit, campaigns, overview, recipients, suppressions

    return [
        overview.routes(),
        audit.routes(),
        campaigns.routes(),
        recipients.routes(),
        suppressions.routes(),
        actions.routes(),
    ]


def create_app(
    web: WebSettings,
    *,
    broker_url: str | None = None,
    metrics: ASGIApp | None = None,
) -> Starlette:
    """The dashboard. `metrics`, when given, is served unauthenticated at /metrics (the
    metrics module's ASGI app; it may instead listen on a port of its own)."""
    if not web.secret:
        raise ConfigError("MAILER_WEB_SECRET", "is required by mailer web")
    broker = broker_url or config.settings().broker_url
    guard = auth.Auth(
        web,
        per_user=ratelimit.for_broker(broker, *LOGIN_LIMIT_PER_USER),
        per_address=ratelimit.for_broker(broker, *LOGIN_LIMIT_PER_ADDRESS),
    )
    login_form, login_submit, logout = auth.login_routes(guard)
    routes: list[BaseRoute] = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/login", login_form, methods=["GET"]),
        Route("/login", login_submit, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Mount("/static", app=StaticFiles(directory=STATIC), name="static"),
    ]
    if metrics is not None:
        routes.append(Route("/metrics", _Asgi(metrics), methods=["GET"]))
    for family in page_modules():
        for spec in family:
            endpoint = auth.guard(spec.endpoint, spec.role, guard)
            routes.append(Route(spec.path, endpoint, methods=list(spec.methods)))
    return Starlette(
        routes=routes,
        middleware=[
            Middleware(SecurityHeaders),
            Middleware(
                SessionMiddleware,
                secret_key=web.secret,
                session_cookie=SESSION_COOKIE,
                max_age=SESSION_SECONDS,
                same_site="lax",
                https_only=web.cookie_secure,
            ),
        ],
        exception_handlers={HTTPException: _http_error, Exception: _server_error},
    )


class _Asgi:
    """An ASGI app as a route's endpoint (Starlette wraps a plain function as a request
    handler, not as an app)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


async def healthz(request: Request) -> Response:
    return PlainTextResponse("ok\n")


async def _http_error(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    detail = exc.detail if isinstance(exc, HTTPException) else ""
    titles = {404: "Not found", 405: "Method not allowed"}
    return refusal(request, status, titles.get(status, "Error"), str(detail))


async def _server_error(request: Request, exc: Exception) -> Response:
    # the traceback goes to the server's log (uvicorn), never to the page
    return refusal(request, 500, "Server error", "Something failed on the server; see its log.")


def from_environment() -> Starlette:
    """The app from MAILER_* settings (uvicorn's factory, in each server process)."""
    from mailer import db

    db.set_role("producer")
    return create_app(config.web(), metrics=_metrics_app())


def _metrics_app() -> ASGIApp | None:
    """The metrics module's ASGI app when it is installed (the seam for /metrics)."""
    try:
        from mailer import metrics  # type: ignore[attr-defined, unused-ignore]
    except ImportError:
        return None
    make = getattr(metrics, "asgi_app", None)
    return make() if callable(make) else None

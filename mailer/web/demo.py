"""`mailer demo --web`: the dashboard on the demo's database, with a login made for it."""

from __future__ import annotations

import secrets

import click

from mailer import clock, db
from mailer.config import WebSettings
from mailer.models import Role

DEMO_USER = "demo"


def serve(host: str = "127.0.0.1", port: int = 8025) -> None:
    """Serve until Ctrl-C, signed in as `demo` (an operator) with a fresh password."""
    import uvicorn

    from mailer.web import accounts
    from mailer.web.app import create_app

    password = secrets.token_urlsafe(12)
    with db.session_scope() as session:
        if accounts.get(session, DEMO_USER) is None:
            accounts.add(session, DEMO_USER, Role.OPERATOR, password, clock.now())
        else:
            accounts.set_password(session, DEMO_USER, password, clock.now())
    # a key for this run only: the demo needs no MAILER_WEB_SECRET
    web = WebSettings(secrets.token_urlsafe(32), False, None, ())
    app = create_app(web, broker_url="memory://")
    click.echo("")
    click.echo(f"dashboard  http://{host}:{port}/  sign in as {DEMO_USER} / {password}")
    click.echo(
        "           (the demo's worker has stopped: a retry from here queues, nothing sends)"
    )
    click.echo("           Ctrl-C stops it")
    uvicorn.run(app, host=host, port=port, log_level="warning", server_header=False)

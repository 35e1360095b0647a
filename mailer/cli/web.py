"""`mailer web` (the dashboard) and `mailer user` (its accounts)."""

from __future__ import annotations

import sys

import click

from mailer import clock, config, db
from mailer.errors import ConfigError
from mailer.models import Role

SECRET_HOWTO = (
    "set MAILER_WEB_SECRET to a long random key, for example: "
    "export MAILER_WEB_SECRET=$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))') "
    "(the same key in every web process; changing it signs everyone out)"
)


@click.group("user")
def user_group() -> None:
    """Dashboard accounts (mailer web): viewers look, operators act, admins also manage."""


def _password(from_stdin: bool) -> str:
    if from_stdin:
        line = sys.stdin.readline()
        return line.rstrip("\r\n")
    value: str = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    return value


@user_group.command("add")
@click.argument("name")
@click.option(
    "--role",
    type=click.Choice([r.value for r in Role]),
    required=True,
    help="viewer: sees everything; operator: also acts; admin: also manages users.",
)
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
def user_add(name: str, role: str, password_stdin: bool) -> None:
    """Add an account NAME (the password is prompted for, twice)."""
    from mailer.web import accounts

    password = accounts.check_password(_password(password_stdin))
    with db.session_scope() as session:
        account = accounts.add(session, name, Role(role), password, clock.now())
    click.echo(f"user {account.name} added ({account.role.value})")


@user_group.command("list")
def user_list() -> None:
    """Every account and its role."""
    from mailer.web import accounts

    with db.session_scope() as session:
        rows = accounts.listing(session)
    for name, role, created in rows:
        click.echo(f"{name:30} {role.value:9} since {created:%Y-%m-%d}")


@user_group.command("remove")
@click.argument("name")
def user_remove(name: str) -> None:
    """Remove account NAME; its sessions end at their next request."""
    from mailer.web import accounts

    with db.session_scope() as session:
        accounts.remove(session, name)
    click.echo(f"user {name} removed")


@user_group.command("passwd")
@click.argument("name")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
def user_passwd(name: str, password_stdin: bool) -> None:
    """Set NAME's password; the sessions opened with the old one end."""
    from mailer.web import accounts

    password = accounts.check_password(_password(password_stdin))
    with db.session_scope() as session:
        accounts.set_password(session, name, password, clock.now())
    click.echo(f"password of {name} changed")


@click.command("web")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8025, show_default=True, type=int, help="Port to listen on.")
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=int,
    help="Server processes (login limits are shared through Redis when the broker is Redis).",
)
def web_cmd(host: str, port: int, workers: int) -> None:
    """Serve the operators' dashboard (sign in with an account from `mailer user add`).

    Needs MAILER_WEB_SECRET. Put it behind a TLS proxy and set MAILER_WEB_COOKIE_SECURE=1;
    for single sign-on, MAILER_WEB_TRUSTED_HEADER and MAILER_WEB_TRUSTED_PROXIES.
    """
    web = config.web()
    if not web.secret:
        raise ConfigError("MAILER_WEB_SECRET", f"is not set: {SECRET_HOWTO}")
    serve(host, port, workers)


def serve(host: str, port: int, workers: int = 1) -> None:
    import uvicorn

    # a page must not hold a statement as long as a command may
    db.set_role("producer")
    click.echo(f"mailer web on http://{host}:{port}/", err=True)
    uvicorn.run(
        "mailer.web.app:from_environment",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        proxy_headers=False,
        server_header=False,
        log_level=config.settings().log_level.lower(),
    )

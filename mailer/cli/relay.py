"""Commands on the SMTP relay: its health (status, resume), `smtp check` and `verify`."""

from __future__ import annotations

import sys

import click

from mailer import clock, config, db
from mailer.cli.filtering import actor_option


@click.group("relay")
def relay_group() -> None:
    """The SMTP relay's health: paused after a configuration error, or resting."""


@relay_group.command("status")
def relay_status() -> None:
    """Show whether the configured relay is paused or resting."""
    from mailer import relay_health

    s = config.settings()
    with db.session_scope() as session:
        block = relay_health.block(session, s.smtp.name, clock.now())
    click.echo(f"relay {s.smtp.redacted()}")
    click.echo("healthy" if block is None else block.why)


@relay_group.command("resume")
@actor_option
def relay_resume(actor: str | None) -> None:
    """Use the relay again after fixing its configuration; queued mail goes out."""
    from mailer import actions

    name = config.settings().smtp.name
    with db.session_scope() as session:
        actions.resume_relay(session, actions.cli_actor(actor), name)
    click.echo(f"relay {name} resumed")


@click.command("verify")
@click.argument("address")
def verify_cmd(address: str) -> None:
    """Ask the relay about ADDRESS with VRFY and say what its reply means."""
    from mailer.replies import vrfy_meaning
    from mailer.transport.smtp import SMTPSession

    session = SMTPSession(config.settings().smtp)
    try:
        reply = session.verify(address)
    finally:
        session.close()
    click.echo(f"{reply}")
    click.echo(vrfy_meaning(reply))
    if reply.code is None:
        sys.exit(1)


@click.group("smtp")
def smtp_group() -> None:
    """The SMTP relay connection."""


@smtp_group.command("check")
def smtp_check() -> None:
    """Connect to MAILER_SMTP_URL and show each step: connect, EHLO (extensions), STARTTLS,
    AUTH, NOOP, QUIT. Exits 1 naming the step that failed. The password is never shown."""
    from mailer.relay_check import check

    relay = config.settings().smtp
    click.echo(f"relay {relay.redacted()}")
    ok = check(relay, lambda step, detail: click.echo(f"{step:9} {detail}"))
    click.echo("relay OK" if ok else "relay check FAILED")
    if not ok:
        sys.exit(1)

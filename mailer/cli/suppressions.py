"""The `mailer suppress` commands: the suppression list's entries, export and import."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import click

from mailer import db
from mailer.cli.filtering import actor_option
from mailer.cli.params import FILE
from mailer.errors import MailerError


@click.group("suppress")
def suppress_group() -> None:
    """The suppression list: addresses that are never mailed (hard bounces add themselves)."""


@suppress_group.command("add")
@click.argument("addresses", nargs=-1, required=True)
@click.option("--reason", default="added by an operator", show_default=True)
@actor_option
def suppress_add(addresses: tuple[str, ...], reason: str, actor: str | None) -> None:
    """Add ADDRESSES to the list."""
    from mailer import actions

    with db.session_scope() as session:
        done = actions.suppress_addresses(
            session, actions.cli_actor(actor), addresses, reason=reason
        )
    click.echo(f"{done.count} added ({len(addresses) - done.count} were already listed)")


@suppress_group.command("remove")
@click.argument("addresses", nargs=-1, required=True)
@actor_option
def suppress_remove(addresses: tuple[str, ...], actor: str | None) -> None:
    """Take ADDRESSES off the list (their mail is not retried by itself: see `mailer retry`)."""
    from mailer import actions

    with db.session_scope() as session:
        done = actions.unsuppress_addresses(session, actions.cli_actor(actor), addresses)
    click.echo(f"{done.count} removed")


@suppress_group.command("list")
def suppress_list() -> None:
    """Print the list: address, when, why."""
    from mailer import suppressions

    with db.session_scope() as session:
        for entry in suppressions.entries(session):
            click.echo(f"{entry.address}\t{entry.created_at:%Y-%m-%d %H:%M}\t{entry.reason}")


@suppress_group.command("export")
@actor_option
def suppress_export(actor: str | None) -> None:
    """Write the list as CSV (address, reason, created_at) to stdout."""
    from mailer import actions

    writer = csv.writer(sys.stdout)
    writer.writerow(["email", "reason", "created_at"])
    with db.session_scope() as session:
        _done, entries = actions.export_suppressions(session, actions.cli_actor(actor))
        for entry in entries:
            writer.writerow([entry.address, entry.reason, entry.created_at.isoformat()])


@suppress_group.command("import")
@click.argument("path", type=FILE)
@click.option(
    "--reason", default="imported", show_default=True, help="Reason for rows without one."
)
@actor_option
def suppress_import(path: Path, reason: str, actor: str | None) -> None:
    """Add the addresses of a CSV with an 'email' column (and optional 'reason'), as `export`
    writes it. An invalid address refuses the whole file."""
    from mailer import actions, recipients

    try:
        with db.session_scope() as session:
            done = actions.import_suppressions(
                session,
                actions.cli_actor(actor),
                recipients.read(path),
                reason=reason,
                source=path.name,
            )
    except MailerError as exc:
        raise click.ClickException(f"{path}, {exc}") from None
    read = int(done.target["read"])
    click.echo(f"{done.count} added ({read - done.count} were already listed)")

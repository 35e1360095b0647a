"""The `mailer suppress` commands: the suppression list's entries, export and import."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import click

from mailer import clock, db
from mailer.cli.params import FILE
from mailer.errors import MailerError


@click.group("suppress")
def suppress_group() -> None:
    """The suppression list: addresses that are never mailed (hard bounces add themselves)."""


@suppress_group.command("add")
@click.argument("addresses", nargs=-1, required=True)
@click.option("--reason", default="added by an operator", show_default=True)
def suppress_add(addresses: tuple[str, ...], reason: str) -> None:
    """Add ADDRESSES to the list."""
    from mailer import suppressions

    with db.session_scope() as session:
        n = suppressions.add_checked(session, addresses, reason, clock.now())
    click.echo(f"{n} added ({len(addresses) - n} were already listed)")


@suppress_group.command("remove")
@click.argument("addresses", nargs=-1, required=True)
def suppress_remove(addresses: tuple[str, ...]) -> None:
    """Take ADDRESSES off the list (their mail is not retried by itself: see `mailer retry`)."""
    from mailer import suppressions

    with db.session_scope() as session:
        n = suppressions.remove(session, addresses)
    click.echo(f"{n} removed")


@suppress_group.command("list")
def suppress_list() -> None:
    """Print the list: address, when, why."""
    from mailer import suppressions

    with db.session_scope() as session:
        for entry in suppressions.entries(session):
            click.echo(f"{entry.address}\t{entry.created_at:%Y-%m-%d %H:%M}\t{entry.reason}")


@suppress_group.command("export")
def suppress_export() -> None:
    """Write the list as CSV (address, reason, created_at) to stdout."""
    from mailer import suppressions

    writer = csv.writer(sys.stdout)
    writer.writerow(["email", "reason", "created_at"])
    with db.session_scope() as session:
        for entry in suppressions.entries(session):
            writer.writerow([entry.address, entry.reason, entry.created_at.isoformat()])


@suppress_group.command("import")
@click.argument("path", type=FILE)
@click.option(
    "--reason", default="imported", show_default=True, help="Reason for rows without one."
)
def suppress_import(path: Path, reason: str) -> None:
    """Add the addresses of a CSV with an 'email' column (and optional 'reason'), as `export`
    writes it. An invalid address refuses the whole file."""
    from mailer import recipients, suppressions

    try:
        with db.session_scope() as session:
            read, added = suppressions.import_rows(
                session, recipients.read(path), reason, clock.now()
            )
    except MailerError as exc:
        raise click.ClickException(f"{path}, {exc}") from None
    click.echo(f"{added} added ({read - added} were already listed)")

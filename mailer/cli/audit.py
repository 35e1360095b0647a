"""`mailer audit`: the operator actions carried out, newest first."""

from __future__ import annotations

import json

import click

from mailer import db


@click.command("audit")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--before", "before_id", type=int, help="Only entries older than this id (paging).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object a line.")
def audit_cmd(limit: int, before_id: int | None, as_json: bool) -> None:
    """List the audit log: who did what, when, to which deliveries, and how many."""
    from mailer import browse

    with db.session_scope() as session:
        page = browse.audit_page(session, before_id, limit)
    for e in page.rows:
        if as_json:
            row = {**e.__dict__, "at": e.at.isoformat()}
            click.echo(json.dumps(row, sort_keys=True))
            continue
        target = json.dumps(e.target, sort_keys=True)
        click.echo(
            f"{e.id:>6} {e.at:%Y-%m-%d %H:%M:%S} {e.actor} ({e.role}) {e.action} "
            f"{'unfinished' if e.count is None else format(e.count, ',')} {target}"
        )
    if page.next_after is not None and not as_json:
        click.echo(f"(more: --before {page.next_after})")

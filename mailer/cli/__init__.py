"""The `mailer` command: parses arguments, calls the modules that own the work, prints results.

The group and `main` live here; the commands, by family, in this package's modules.
"""

from __future__ import annotations

import logging
import sys

import click
from sqlalchemy.exc import OperationalError, ProgrammingError

from mailer import config, db
from mailer.cli import audit, campaigns, deliveries, metrics, ops, relay, retention, suppressions
from mailer.cli.params import hide
from mailer.errors import MailerError

__all__ = ["cli", "main"]


def _setup_logging() -> None:
    level = config.settings().log_level
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Queued bulk-mail delivery: templates, campaigns, workers, reports.

    Configuration comes from MAILER_* environment variables (see `mailer config`).
    """
    _setup_logging()
    db.set_role("cli")


for _command in (
    # set-up
    ops.db_group,
    ops.show_config,
    # what is sent
    campaigns.template_group,
    campaigns.send_cmd,
    campaigns.campaign_group,
    deliveries.report_cmd,
    # operating
    deliveries.retry_cmd,
    deliveries.cancel_cmd,
    suppressions.suppress_group,
    retention.purge_cmd,
    audit.audit_cmd,
    # running
    ops.worker_cmd,
    ops.dispatcher_cmd,
    metrics.metrics_cmd,
    relay.relay_group,
    relay.verify_cmd,
    relay.smtp_group,
    ops.demo_cmd,
):
    cli.add_command(_command)


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except MailerError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except (OperationalError, ProgrammingError) as exc:
        click.echo(f"error: {_database_problem(exc)}", err=True)
        sys.exit(1)


def _database_problem(exc: Exception) -> str:
    text = str(getattr(exc, "orig", exc)).strip().splitlines()[0]
    url = hide(config.settings().database_url)
    if "no such table" in text or ("does not exist" in text and "relation" in text):
        return f"the database at {url} has no schema yet: run `mailer db upgrade` ({text})"
    return f"database {url}: {text}"

"""Commands that set up and run mailer: `db upgrade`, `config`, `worker`, `dispatcher`, `demo`."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import Any

import click

from mailer import config, db
from mailer.cli.params import hide


@click.group("db")
def db_group() -> None:
    """Database schema."""


@db_group.command("upgrade")
@click.option("--revision", default="head", show_default=True, help="Alembic revision to reach.")
def db_upgrade(revision: str) -> None:
    """Create or upgrade the schema (safe to run from several containers at once)."""
    from mailer import migrate

    migrate.upgrade(revision=revision)
    click.echo(f"database at revision {migrate.current()}")


@db_group.command("recount")
def db_recount() -> None:
    """Count every campaign's deliveries by state again, from the deliveries themselves.

    The counts that `campaign status` reads are kept by triggers; run this after writing to
    `deliveries` with triggers off (a bulk load with session_replication_role = replica).
    Writes to deliveries wait while it runs (seconds per million deliveries).
    """
    from mailer import counts

    with db.session_scope() as session:
        rows = counts.recount(session)
    click.echo(f"counted again: {rows} campaign, priority and state rows")


@click.command("config")
def show_config() -> None:
    """Show the settings in force (secrets hidden) and every variable that sets them."""
    s = config.settings()
    click.echo(f"database: {hide(s.database_url)}")
    click.echo(f"broker:   {hide(s.broker_url)}")
    click.echo(f"relay:    {s.smtp.redacted()}")
    click.echo(f"from:     {s.from_addr or '(unset: pass --from or set MAILER_FROM)'}")
    click.echo(f"sessions: {s.smtp_sessions} per worker process")
    click.echo("")
    for name, default, meaning in config.VARIABLES:
        click.echo(f"{name:28} {meaning} [default: {default or 'none'}]")


@click.command("worker", context_settings={"ignore_unknown_options": True})
@click.option(
    "--concurrency",
    "-c",
    type=int,
    default=None,
    help="Worker processes (default: the CPU count; for a far relay, more, with more sessions).",
)
@click.option(
    "--pool",
    type=click.Choice(["prefork", "threads", "solo"]),
    default="prefork",
    show_default=True,
)
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def worker_cmd(concurrency: int | None, pool: str, celery_args: tuple[str, ...]) -> None:
    """Run a Celery worker with mailer's settings; serves transactional mail before bulk.

    Extra arguments go to `celery worker` as they are.
    """
    from mailer.celery_app import app

    db.set_role("worker")
    if pool == "threads" and concurrency:
        # each thread holds a connection only while it claims or records, but may need one
        # at any time: a pool a quarter of the threads, doubling at need, avoids the waits
        db.set_pool(size=max(5, concurrency // 4))
    # every statement a worker runs goes through db.retrying, which takes a new connection
    # when one turns out dead: the round trip of a ping before each use is not needed there
    db.set_pool(pre_ping=False)
    argv = [
        "worker",
        "--queues",
        "transactional,bulk",
        "--pool",
        pool,
        "--loglevel",
        config.settings().log_level,
        "--without-gossip",
        "--without-mingle",
    ]
    # one process a core: a message costs one round trip to a near relay, so a process mostly
    # computes, and more processes than cores contend for them (see BENCHMARKS.md)
    argv += ["--concurrency", str(concurrency or os.cpu_count() or 1)]
    app.worker_main(argv + list(celery_args))


@click.command("dispatcher")
@click.option("--once", is_flag=True, help="One pass, then exit.")
def dispatcher_cmd(once: bool) -> None:
    """Re-publish due retries, lost wake-ups and expired leases, every MAILER_DISPATCH_INTERVAL."""
    import signal

    from mailer import dispatcher

    db.set_role("dispatcher")
    if once:
        report = dispatcher.run_once()
        click.echo(
            f"published {report.published}, expired {report.expired}"
            + (f"; {report.relay_blocked}" if report.relay_blocked else "")
        )
        return
    stop = threading.Event()

    def stopping(*_: Any) -> None:
        # a pass may be inside a long statement: cancel it, so that the process exits now
        # and the server does not go on running it (and holding its rows' locks)
        stop.set()
        db.cancel_all()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stopping)
    dispatcher.run(stop=stop)


@click.command("demo")
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("var/demo"),
    show_default=True,
)
def demo_cmd(workdir: Path) -> None:
    """Run a whole campaign on embedded parts: SQLite, an in-process broker and SMTP server."""
    from mailer import demo

    sys.exit(demo.run(workdir))

"""The `mailer` command: parses arguments, calls the modules that own the work, prints results."""

from __future__ import annotations

import csv
import json
import logging
import os
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click
from sqlalchemy.exc import OperationalError, ProgrammingError

from mailer import clock, config, db
from mailer.errors import MailerError
from mailer.models import DeliveryState

STATES = [s.value for s in DeliveryState]
FILE = click.Path(exists=True, dir_okay=False, path_type=Path)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class _When(click.ParamType[datetime, Any]):
    """ISO 8601 (UTC when no zone is given) or a duration such as 30m, 2h, 1d: that long from
    now (`future=True`) or that long ago."""

    name = "TIME"

    def __init__(self, *, future: bool) -> None:
        self.future = future

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> datetime:
        if isinstance(value, datetime):
            return value
        text = str(value).strip().lstrip("+")
        if text[:-1].isdigit() and text[-1:] in _UNITS:
            delta = timedelta(seconds=int(text[:-1]) * _UNITS[text[-1]])
            return clock.now() + delta if self.future else clock.now() - delta
        try:
            when = datetime.fromisoformat(text)
        except ValueError:
            self.fail(f"{value!r} is neither ISO 8601 nor a duration like 30m, 2h, 1d", param, ctx)
        return when if when.tzinfo else when.replace(tzinfo=UTC)


LATER = _When(future=True)
AGO = _When(future=False)


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


# --- set-up ---------------------------------------------------------------------------------------


@cli.group("db")
def db_group() -> None:
    """Database schema."""


@db_group.command("upgrade")
@click.option("--revision", default="head", show_default=True, help="Alembic revision to reach.")
def db_upgrade(revision: str) -> None:
    """Create or upgrade the schema (safe to run from several containers at once)."""
    from mailer import migrate

    migrate.upgrade(revision=revision)
    click.echo(f"database at revision {migrate.current()}")


@cli.command("config")
def show_config() -> None:
    """Show the settings in force (secrets hidden) and every variable that sets them."""
    s = config.settings()
    click.echo(f"database: {_hide(s.database_url)}")
    click.echo(f"broker:   {_hide(s.broker_url)}")
    click.echo(f"relay:    {s.smtp.redacted()}")
    click.echo(f"from:     {s.from_addr or '(unset: pass --from or set MAILER_FROM)'}")
    click.echo(f"sessions: {s.smtp_sessions} per worker process")
    click.echo("")
    for name, default, meaning in config.VARIABLES:
        click.echo(f"{name:28} {meaning} [default: {default or 'none'}]")


def _hide(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]


# --- templates ------------------------------------------------------------------------------------


@cli.group("template")
def template_group() -> None:
    """Templates: Jinja2 (sandboxed) subject, text and optional HTML, stored in versions."""


@template_group.command("add")
@click.argument("name")
@click.option(
    "--subject",
    "subject_file",
    required=True,
    type=FILE,
    help="File with the subject template.",
)
@click.option(
    "--text",
    "text_file",
    required=True,
    type=FILE,
    help="File with the plain-text body template.",
)
@click.option(
    "--html",
    "html_file",
    type=FILE,
    help="File with the HTML body template (autoescaped).",
)
def template_add(name: str, subject_file: Path, text_file: Path, html_file: Path | None) -> None:
    """Add a new version of template NAME (earlier versions stay, for retries)."""
    from mailer import templates

    with db.session_scope() as session:
        t = templates.add(
            session,
            name,
            _read(subject_file),
            _read(text_file),
            _read(html_file) if html_file else None,
        )
        click.echo(f"template {t.name!r} version {t.version}")


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise click.ClickException(f"{path}: not UTF-8; save it as UTF-8") from None


# --- producing ------------------------------------------------------------------------------------


@cli.command("send")
@click.option("--template", "template", required=True, help="Template name (its latest version).")
@click.option("--to", "to", required=True, multiple=True, help="Recipient; repeat for several.")
@click.option("--context", "context", default="{}", help="JSON object for the template.")
@click.option("--from", "from_addr", help="Sender (default MAILER_FROM).")
@click.option("--idempotency-key", help="Sending twice with the same key sends once.")
@click.option("--header", "headers", multiple=True, help="Extra header 'Name: value' (a template).")
@click.option("--send-at", type=LATER, help="Not before this time (ISO 8601, or e.g. 2h from now).")
@click.option("--expires-at", type=LATER, help="Not after this time: then it expires unsent.")
def send_cmd(
    template: str,
    to: tuple[str, ...],
    context: str,
    from_addr: str | None,
    idempotency_key: str | None,
    headers: tuple[str, ...],
    send_at: datetime | None,
    expires_at: datetime | None,
) -> None:
    """Queue one transactional message; prints its id."""
    from mailer import enqueue

    message_id = enqueue.send(
        template,
        list(to),
        _json_object(context),
        from_addr=from_addr,
        idempotency_key=idempotency_key,
        headers=_headers(headers),
        send_at=send_at,
        expires_at=expires_at,
    )
    click.echo(message_id)


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON: {exc.msg}", param_hint="--context") from None
    if not isinstance(value, dict):
        raise click.BadParameter("must be a JSON object", param_hint="--context")
    return value


def _headers(items: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition(":")
        if not sep:
            raise click.BadParameter(f"{item!r} is not 'Name: value'", param_hint="--header")
        out[name.strip()] = value.strip()
    return out


@cli.group("campaign")
def campaign_group() -> None:
    """Campaigns: one template to a list of recipients."""


@campaign_group.command("send")
@click.option("--template", "template", required=True, help="Template name (its latest version).")
@click.option(
    "--recipients",
    "path",
    required=True,
    type=FILE,
    help="CSV with an 'email' column (other columns become context), or JSON Lines.",
)
@click.option("--name", help="Campaign name (default: template and time).")
@click.option("--from", "from_addr", help="Sender (default MAILER_FROM).")
@click.option(
    "--header",
    "headers",
    multiple=True,
    help="Extra header 'Name: value' (a template), e.g. List-Unsubscribe.",
)
@click.option(
    "--skip-invalid", is_flag=True, help="Skip invalid rows (listed) instead of refusing the file."
)
@click.option("--send-at", type=LATER, help="Not before this time (ISO 8601, or e.g. 2h from now).")
@click.option("--expires-at", type=LATER, help="Not after this time: then it expires unsent.")
def campaign_send(
    template: str,
    path: Path,
    name: str | None,
    from_addr: str | None,
    headers: tuple[str, ...],
    skip_invalid: bool,
    send_at: datetime | None,
    expires_at: datetime | None,
) -> None:
    """Queue a campaign from a recipient file; prints the campaign id."""
    from mailer import enqueue, recipients

    progress = _Progress("enqueued")
    rows = recipients.read(path)
    result = enqueue.send_campaign(
        template,
        rows,
        name=name,
        from_addr=from_addr,
        headers=_headers(headers),
        skip_invalid=skip_invalid,
        progress=progress.update,
        send_at=send_at,
        expires_at=expires_at,
    )
    progress.done()
    for line in result.rejected:
        click.echo(f"skipped {line}", err=True)
    click.echo(
        f"campaign {result.campaign_id}: {result.queued} queued, {result.suppressed} "
        f"suppressed, {result.duplicates} duplicates dropped, {result.invalid} invalid "
        "skipped",
        err=True,
    )
    click.echo(result.campaign_id)


class _Progress:
    """A progress line on stderr when it is a terminal, at most a few times a second."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.last = 0.0
        self.tty = sys.stderr.isatty()

    def update(self, count: int) -> None:
        import time

        if self.tty and time.monotonic() - self.last > 0.2:
            self.last = time.monotonic()
            click.echo(f"\r{self.label} {count:,} recipients", nl=False, err=True)

    def done(self) -> None:
        if self.tty:
            click.echo("", err=True)


@campaign_group.command("status")
@click.argument("campaign_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def campaign_status(campaign_id: int, as_json: bool) -> None:
    """Counts per delivery state, and progress."""
    from mailer import queries

    with db.session_scope() as session:
        status = queries.campaign_status(session, campaign_id)
    if as_json:
        click.echo(json.dumps(status.as_dict(), indent=2))
        return
    click.echo(f"campaign {status.id} {status.name!r}{' (paused)' if status.paused else ''}")
    click.echo(f"progress {status.done:,}/{status.total:,} final ({status.progress:.1%})")
    for state, n in status.counts.items():
        click.echo(f"  {state:11} {n:>9,}")


@campaign_group.command("pause")
@click.argument("campaign_id", type=int)
def campaign_pause(campaign_id: int) -> None:
    """Stop handing out the campaign's deliveries (those in flight finish)."""
    _set_paused(campaign_id, True)


@campaign_group.command("resume")
@click.argument("campaign_id", type=int)
def campaign_resume(campaign_id: int) -> None:
    """Hand out the campaign's deliveries again (the dispatcher publishes them)."""
    _set_paused(campaign_id, False)


def _set_paused(campaign_id: int, paused: bool) -> None:
    from mailer import outcomes

    with db.session_scope() as session:
        outcomes.pause_campaign(session, campaign_id, paused, clock.now())
    click.echo(f"campaign {campaign_id} {'paused' if paused else 'resumed'}")


@cli.command("report")
@click.argument("campaign_id", type=int)
@click.option(
    "--state",
    "states",
    multiple=True,
    type=click.Choice(STATES),
    help="Only these states (repeatable).",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "csv", "json"]),
    default="table",
    show_default=True,
)
def report_cmd(campaign_id: int, states: tuple[str, ...], fmt: str) -> None:
    """Per recipient: address, state, attempts, last code, enhanced code and reply."""
    from mailer import queries

    with db.session_scope() as session:
        rows = queries.report(session, campaign_id, [DeliveryState(s) for s in states] or None)
        if fmt == "csv":
            writer = csv.DictWriter(sys.stdout, fieldnames=queries.REPORT_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        elif fmt == "json":
            for row in rows:
                click.echo(json.dumps(row))
        else:
            click.echo(
                f"{'recipient':40} {'state':10} {'tries':>5} {'code':>4} {'enhanced':8} reply"
            )
            for row in rows:
                click.echo(
                    f"{row['recipient'][:40]:40} {row['state']:10} {row['attempts']:>5} "
                    f"{row['code'] or '':>4} {row['enhanced'] or '':8} {row['reply'][:70]}"
                )


# --- operating -----------------------------------------------------------------------------------

RETRY_DEFAULT = "failed,expired,unknown"


def _selection(
    campaign_id: int | None,
    message_id: int | None,
    states: str | None,
    code: str | None,
    since: datetime | None,
) -> Any:
    from mailer import queries

    if campaign_id is None and message_id is None and code is None and since is None:
        # a state alone would reach every campaign and message ever sent
        raise click.UsageError("say which deliveries: --campaign, --message, --code or --since")
    chosen = None
    if states:
        try:
            chosen = [DeliveryState(s.strip()) for s in states.split(",") if s.strip()]
        except ValueError:
            raise click.BadParameter(
                f"states are: {', '.join(STATES)}", param_hint="--state"
            ) from None
    if code is not None:
        try:
            queries.code_range(code)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--code") from None
    return queries.Selection(campaign_id, message_id, chosen, code, since)


@cli.command("retry")
@click.option("--campaign", "campaign_id", type=int, help="Only this campaign.")
@click.option("--message", "message_id", type=int, help="Only this message.")
@click.option(
    "--state",
    "states",
    default=RETRY_DEFAULT,
    show_default=True,
    help="Comma-separated states to retry.",
)
@click.option("--code", help="Only deliveries whose last reply code matches: 4xx, 5xx or e.g. 550.")
@click.option("--since", type=AGO, help="Only those that changed since (ISO 8601, or e.g. 2h ago).")
@click.option(
    "--include-suppressed",
    is_flag=True,
    help="Also addresses on the suppression list (and take them off it).",
)
@click.option("--dry-run", is_flag=True, help="Count, change nothing.")
def retry_cmd(
    campaign_id: int | None,
    message_id: int | None,
    states: str,
    code: str | None,
    since: datetime | None,
    include_suppressed: bool,
    dry_run: bool,
) -> None:
    """Queue matching deliveries again with a fresh attempt budget; the dispatcher sends them."""
    from mailer import outcomes

    selection = _selection(campaign_id, message_id, states, code, since)
    with db.session_scope() as session:
        if dry_run:
            n = outcomes.retry_candidates(
                session, selection.ids(), include_suppressed=include_suppressed
            )
            click.echo(f"{n} deliveries would be queued again (dry run: nothing changed)")
            return
        n = outcomes.requeue(
            session, selection.ids(), clock.now(), include_suppressed=include_suppressed
        )
    click.echo(f"{n} deliveries queued again; the dispatcher publishes them on its next pass")


@cli.command("cancel")
@click.option("--campaign", "campaign_id", type=int, help="Cancel this campaign's unsent mail.")
@click.option("--message", "message_id", type=int, help="Cancel this message's unsent deliveries.")
def cancel_cmd(campaign_id: int | None, message_id: int | None) -> None:
    """Cancel what has not been sent (queued, deferred); in-flight mail finishes."""
    from mailer import outcomes

    if campaign_id is None and message_id is None:
        raise click.UsageError("say what to cancel: --campaign ID or --message ID")
    selection = _selection(campaign_id, message_id, None, None, None)
    with db.session_scope() as session:
        n = outcomes.cancel(session, selection.ids(), clock.now())
    click.echo(f"{n} deliveries cancelled")


@cli.group("suppress")
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
    from mailer import addresses, recipients, suppressions

    entries = []
    for line, row in recipients.read(path):
        try:
            entries.append(
                (addresses.parse(str(row["email"])).key, row.get("reason") or reason, None)
            )
        except MailerError as exc:
            raise click.ClickException(f"{path}, line {line}: {exc}") from None
    with db.session_scope() as session:
        n = suppressions.add(session, entries, clock.now())
    click.echo(f"{n} added ({len(entries) - n} were already listed)")


# --- running --------------------------------------------------------------------------------------


@cli.command("worker", context_settings={"ignore_unknown_options": True})
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

    if pool == "threads" and concurrency:
        # each thread holds a connection only while it claims or records, but may need one
        # at any time: a pool a quarter of the threads, doubling at need, avoids the waits
        db.set_pool(size=max(5, concurrency // 4))
    # every statement a worker runs goes through db.retrying, which takes a new connection
    # when one turns out dead: the round trip of a ping before each use is not needed there
    # (4-5 % more messages/s)
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
    # computes; twice the cores contended for them (7,200 against 7,700-8,200 msgs/s here)
    argv += ["--concurrency", str(concurrency or os.cpu_count() or 1)]
    app.worker_main(argv + list(celery_args))


@cli.command("dispatcher")
@click.option("--once", is_flag=True, help="One pass, then exit.")
def dispatcher_cmd(once: bool) -> None:
    """Re-publish due retries, lost wake-ups and expired leases, every MAILER_DISPATCH_INTERVAL."""
    import signal

    from mailer import dispatcher

    if once:
        report = dispatcher.run_once()
        click.echo(
            f"published {report.published}, expired {report.expired}"
            + (f"; {report.relay_blocked}" if report.relay_blocked else "")
        )
        return
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    dispatcher.run(stop=stop)


@cli.group("relay")
def relay_group() -> None:
    """The SMTP relay's health: paused after a configuration error, or resting."""


@relay_group.command("status")
def relay_status() -> None:
    """Show whether the configured relay is paused or resting."""
    from mailer import outcomes

    s = config.settings()
    with db.session_scope() as session:
        block = outcomes.relay_block(session, s.smtp.name, clock.now())
    click.echo(f"relay {s.smtp.redacted()}")
    click.echo("healthy" if block is None else block.why)


@relay_group.command("resume")
def relay_resume() -> None:
    """Use the relay again after fixing its configuration; queued mail goes out."""
    from mailer import outcomes

    name = config.settings().smtp.name
    with db.session_scope() as session:
        outcomes.resume_relay(session, name, clock.now())
    click.echo(f"relay {name} resumed")


@cli.command("verify")
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


@cli.group("smtp")
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


@cli.command("demo")
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
    url = _hide(config.settings().database_url)
    if "no such table" in text or ("does not exist" in text and "relation" in text):
        return f"the database at {url} has no schema yet: run `mailer db upgrade` ({text})"
    return f"database {url}: {text}"

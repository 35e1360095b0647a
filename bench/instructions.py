"""The worker's instructions a message, counted by valgrind (callgrind), which gives the same
count whatever else the machine is doing: where `make bench`'s rates move by 15 % between runs
of the same code, this tells a change of 1 % apart.

    .venv/bin/python bench/instructions.py            # about two minutes

It enqueues a campaign (bench/content.py's template) into a PostgreSQL schema of its own, then
drains it in one process under callgrind, as a pool process does (`deliver_chunk` over two
sessions in step to the bench's sink), twice: once `--short` chunks, once `--long` chunks of
500, each from a fresh enqueue. The difference, divided by the messages between, leaves out
start-up, imports and the first connections. Outcomes are written every FLUSH_EVERY only (not
also every FLUSH_SECONDS, which under valgrind's fifty-fold slowdown would flush by the clock).
Only the draining process is counted: PostgreSQL's and the sink's work is not.

    .venv/bin/python bench/instructions.py --server   # PostgreSQL's side, about five minutes

counts the server's instead: the same drains against a private PostgreSQL whose backends run
under callgrind (bench/pgvalgrind.py), the worker itself at full speed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pgvalgrind

BENCH = Path(__file__).resolve().parent

CHUNK = 500


def drain(chunks: int) -> None:
    """In the child under valgrind: deliver the first `chunks` chunks of what is queued."""
    from sqlalchemy import text

    from mailer import db, delivery

    delivery.FLUSH_SECONDS = 1e9  # flush every FLUSH_EVERY outcomes, never by the clock
    with db.session_scope() as session:
        ids = list(
            session.scalars(text("SELECT id FROM deliveries WHERE state = 'queued' ORDER BY id"))
        )
    for start in range(0, chunks * CHUNK, CHUNK):
        delivery.deliver_chunk(ids[start : start + CHUNK])


def count(
    env: dict[str, str],
    pg_url: str,
    schema: str,
    chunks: int,
    total: int,
    server: pgvalgrind.Server | None = None,
) -> int:
    """Instructions of a process that drains `chunks` chunks of a fresh campaign; with a
    `server`, the instructions of that server's backends for it instead."""
    from run import fresh_schema

    env = dict(env, MAILER_DATABASE_URL=fresh_schema(pg_url, schema))
    for step in (["setup"], ["campaign", str(total)]):
        subprocess.run(
            [sys.executable, str(BENCH / "produce.py"), *step],
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
        )
    drain_argv = [sys.executable, __file__, "--drain", str(chunks)]
    if server is not None:
        mark = server.mark()
        subprocess.run(drain_argv, env=env, check=True, capture_output=True)
        return server.backends_since(mark)
    out = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *drain_argv],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    found = re.search(r"Collected : (\d+)", out.stderr)
    if found is None:
        raise SystemExit(f"no count in valgrind's output: {out.stderr[-2000:]}")
    return int(found.group(1))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--short", type=int, default=1, help="chunks of the first count")
    p.add_argument("--long", type=int, default=3, help="chunks of the second count")
    p.add_argument(
        "--pg-url",
        default=os.environ.get(
            "MAILER_BENCH_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
        ),
    )
    p.add_argument("--pg-schema", default="mailer_instructions")
    p.add_argument(
        "--relay-options",
        help="added to the relay URL, e.g. rate=1000000/s (the shaping hook, out of reach)",
    )
    p.add_argument(
        "--server",
        action="store_true",
        help="count PostgreSQL's instructions instead (a private server under callgrind; "
        "--pg-url is not used)",
    )
    p.add_argument("--drain", type=int, help=argparse.SUPPRESS)  # the child under valgrind
    args = p.parse_args()
    if args.drain is not None:
        drain(args.drain)
        return 0
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (apt-get install valgrind)")
    if args.long <= args.short:
        raise SystemExit("--long must be more chunks than --short")
    import content
    import infra
    from run import pg_execute

    work = Path(tempfile.mkdtemp(prefix="mailer-instructions-"))
    sink = infra.Sink(work)
    try:
        env = dict(
            os.environ,
            MAILER_BROKER_URL="memory://",  # the campaign's wake-ups are not needed
            MAILER_SMTP_URL=infra.with_options(sink.url, args.relay_options),
            MAILER_FROM=content.SENDER,
            MAILER_LOG_LEVEL="WARNING",
            PYTHONHASHSEED="0",  # the same dict and set layouts in both counts
        )
        total = args.long * CHUNK
        with contextlib.ExitStack() as stack:
            server = stack.enter_context(pgvalgrind.running()) if args.server else None
            pg_url = server.url if server is not None else args.pg_url
            short = count(env, pg_url, args.pg_schema, args.short, total, server)
            long = count(env, pg_url, args.pg_schema, args.long, total, server)
    finally:
        sink.stop()
        if not args.server:
            pg_execute(args.pg_url, f"DROP SCHEMA IF EXISTS {args.pg_schema} CASCADE")
        shutil.rmtree(work, ignore_errors=True)
    messages = (args.long - args.short) * CHUNK
    who = "PostgreSQL" if args.server else "worker"
    print(
        f"{who} instructions a message: {(long - short) // messages:,} "
        f"({args.short} chunk(s): {short:,}; {args.long}: {long:,}; chunks of {CHUNK})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

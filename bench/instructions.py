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
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

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


def count(env: dict[str, str], pg_url: str, schema: str, chunks: int, total: int) -> int:
    """Instructions of a process that drains `chunks` chunks of a fresh campaign."""
    from run import fresh_schema

    env = dict(env, MAILER_DATABASE_URL=fresh_schema(pg_url, schema))
    for step in (["setup"], ["campaign", str(total)]):
        subprocess.run(
            [sys.executable, str(BENCH / "produce.py"), *step],
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
        )
    out = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            __file__,
            "--drain",
            str(chunks),
        ],
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
            MAILER_SMTP_URL=sink.url,
            MAILER_FROM=content.SENDER,
            MAILER_LOG_LEVEL="WARNING",
            PYTHONHASHSEED="0",  # the same dict and set layouts in both counts
        )
        total = args.long * CHUNK
        short = count(env, args.pg_url, args.pg_schema, args.short, total)
        long = count(env, args.pg_url, args.pg_schema, args.long, total)
    finally:
        sink.stop()
        pg_execute(args.pg_url, f"DROP SCHEMA IF EXISTS {args.pg_schema} CASCADE")
        shutil.rmtree(work, ignore_errors=True)
    messages = (args.long - args.short) * CHUNK
    print(
        f"worker instructions a message: {(long - short) // messages:,} "
        f"({args.short} chunk(s): {short:,}; {args.long}: {long:,}; chunks of {CHUNK})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

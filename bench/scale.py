"""`make scale`: mailer on an outbox with months of history. Loads N deliveries (and about 2N
attempts) into a PostgreSQL schema of its own, then measures each case there and on an empty
outbox: a campaign drained by a real worker, a dispatcher pass over 1M due rows, Redis lost
with 1M rows queued, status / report / retry on a 1M-recipient campaign, a 1M-address
suppression import, a retry of 1M failed deliveries beside a worker sending. Prints a table,
writes a JSON file. Not run by CI.

    .venv/bin/python bench/scale.py --deliveries 1M --keep     develop: a small history, kept
    .venv/bin/python bench/scale.py --reuse --keep              again, on the kept history
    .venv/bin/python bench/scale.py                             the record: 10M deliveries
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import infra
import scale_cases as cases
import scale_load
import scale_pglog
import scale_report
from infra import BENCH, PROCS, BenchError
from machine import machine_info, pg_probe

CASES: dict[str, Callable[[cases.Side], dict[str, Any]]] = {
    "campaign": cases.case_campaign,
    "suppress": cases.case_suppress,  # before `read`: retry checks the suppression list
    "read": cases.case_read_side,
    "dispatch": cases.case_dispatch,
    "retry": cases.case_retry,
    "redis": cases.case_redis_lost,
}
T0 = time.monotonic()


def say(line: str) -> None:
    print(f"[{time.monotonic() - T0:7.1f}s] {line}", flush=True)


def count(text: str) -> int:
    """'10M', '500k', '1_000_000' -> an int."""
    text = text.strip().lower().replace("_", "").replace(",", "")
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1:], 1)
    number = text[:-1] if scale > 1 else text
    try:
        value = int(float(number) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a count: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/scale.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--deliveries",
        type=count,
        default=10_000_000,
        help="deliveries of history (10M; 1M or less to develop)",
    )
    p.add_argument(
        "--campaign",
        type=count,
        default=100_000,
        help="recipients of the campaign drained by a worker",
    )
    p.add_argument(
        "--big",
        type=count,
        default=1_000_000,
        help="rows of the dispatcher, Redis, read-side and import cases",
    )
    p.add_argument(
        "--reuse",
        action="store_true",
        help="use the history already loaded (same size), reset to its own rows",
    )
    p.add_argument(
        "--keep", action="store_true", help="keep the history schema (for --reuse) and the logs"
    )
    p.add_argument("--load-only", action="store_true", help="load the history, measure nothing")
    p.add_argument("--only", help="comma-separated cases: " + ",".join(CASES))
    p.add_argument("--sides", default="empty,history", help="outboxes to measure on")
    p.add_argument(
        "--pg-url",
        default=os.environ.get(
            "MAILER_BENCH_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
        ),
    )
    p.add_argument("--schema", default="mailer_scale", help="the history's schema")
    p.add_argument("--empty-schema", default="mailer_scale_empty")
    p.add_argument("--concurrency", type=int, default=os.cpu_count() or 1, help="worker processes")
    p.add_argument("--pool", default="prefork", choices=["prefork", "threads", "solo"])
    p.add_argument("--sink", default="auto", choices=["auto", "smtp-sink", "python"])
    p.add_argument(
        "--case-timeout",
        type=float,
        default=900.0,
        help="seconds after which a case is reported stalled",
    )
    p.add_argument(
        "--command-timeout",
        type=float,
        default=180.0,
        help="seconds after which one command (status, report, retry, import) is stalled",
    )
    p.add_argument("--poll", type=float, default=0.5, help="seconds between outbox polls")
    p.add_argument(
        "--stall-timeout",
        type=float,
        default=120.0,
        help="a drain with no progress this long is stalled",
    )
    p.add_argument(
        "--log-slow",
        type=int,
        default=200,
        metavar="MS",
        help="mailer's statements slower than this go to the server log; each case reports "
        "its slowest (0: off)",
    )
    p.add_argument("--pg-log", help="the server log (default: newest in /var/log/postgresql)")
    p.add_argument("--json", default=str(BENCH / "results" / "scale-latest.json"))
    args = p.parse_args(argv)
    selected = args.only.split(",") if args.only else list(CASES)
    unknown = [c for c in selected if c not in CASES]
    if unknown:
        p.error(f"unknown case(s) {unknown}; choose from {','.join(CASES)}")
    args.cases = [c for c in CASES if c in selected]
    args.side_list = [s for s in ("empty", "history") if s in args.sides.split(",")]
    return args


def prepare_history(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """The loaded history: reused (migrated to head, reset) when asked and of the same size,
    else loaded afresh."""
    log = workdir / "migrate.log"
    marks = scale_load.history_marks(args.pg_url, args.schema) if args.reuse else None
    if marks and marks.get("deliveries_planned") == args.deliveries:
        say(f"reusing the history in {args.schema} (loaded {marks['loaded_at']})")
        t = time.monotonic()
        scale_load.migrate(args.pg_url, args.schema, log)
        scale_load.reset(args.pg_url, args.schema, marks, say, log)
        marks["reset_s"] = time.monotonic() - t
        marks["reused"] = True
        return marks
    if args.reuse:
        say(f"no history of {args.deliveries:,} deliveries in {args.schema}: loading one")
    t = time.monotonic()
    marks = scale_load.load_history(args.pg_url, args.schema, args.deliveries, log, say)
    marks["load_s"] = time.monotonic() - t
    marks["reused"] = False
    say(
        f"history loaded in {marks['load_s']:.0f}s: {marks['rows_deliveries']:,} deliveries, "
        f"{marks['rows_attempts']:,} attempts"
    )
    return marks


def run_case(name: str, side: cases.Side) -> dict[str, Any]:
    """One case on one outbox; an error or a stall is its result, not the run's end."""
    say(f"{name} on the {side.name} outbox ...")
    slow = scale_pglog.SlowLog(scale_pglog.find_log(side.args.pg_log))
    slow.mark()
    t = time.monotonic()
    try:
        result = CASES[name](side)
    except (BenchError, OSError, RuntimeError) as exc:
        result = {"error": f"{type(exc).__name__}: {exc}"}
    except Exception as exc:  # a database error inside a case: reported, the run goes on
        result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    result["case_s"] = time.monotonic() - t
    try:
        left = side.orphans()
    except Exception as exc:  # the database itself is the problem: say so, go on
        left = [{"error": str(exc)}]
    if left:
        result.setdefault("left_running", []).extend(left)
    if side.args.log_slow:
        result["slow_statements"] = slow.slowest()
    brief = {k: v for k, v in result.items() if isinstance(v, int | float | str)}
    say(f"  {name} ({side.name}): {json.dumps(brief, default=str)[:400]}")
    return result


def measure(args: argparse.Namespace, workdir: Path, report: dict[str, Any]) -> None:
    redis = infra.Redis(workdir)
    sink = infra.Sink(workdir, args.sink)
    schemas = {"empty": args.empty_schema, "history": args.schema}
    sides = {
        name: cases.Side(name, schemas[name], args.pg_url, workdir, redis, sink, args)
        for name in args.side_list
    }
    if "empty" in sides:
        scale_load.fresh(args.pg_url, args.empty_schema, workdir / "migrate.log")
    results: dict[str, dict[str, Any]] = report["cases"]
    for name in args.cases:  # each case on both outboxes in turn: the machine's drift hits both
        for side in sides.values():
            if side.redis.proc.poll() is not None:  # a case that lost it: a new one
                side.redis = redis = infra.Redis(workdir)
                for other in sides.values():
                    other.redis = redis
            results.setdefault(name, {})[side.name] = run_case(name, side)
            _write(args, report)


def _write(args: argparse.Namespace, report: dict[str, Any]) -> None:
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    infra.install_signal_handlers()
    workdir = Path(tempfile.mkdtemp(prefix="mailer-scale-"))
    report: dict[str, Any] = {"args": {k: v for k, v in vars(args).items()}, "cases": {}}
    failed = False
    try:
        url, note = pg_probe(args.pg_url)
        if url is None:
            raise BenchError(f"PostgreSQL unavailable: {note}")
        report["machine"] = machine_info(None)
        say(f"mailer scale: {args.deliveries:,} deliveries of history; work dir {workdir}")
        if "history" in args.side_list or args.load_only:
            report["history"] = prepare_history(args, workdir)
        if not args.load_only:
            measure(args, workdir, report)
            text, rows = scale_report.table(report["cases"], args.side_list, args.big)
            report["table"] = rows
            print("\n" + text)
            for line in scale_report.errors(report["cases"]):
                print(f"  ! {line[:300]}")
                failed = True
    except BaseException as exc:
        failed = True
        report["error"] = f"{type(exc).__name__}: {exc}"
        if not isinstance(exc, KeyboardInterrupt | SystemExit):
            traceback.print_exc()
    finally:
        PROCS.stop_all()
        _cleanup(args)
        _write(args, report)
        say(f"wrote {args.json}")
        if args.keep or failed:
            print(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


def _cleanup(args: argparse.Namespace) -> None:
    """The empty outbox always goes; the history only when not kept."""
    drop = [args.empty_schema] + ([] if args.keep or args.load_only else [args.schema])
    for schema in drop:
        try:
            with scale_load.connect(args.pg_url, "public") as conn:
                conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        except Exception as exc:  # the run's figures are written all the same
            print(f"could not drop {schema}: {exc}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())

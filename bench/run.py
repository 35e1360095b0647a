"""Side-by-side throughput benchmark of mailer against its ceilings and the naive pattern.

    .venv/bin/python bench/run.py [--runs 3] [--recipients 20000] [--quick] [--only a,b]
                                  [--json bench/results/latest.json]

Everything runs on loopback in one session, against one SMTP sink (Postfix's smtp-sink when
installed, else bench/pysink.py), one private redis-server on a free port, a PostgreSQL schema
of its own (`mailer_bench` in database `test`, recreated and migrated for every run) and SQLite
files in a temporary directory. Every figure is the median of --runs runs; each run's raw
numbers, the settings and the machine go to the JSON file. See CASES for what each measures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import infra
from cases import CASES, DEFAULT_ORDER, NaiveWorker, case_client, case_naive, case_source
from infra import BENCH, PROCS
from machine import machine_info, pg_probe, yardstick_ms
from mailer_cases import case_enqueue_csv, case_mailer, case_txn_idle
from report import fmt_ms, fmt_rate, print_table, round_ratios, summarize
from session import Bench, now

# bench/instructions.py imports these from here
from session import fresh_schema as fresh_schema
from session import pg_execute as pg_execute


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--runs", type=int, default=3, help="runs per case; figures are medians")
    p.add_argument(
        "--recipients",
        type=int,
        default=20000,
        help="campaign size (mailer) and message count (raw clients)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 1 run, 5000 recipients, smaller naive/latency cases",
    )
    p.add_argument("--only", help="comma-separated cases: " + ",".join(DEFAULT_ORDER))
    p.add_argument("--json", default=str(BENCH / "results" / "latest.json"), help="output file")
    p.add_argument(
        "--pool",
        default="prefork",
        choices=["prefork", "threads", "solo"],
        help="worker pool, mailer and naive alike",
    )
    p.add_argument("--concurrency", type=int, default=2, help="the naive worker's concurrency")
    p.add_argument(
        "--mailer-concurrency",
        type=int,
        default=os.cpu_count() or 1,
        help="mailer worker processes (default: mailer's own default, the CPU count)",
    )
    p.add_argument("--clients", type=int, default=2, help="processes of the raw clients")
    p.add_argument(
        "--relay-options",
        help="added to mailer's relay URL, e.g. rate=1000000/s (shaping on, far above the "
        "machine's rate)",
    )
    p.add_argument(
        "--source-sessions",
        type=int,
        default=4,
        help="smtp-source's sessions (the issue measured it with 4)",
    )
    p.add_argument("--naive-recipients", type=int, default=3000)
    p.add_argument(
        "--csv-recipients", type=int, default=1_000_000, help="rows of the enqueue-csv file"
    )
    p.add_argument(
        "--rtt-recipients", type=int, default=10000, help="campaign size through the delay proxy"
    )
    p.add_argument(
        "--rtt-concurrency",
        type=int,
        default=4,
        help="worker processes for the remote-relay case (README: a relay far away)",
    )
    p.add_argument(
        "--rtt-sessions",
        type=int,
        default=32,
        help="MAILER_SMTP_SESSIONS for the remote-relay case",
    )
    p.add_argument("--rtt-ms", type=float, default=20.0, help="round trip the proxy adds")
    p.add_argument("--txn-count", type=int, default=50)
    p.add_argument("--txn-idle-interval", type=float, default=0.1)
    p.add_argument("--sink", default="auto", choices=["auto", "smtp-sink", "python"])
    p.add_argument(
        "--pg-url",
        default=os.environ.get(
            "MAILER_BENCH_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
        ),
    )
    p.add_argument("--pg-schema", default="mailer_bench")
    p.add_argument("--poll", type=float, default=0.25, help="seconds between DB polls")
    p.add_argument(
        "--stall-timeout",
        type=float,
        default=60.0,
        help="give up a run after this long without progress",
    )
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, SQLite)")
    args = p.parse_args(argv)
    if args.quick:
        args.runs = 1
        args.recipients = 5000
        args.naive_recipients = min(args.naive_recipients, 1000)
        args.rtt_recipients = min(args.rtt_recipients, 2000)
        args.csv_recipients = min(args.csv_recipients, 100_000)
    selected = args.only.split(",") if args.only else DEFAULT_ORDER
    unknown = [c for c in selected if c not in CASES]
    if unknown:
        p.error(f"unknown case(s) {unknown}; choose from {','.join(CASES)}")
    args.cases = [c for c in DEFAULT_ORDER if c in selected]
    return args


def settle(b: Bench) -> None:
    """Before every run: the writes of the runs before it (a million-row enqueue leaves
    gigabytes for PostgreSQL's checkpointer and the kernel to flush) are flushed now, not
    during this run's measurement."""
    os.sync()
    if b.pg_url is None:
        return
    try:
        pg_execute(b.pg_url, "CHECKPOINT", autocommit=True)
    except Exception as exc:  # e.g. a role not allowed to: the run goes on unsettled
        print(f"  (CHECKPOINT failed: {exc.__class__.__name__}; runs may pay for earlier writes)")


class CaseRunner:
    """One case's runs. The runs of all cases are taken in turn (a run of each, then the
    next round), so that the machine's slow spells fall on every case alike and the ratios
    compare runs made at about the same time."""

    def __init__(self, b: Bench, case: str) -> None:
        self.b, self.case = b, case
        self.runs: list[dict[str, Any]] = []
        self.naive: list[NaiveWorker] = []
        a = b.args
        rtt_mode = case.split("-")[0]
        # the raw clients through the proxy: about 4 s of sending at its round trip
        per_msg = (4 if rtt_mode == "lockstep" else 1) * a.rtt_ms / 1000
        rtt_count = max(a.clients * 10, int(4.0 / per_msg) * a.clients)
        jobs: dict[str, Callable[[], dict[str, Any]]] = {
            "lockstep": lambda: case_client(b, case, b.sink.port, a.recipients, a.clients),
            "pipelined": lambda: case_client(b, case, b.sink.port, a.recipients, a.clients),
            "lockstep-rtt20": lambda: case_client(
                b, rtt_mode, b.delay_proxy().port, rtt_count, a.clients
            ),
            "pipelined-rtt20": lambda: case_client(
                b, rtt_mode, b.delay_proxy().port, rtt_count, a.clients
            ),
            "smtp-source": lambda: case_source(b, a.recipients, a.source_sessions),
            "naive": self._naive_run,
            "mailer-pg": lambda: case_mailer(b, case, "pg", b.sink.url, a.recipients),
            "mailer-sqlite": lambda: case_mailer(b, case, "sqlite", b.sink.url, a.recipients),
            "mailer-pg-lockstep": lambda: case_mailer(
                b, case, "pg", b.sink.url + "&pipelining=off", a.recipients
            ),
            "enqueue-csv": lambda: case_enqueue_csv(b, a.csv_recipients),
            "txn-busy": lambda: case_mailer(b, case, "pg", b.sink.url, a.recipients, txn=True),
            "txn-idle": lambda: case_txn_idle(b),
            "mailer-pg-rtt20": lambda: case_mailer(
                b, case, "pg-rtt", b.delay_proxy().url, a.rtt_recipients
            ),
        }
        self.job = jobs[case]

    def _naive_run(self) -> dict[str, Any]:
        if not self.naive:  # started on the first run; readiness failures count as that run's
            self.naive.append(NaiveWorker(self.b))
        return case_naive(self.b, self.naive[0])

    def close(self) -> None:
        for worker in self.naive:
            worker.stop()
        self.naive.clear()

    def once(self) -> None:
        case = self.case
        settle(self.b)
        t0 = now()
        try:
            result = self.job()
        except Exception as exc:
            result = {
                "exception": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(),
            }
            print(f"  ! {case}: {result['exception'][:2000]}", flush=True)
        result["wall_seconds"] = now() - t0
        self.runs.append(result)
        show = result.get("msgs_per_s")
        extra = ""
        if "txn" in result or case == "txn-idle":
            t = result.get("txn", result)
            extra = (
                f" send() p50 {fmt_ms(t.get('enqueue_p50'))} ms, end-to-end p50/p99 "
                f"{fmt_ms(t.get('e2e_p50'))}/{fmt_ms(t.get('e2e_p99'))} ms"
            )
        if "enqueue_per_s" in result:
            extra += f" (enqueue {fmt_rate(result['enqueue_per_s'])}/s)"
        print(
            f"  {case} run {len(self.runs)}: {fmt_rate(show)} msgs/s{extra} "
            f"[{result['wall_seconds']:.1f}s]",
            flush=True,
        )


# the variables the bench sets for mailer itself; others set in its environment are recorded
_OWN_VARIABLES = (
    "MAILER_DATABASE_URL",
    "MAILER_BROKER_URL",
    "MAILER_SMTP_URL",
    "MAILER_FROM",
    "MAILER_LOG_LEVEL",
)


def session_config(b: Bench) -> dict[str, Any]:
    """The settings the session ran with, for the JSON file."""
    args = b.args
    return {
        "args": {k: v for k, v in vars(args).items() if k != "cases"},
        "cases": args.cases,
        "sink": {"kind": b.sink.kind, "argv": b.sink.argv},
        "redis": {"version": b.redis.version, "url": b.redis.url},
        "postgresql": b.pg_note,
        "pg_schema": args.pg_schema,
        "mailer_env_passed_through": {
            k: v
            for k, v in os.environ.items()
            if k.startswith("MAILER_") and k not in _OWN_VARIABLES
        },
        "message_bytes": len(__import__("content").build_message()),
    }


def skip_reason(b: Bench, case: str) -> str | None:
    if case.startswith(("mailer-pg", "txn")) and b.pg_url is None:
        return f"PostgreSQL unavailable: {b.pg_note}"
    if case == "smtp-source" and infra.postfix_tool("smtp-source") is None:
        return "smtp-source is not installed (apt-get install postfix)"
    return None


def run_cases(b: Bench, report: dict[str, Any]) -> bool:
    """Every case's runs, a round at a time, into the report; True if a run failed."""
    args = b.args
    runners: dict[str, CaseRunner] = {}
    for case in args.cases:
        print(f"- {case}: {CASES[case]}", flush=True)
        skip = skip_reason(b, case)
        if skip:
            report["cases"][case] = {"description": CASES[case], "runs": [], "skipped": skip}
            print(f"  skipped: {skip}")
            continue
        runners[case] = CaseRunner(b, case)
    try:
        for round_no in range(args.runs):
            if args.runs > 1:
                print(f"round {round_no + 1} of {args.runs}", flush=True)
            for runner in runners.values():
                runner.once()
    finally:
        for runner in runners.values():
            runner.close()
    failed = False
    for case, runner in runners.items():
        failed |= any("exception" in r or "error" in r for r in runner.runs)
        report["cases"][case] = {"description": CASES[case], "runs": runner.runs}
    return failed


def report_results(report: dict[str, Any], args: argparse.Namespace) -> None:
    """The summary, ratios and yardstick into the report, and the table printed."""
    rows, ratios = summarize(report, args)
    report["summary"] = [
        {
            "what": r[0],
            "msgs_per_s": report["cases"][r[0]].get("median", {}).get("msgs_per_s"),
            "cpu_ms_per_msg": r[2],
            "notes": r[3],
        }
        for r in rows
    ]
    report["ratios"] = ratios
    report["ratios_by_round"] = by_round = round_ratios(report, ratios)
    report["machine"]["yardstick_ms_end"] = yardstick_ms()
    print_table(rows, ratios, args.runs, by_round)
    print(
        "machine yardstick (a fixed pure-Python loop, lower is faster; compare machines "
        f"with it): {report['machine']['yardstick_ms_start']:.1f} ms at the start, "
        f"{report['machine']['yardstick_ms_end']:.1f} ms at the end\n"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    infra.install_signal_handlers()
    workdir = Path(tempfile.mkdtemp(prefix="mailer-bench-"))
    report: dict[str, Any] = {"cases": {}}
    b: Bench | None = None
    failed = False
    t_start = now()
    try:
        report["machine"] = machine_info(None)
        pg_url, pg_note = pg_probe(args.pg_url)
        redis = infra.Redis(workdir)
        sink = infra.Sink(workdir, args.sink)
        b = Bench(args, workdir, redis, sink, pg_url, pg_note)
        report["config"] = session_config(b)
        print(
            f"mailer bench: {len(args.cases)} case(s) x {args.runs} run(s); sink {sink.kind} "
            f":{sink.port}, redis :{redis.port}, {pg_note}; work dir {workdir}",
            flush=True,
        )
        failed = run_cases(b, report)
        report_results(report, args)
    except BaseException as exc:
        failed = True
        report["error"] = f"{type(exc).__name__}: {exc}"
        report["traceback"] = traceback.format_exc()
        if not isinstance(exc, KeyboardInterrupt | SystemExit):
            traceback.print_exc()
        else:
            print(f"\ninterrupted ({exc!r}); stopping everything", file=sys.stderr)
    finally:
        PROCS.stop_all()
        if b is not None and b.pg_url is not None:
            with contextlib.suppress(Exception):
                pg_execute(b.pg_url, f"DROP SCHEMA IF EXISTS {args.pg_schema} CASCADE")
        report.setdefault("machine", {})["loadavg_end"] = os.getloadavg()
        report["machine"]["bench_seconds"] = now() - t_start
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"wrote {out}")
        if args.keep or failed:
            print(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

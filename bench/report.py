"""The benchmark's report: the medians of the runs, the table printed at the end, and the
ratios between cases."""

from __future__ import annotations

import argparse
from typing import Any

from session import median

# the ratios reported (numerator / denominator), of the medians and within each round
RATIOS = [
    *(
        (num, den)
        for num in ("mailer-pg", "mailer-sqlite")
        for den in ("lockstep", "pipelined", "smtp-source", "naive")
    ),
    ("mailer-pg-lockstep", "lockstep"),
    ("mailer-pg-rtt20", "lockstep-rtt20"),
    ("mailer-pg-rtt20", "pipelined-rtt20"),
]


def fmt_rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def _medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of every numeric figure (and of the `txn` sub-figures) over the good runs."""
    ok = [r for r in runs if "exception" not in r]
    out: dict[str, Any] = {}
    keys = {k for r in ok for k, v in r.items() if isinstance(v, int | float)}
    for key in sorted(keys):
        out[key] = median([r.get(key) for r in ok])
    sub = {k for r in ok for k, v in r.get("txn", {}).items() if isinstance(v, int | float)}
    if sub:
        out["txn"] = {k: median([r.get("txn", {}).get(k) for r in ok]) for k in sorted(sub)}
    return out


def _cpu(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _worker_rss(m: dict[str, Any]) -> str:
    return f"{m.get('worker_peak_rss_mb', 0):.0f} MB (PSS {m.get('worker_peak_pss_mb', 0):.0f})"


def _latencies(t: dict[str, Any]) -> str:
    """The transactional send's latencies: the call, and end to end."""
    return (
        f"call p50/p99 {fmt_ms(t.get('enqueue_p50'))}/{fmt_ms(t.get('enqueue_p99'))} ms, "
        f"end to end p50/p99 {fmt_ms(t.get('e2e_p50'))}/{fmt_ms(t.get('e2e_p99'))} ms"
    )


_CLIENTS = ("lockstep", "pipelined", "smtp-source", "lockstep-rtt20", "pipelined-rtt20")


def _warnings(runs: list[dict[str, Any]]) -> str:
    """Failed runs, and runs made with different mailer code."""
    errs = sum(1 for r in runs if "exception" in r)
    bad = f"; {errs} of {len(runs)} run(s) FAILED" if errs else ""
    codes = {r.get("mailer_code") for r in runs} | {
        r["mailer_code_changed_to"] for r in runs if "mailer_code_changed_to" in r
    }
    codes.discard(None)
    if len(codes) > 1:
        bad += f"; mailer/ CHANGED between or during runs ({len(codes)} versions)"
    return bad


def _machine(m: dict[str, Any]) -> str:
    busy = m.get("machine_cpu_busy")
    pg = m.get("postgres_cpu_ms_per_msg")
    server = f"; PostgreSQL CPU {pg:.3f} ms/msg" if pg else ""
    return (f"; machine {busy:.0%} busy" if busy is not None else "") + server


def _clients_row(case: str, m: dict[str, Any], args: argparse.Namespace) -> list[str]:
    via = f", through the {args.rtt_ms:g} ms RTT proxy" if case.endswith("rtt20") else ""
    who = f"{args.clients} client processes"
    if case == "smtp-source":
        who = f"{m.get('sessions', 0):.0f} sessions, no PIPELINING"
    notes = f"{m.get('messages', 0):.0f} msgs, {who}{via}"
    cpu = m.get("client_cpu_ms_per_msg")
    return [case, fmt_rate(m.get("msgs_per_s")), _cpu(cpu), notes]


def _naive_row(case: str, m: dict[str, Any], args: argparse.Namespace) -> list[str]:
    conc = f"{args.pool} -c {args.concurrency}"
    notes = f"{m.get('messages', 0):.0f} msgs, {conc}; worker RSS {_worker_rss(m)}{_machine(m)}"
    cpu = m.get("worker_cpu_ms_per_msg")
    return [case, fmt_rate(m.get("msgs_per_s")), _cpu(cpu), notes]


def _mailer_row(case: str, m: dict[str, Any], args: argparse.Namespace) -> list[str]:
    how = f"{args.pool} -c {args.mailer_concurrency}"
    if case == "mailer-pg-lockstep":
        how += ", PIPELINING off"
    if case.endswith("rtt20"):
        how = f"{args.pool} -c {args.rtt_concurrency}, MAILER_SMTP_SESSIONS={args.rtt_sessions}"
    notes = (
        f"{m.get('recipients', 0):.0f} rcpts, {how}; "
        f"{fmt_rate(m.get('msgs_per_s_from_spawn'))}/s from worker spawn; enqueue "
        f"{fmt_rate(m.get('enqueue_per_s'))}/s; peak RSS producer "
        f"{m.get('producer_peak_rss_mb', 0):.0f} MB, worker {_worker_rss(m)}{_machine(m)}"
    )
    if case == "txn-busy":
        t = m.get("txn", {})
        notes = f"send() during the campaign: {_latencies(t)}; " + notes
    cpu = m.get("worker_cpu_ms_per_msg")
    return [case, fmt_rate(m.get("msgs_per_s")), _cpu(cpu), notes]


def _enqueue_csv_row(case: str, m: dict[str, Any], args: argparse.Namespace) -> list[str]:
    notes = (
        f"{fmt_rate(m.get('enqueue_per_s'))} recipients/s: {m.get('recipients', 0):,.0f} "
        f"CSV rows in {m.get('enqueue_seconds', 0):.1f} s, process start to exit; "
        f"peak RSS {m.get('producer_peak_rss_mb', 0):.0f} MB"
    )
    return [case, "-", "-", notes]


def _txn_idle_row(case: str, m: dict[str, Any], args: argparse.Namespace) -> list[str]:
    notes = (
        f"send() to an idle worker: {_latencies(m)}; first call "
        f"of a process {fmt_ms(m.get('first_call_s'))} ms"
    )
    return [case, "-", "-", notes]


def _row(case: str, m: dict[str, Any], args: argparse.Namespace) -> list[str] | None:
    """A case's table row (what, msgs/s, CPU ms/msg, notes) from its medians."""
    if case in _CLIENTS:
        return _clients_row(case, m, args)
    if case == "naive":
        return _naive_row(case, m, args)
    if case.startswith("mailer") or case == "txn-busy":
        return _mailer_row(case, m, args)
    if case == "enqueue-csv":
        return _enqueue_csv_row(case, m, args)
    if case == "txn-idle":
        return _txn_idle_row(case, m, args)
    return None


def summarize(
    report: dict[str, Any], args: argparse.Namespace
) -> tuple[list[list[str]], dict[str, float]]:
    """Table rows (what, msgs/s, CPU ms/msg, notes) and the ratios, from the runs' medians."""
    cases = report["cases"]
    rows: list[list[str]] = []
    for case, c in cases.items():
        if "skipped" in c:
            rows.append([case, "-", "-", c["skipped"]])
            continue
        m = c["median"] = _medians(c["runs"])
        row = _row(case, m, args)
        if row is not None:
            row[3] += _warnings(c["runs"])
            rows.append(row)

    def rate(case: str) -> float | None:
        value = cases.get(case, {}).get("median", {}).get("msgs_per_s")
        return float(value) if value else None

    ratios: dict[str, float] = {}
    for num, den in RATIOS:
        a, b = rate(num), rate(den)
        if a and b:
            ratios[f"{num} / {den}"] = a / b
    return rows, ratios


def round_ratios(report: dict[str, Any], ratios: dict[str, float]) -> dict[str, list[float]]:
    """Each ratio within each round (the runs of a round were made minutes apart): how much
    of a ratio's spread is the machine's."""
    out: dict[str, list[float]] = {}
    for num, den in RATIOS:
        name = f"{num} / {den}"
        if name not in ratios:
            continue
        a = report["cases"][num]["runs"]
        b = report["cases"][den]["runs"]
        out[name] = [
            x["msgs_per_s"] / y["msgs_per_s"]
            for x, y in zip(a, b, strict=False)
            if x.get("msgs_per_s") and y.get("msgs_per_s")
        ]
    return out


def print_table(
    rows: list[list[str]],
    ratios: dict[str, float],
    runs: int,
    by_round: dict[str, list[float]],
) -> None:
    head = ["what", "msgs/s", "CPU ms/msg", f"notes (median of {runs} run(s))"]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(3)]
    print()
    print(f"{head[0]:<{widths[0]}}  {head[1]:>{widths[1]}}  {head[2]:>{widths[2]}}  {head[3]}")
    print(f"{'-' * widths[0]}  {'-' * widths[1]}  {'-' * widths[2]}  {'-' * 40}")
    for r in rows:
        print(f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}")
    print(
        "\nmsgs/s: mailer = sent / (first attempt -> last outcome committed, from the DB); "
        "naive = N / (first publish -> the sink\ncounted N); clients = N / (common start -> "
        "last client done). CPU ms/msg: the sending processes only (worker tree\nor clients), "
        "not PostgreSQL, Redis or the sink; a PostgreSQL case's\nnotes give the server's own "
        "CPU over the drain. Other jobs on this machine make absolute figures noisy."
    )
    if ratios:
        print("\nratios (msgs/s): of the medians; and within each round, lowest to highest")
        for k, v in ratios.items():
            spread = sorted(by_round.get(k, []))
            rounds = f"   rounds {spread[0]:.2f}-{spread[-1]:.2f}" if len(spread) > 1 else ""
            print(f"  {k:<34} {v:6.2f}{rounds}")
    print()

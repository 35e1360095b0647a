"""The scale run's table: each case on the empty outbox and with the history, their ratio or
the target, and whether the target is met (judged on the history's figure)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Getter = Callable[[dict[str, Any]], float | None]


@dataclass(frozen=True)
class Row:
    label: str
    case: str
    get: Getter
    unit: str
    # target: ("ratio>=", 0.9) compares history/empty; ("<=", x) the history's figure
    target: tuple[str, float] | None = None
    error_key: str = "error"  # where the case puts this row's failure


def _dig(*path: str) -> Getter:
    def get(result: dict[str, Any]) -> float | None:
        value: Any = result
        for key in path:
            if not isinstance(value, dict) or key not in value:
                return None
            value = value[key]
        return float(value) if isinstance(value, int | float) else None

    return get


def _ms(*path: str) -> Getter:
    inner = _dig(*path)

    def get(result: dict[str, Any]) -> float | None:
        value = inner(result)
        return None if value is None else value * 1000

    return get


ROWS = (
    Row("campaign throughput", "campaign", _dig("msgs_per_s"), "msg/s", ("ratio>=", 0.90)),
    Row("dispatcher pass, {big} due", "dispatch", _dig("pass_s"), "s"),
    Row("  wake-ups it published", "dispatch", _dig("published"), "ids"),
    Row("cancel --campaign, {big}", "dispatch", _dig("cancel_s"), "s"),
    Row("Redis lost, {big} queued: resumed", "redis", _dig("resume_s"), "s", ("<=", 9.0)),
    Row("  longest pause in sending", "redis", _dig("longest_pause_s"), "s"),
    Row(
        "campaign status, {big} (call)", "read", _ms("status_call", "first_s"), "ms", ("<=", 200.0)
    ),
    Row("  again (best of 2)", "read", _ms("status_call", "best_s"), "ms"),
    Row("campaign status (command)", "read", _dig("status_cli_s"), "s"),
    Row("report --format csv, {big}", "read", _dig("report_s"), "s", ("<=", 20.0)),
    Row("  its peak RSS", "read", _dig("report_peak_rss_mb"), "MB"),
    Row("  status's peak RSS (no rows)", "read", _dig("status_peak_rss_mb"), "MB"),
    Row("retry --dry-run (command)", "read", _dig("retry_cli_s"), "s", None, "retry_error"),
    Row("  (call)", "read", _ms("retry_call", "first_s"), "ms", None, "retry_error"),
    Row("suppress import, {big}", "suppress", _dig("seconds"), "s"),
    Row("retry of {big} beside a worker", "retry", _dig("retry_s"), "s", ("<=", 60.0)),
    Row("  the worker's rate before", "retry", _dig("rate_before"), "msg/s"),
    Row("  and during it", "retry", _dig("rate_during"), "msg/s"),
)


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def _judge(row: Row, empty: float | None, history: float | None) -> tuple[str, str]:
    """(ratio or target text, met?)."""
    ratio = f"x{history / empty:.2f}" if empty and history is not None else ""
    if row.target is None:
        return ratio, ""
    kind, bound = row.target
    if kind == "ratio>=":
        if not empty or history is None:
            return f">= {bound:.0%}", "?"
        return (
            f"{history / empty:.0%} (>= {bound:.0%})",
            "yes" if history / empty >= bound else "NO",
        )
    if history is None:
        return f"<= {_fmt(bound)} {row.unit}", "?"
    return f"{ratio} (<= {_fmt(bound)})".strip(), "yes" if history <= bound else "NO"


def human(n: int) -> str:
    for unit, size in (("M", 1_000_000), ("k", 1_000)):
        if n >= size and n % (size // 10) == 0:
            return f"{n / size:g}{unit}"
    return f"{n:,}"


def table(
    cases: dict[str, dict[str, Any]], sides: list[str], big: int
) -> tuple[str, list[dict[str, Any]]]:
    """The table's text and its rows (for the JSON file); `big` the big cases' row count."""
    header = (
        f"{'case':32} {'unit':6} {'empty outbox':>13} {'with history':>13}  "
        f"{'ratio / target':22} met?"
    )
    lines = [header, "-" * len(header)]
    rows = []
    for row in ROWS:
        if row.case not in cases:  # not run (--only)
            continue
        results = cases[row.case]
        empty = _value(row, results.get("empty"), "empty" in sides)
        history = _value(row, results.get("history"), "history" in sides)
        judged, met = _judge(row, empty, history)
        key = row.error_key
        errors = [f"{s}: {results[s][key]}" for s in sides if key in results.get(s, {})]
        if errors and history is None:
            met = (
                "STALLED" if any("stalled" in e or "not drained" in e for e in errors) else "ERROR"
            )
        label = row.label.format(big=human(big))
        lines.append(
            f"{label:32} {row.unit:6} {_fmt(empty):>13} {_fmt(history):>13}  {judged:22} {met}"
        )
        rows.append(
            {
                "case": label,
                "unit": row.unit,
                "empty": empty,
                "history": history,
                "ratio_or_target": judged,
                "met": met,
            }
        )
    return "\n".join(lines), rows


def _value(row: Row, result: dict[str, Any] | None, wanted: bool) -> float | None:
    if not wanted or result is None:
        return None
    return row.get(result)


def errors(cases: dict[str, dict[str, Any]]) -> list[str]:
    out = []
    for case, sides in cases.items():
        for side, result in sides.items():
            for key in ("error", "retry_error"):
                if key in result:
                    out.append(f"{case} ({side}): {result[key]}")
            for left in result.get("left_running", []):
                out.append(f"{case} ({side}): left running on the server: {left}")
    return out

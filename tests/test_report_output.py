"""`mailer report`: its output is the same, byte for byte, as the rows read through the ORM and
written by csv.DictWriter and json.dumps (the first implementation's way), awkward values
included."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime

from click.testing import CliRunner
from sqlalchemy import func, select, update

import mailer
from mailer import db, queries
from mailer.cli import cli
from mailer.models import Delivery, DeliveryState
from tests.helpers import add_template, deliveries

COLUMNS = ("recipient", "state", "attempts", "code", "enhanced", "reply", "updated_at")
AWKWARD = [
    # state, attempts, code, enhanced, reply, updated_at
    ("sent", 1, 250, "2.0.0", "250 2.0.0 Ok: queued as 1A2B", datetime(2026, 12, 1, 8, tzinfo=UTC)),
    (
        "bounced",
        2,
        550,
        "5.1.1",
        'no such user, "x"\r\nsecond line',
        datetime(2026, 12, 1, 8, 0, 0, 1, UTC),
    ),
    ("queued", 0, None, None, None, datetime(2026, 12, 1, 23, 59, 59, 999999, UTC)),
    (
        "deferred",
        3,
        451,
        None,
        "451 try later; é ünïcode ☃",
        datetime(1999, 1, 2, 3, 4, 5, tzinfo=UTC),
    ),
]


def _campaign() -> int:
    add_template()
    rows = [{"email": f"r{i}@Example.com", "name": "x"} for i in range(len(AWKWARD))]
    campaign = mailer.send_campaign("welcome", rows).campaign_id
    with db.session_scope() as session:
        for d, (state, attempts, code, enhanced, reply, at) in zip(
            deliveries(), AWKWARD, strict=True
        ):
            session.execute(
                update(Delivery)
                .where(Delivery.id == d.id)
                .values(
                    state=state,
                    attempts=attempts,
                    last_code=code,
                    last_enhanced=enhanced,
                    last_reply=reply,
                    updated_at=at,
                )
            )
    return campaign


def _reference(states: set[str] | None = None) -> list[dict[str, object]]:
    return [
        {
            "recipient": d.recipient,
            "state": d.state.value,
            "attempts": d.attempts,
            "code": d.last_code,
            "enhanced": d.last_enhanced,
            "reply": d.last_reply or "",
            "updated_at": d.updated_at.isoformat(),
        }
        for d in deliveries()
        if states is None or d.state.value in states
    ]


def _report(*args: str) -> str:
    out = CliRunner().invoke(cli, ["report", *args])
    assert out.exit_code == 0, out.output
    return out.stdout_bytes.decode()  # as written: `output` turns \r\n into \n


def test_csv_is_byte_identical(any_db: str) -> None:
    campaign = _campaign()
    expected = io.StringIO()
    writer = csv.DictWriter(expected, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(_reference())
    assert _report(str(campaign), "--format", "csv") == expected.getvalue()


def test_csv_of_some_states_is_byte_identical(any_db: str) -> None:
    campaign = _campaign()
    expected = io.StringIO()
    writer = csv.DictWriter(expected, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(_reference({"bounced", "queued"}))
    got = _report(str(campaign), "--format", "csv", "--state", "bounced", "--state", "queued")
    assert got == expected.getvalue()


def test_json_lines_are_byte_identical(any_db: str) -> None:
    campaign = _campaign()
    expected = "".join(json.dumps(row) + "\n" for row in _reference())
    assert _report(str(campaign), "--format", "json") == expected
    assert {DeliveryState(r["state"]) for r in map(json.loads, expected.splitlines())}


def test_a_report_read_in_part_leaves_its_session_as_it_was(any_db: str) -> None:
    campaign = _campaign()
    with db.session_scope() as session:
        rows = queries.report_rows(session, campaign)
        assert next(rows)[0] == "r0@example.com"
        # the streaming option went with the statement, not onto the session's connection
        assert not session.connection().get_execution_options().get("yield_per")
        assert session.scalar(select(func.count()).select_from(Delivery)) == len(AWKWARD)

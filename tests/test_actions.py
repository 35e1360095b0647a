"""The operator actions: one implementation for the CLI and the web, each with a dry-run count
that the action then matches, each audited, none allowed to a viewer."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from click.testing import CliRunner
from sqlalchemy import select

import mailer
from mailer import actions, db, relay_health
from mailer.actions import Action, Actor, Role
from mailer.cli import cli
from mailer.delivery import deliver_chunk
from mailer.errors import InputError, PermissionDenied
from mailer.filters import DeliveryFilter
from mailer.models import AuditEntry, Campaign, DeliveryState, Suppression
from mailer.replies import Phase, SMTPReply
from mailer.transport.memory import MemoryTransport
from tests.helpers import add_template, count, deliveries, states

S = DeliveryState
ANN = Actor("ann", Role.OPERATOR)
VIC = Actor("vic", Role.VIEWER)


def _campaign() -> int:
    """Five recipients: three refused for policy (failed), one bounced (and so suppressed),
    one sent."""
    add_template()
    transport = MemoryTransport()
    for i in range(3):
        transport.script(f"p{i}@example.com", Phase.RCPT, SMTPReply.of(550, "5.7.1 Blocked"))
    transport.script("gone@example.com", Phase.RCPT, SMTPReply.of(550, "5.1.1 No such user"))
    rows = [{"email": f"p{i}@example.com", "name": "x"} for i in range(3)]
    rows += [{"email": e, "name": "x"} for e in ("gone@example.com", "ok@example.com")]
    result = mailer.send_campaign("welcome", rows)
    deliver_chunk([d.id for d in deliveries()], transport=transport)
    return result.campaign_id


def _audit() -> list[AuditEntry]:
    with db.session_scope() as session:
        return list(session.scalars(select(AuditEntry).order_by(AuditEntry.id)))


def test_retry_matches_its_dry_run_and_is_audited(any_db: str) -> None:
    campaign = _campaign()
    failed = DeliveryFilter(campaign_id=campaign, states=(S.FAILED,), enhanced="5.7")
    with db.session_scope() as session:
        assert actions.preview(session, Action.RETRY, failed) == 3
    assert count(AuditEntry) == 0  # a dry run leaves no trace
    with db.session_scope() as session:
        done = actions.retry(session, ANN, failed)
    assert done.count == 3
    assert sorted(states().values()) == ["bounced", "queued", "queued", "queued", "sent"]
    [entry] = _audit()
    assert (entry.actor, entry.role, entry.action, entry.count) == ("ann", "operator", "retry", 3)
    assert entry.target == {"campaign_id": campaign, "states": ["failed"], "enhanced": "5.7"}
    assert entry.id == done.audit_id and entry.at.tzinfo is not None


def test_a_viewer_may_preview_but_not_act(any_db: str) -> None:
    campaign = _campaign()
    target = DeliveryFilter(campaign_id=campaign, states=(S.FAILED,))
    with db.session_scope() as session:
        assert actions.preview(session, Action.RETRY, target) == 3
    tries = [
        lambda s: actions.retry(s, VIC, target),
        lambda s: actions.cancel(s, VIC, target),
        lambda s: actions.suppress(s, VIC, target),
        lambda s: actions.unsuppress_addresses(s, VIC, ["gone@example.com"]),
        lambda s: actions.pause_campaign(s, VIC, campaign),
        lambda s: actions.resume_relay(s, VIC, "default"),
    ]
    before = states()
    for attempt in tries:
        with pytest.raises(PermissionDenied, match="vic is a viewer"), db.session_scope() as s:
            attempt(s)
    assert states() == before and count(AuditEntry) == 0 and count(Suppression) == 1


def test_a_state_alone_is_not_a_target(any_db: str) -> None:
    with pytest.raises(InputError, match="say which deliveries"), db.session_scope() as s:
        actions.retry(s, ANN, DeliveryFilter(states=(S.FAILED,)))


def test_suppress_and_unsuppress_by_filter(any_db: str) -> None:
    campaign = _campaign()
    target = DeliveryFilter(campaign_id=campaign, states=(S.FAILED, S.BOUNCED))
    with db.session_scope() as session:
        # gone@ is listed already (its bounce): three to add, then all four to remove
        assert actions.preview(session, Action.SUPPRESS, target) == 3
        assert actions.suppress(session, ANN, target, reason="complaints").count == 3
    with db.session_scope() as session:
        assert actions.preview(session, Action.UNSUPPRESS, target) == 4
        assert actions.unsuppress(session, ANN, target).count == 4
    assert count(Suppression) == 0
    assert [(e.action, e.count) for e in _audit()] == [("suppress", 3), ("unsuppress", 4)]
    assert _audit()[0].target["reason"] == "complaints"


def test_cancel_pause_resume_and_relay_resume_are_audited(any_db: str) -> None:
    add_template()
    campaign = mailer.send_campaign(
        "welcome", [{"email": f"r{i}@example.com", "name": "x"} for i in range(4)]
    ).campaign_id
    now = datetime.now(UTC)
    with db.session_scope() as session:
        assert actions.pause_campaign(session, ANN, campaign).count == 4  # waiting
        assert session.get(Campaign, campaign).paused  # type: ignore[union-attr]
        assert actions.preview(session, Action.CANCEL, DeliveryFilter(campaign_id=campaign)) == 4
        assert actions.cancel(session, ANN, DeliveryFilter(campaign_id=campaign)).count == 4
        assert actions.resume_campaign(session, ANN, campaign).count == 0
        relay_health.pause(session, "default", "535 bad credentials", now)
    with db.session_scope() as session:
        assert actions.preview_relay(session, "default") == 1
        assert actions.resume_relay(session, ANN, "default").count == 1
        assert relay_health.block(session, "default", now) is None
    assert [(e.action, e.count) for e in _audit()] == [
        ("pause", 4),
        ("cancel", 4),
        ("resume", 0),
        ("relay_resume", 1),
    ]
    assert set(states().values()) == {"cancelled"}


def test_the_cli_acts_through_actions_as_the_named_actor(any_db: str, tmp_path) -> None:
    campaign = _campaign()
    runner = CliRunner()
    args = ["retry", "--campaign", str(campaign), "--state", "failed", "--reply", "blocked"]
    assert "3 deliveries would be queued again" in runner.invoke(cli, [*args, "--dry-run"]).output
    out = runner.invoke(cli, [*args, "--as", "carol"])
    assert "3 deliveries queued again" in out.output, out.output
    (tmp_path / "list.csv").write_text("email\nnew@example.com\ngone@example.com\n")
    out = runner.invoke(cli, ["suppress", "import", str(tmp_path / "list.csv")])
    assert "1 added (1 were already listed)" in out.output, out.output
    assert runner.invoke(cli, ["campaign", "pause", str(campaign)]).exit_code == 0
    entries = _audit()
    assert (entries[0].actor, entries[0].action, entries[0].count) == ("carol", "retry", 3)
    assert entries[1].action == "suppress_import" and entries[1].target["read"] == 2
    assert entries[2].role == "admin" and entries[2].actor  # the OS user
    listed = runner.invoke(cli, ["audit"]).output.splitlines()
    assert len(listed) == 3 and " carol (admin) retry 3 " in listed[-1]
    assert "pause" in listed[0]  # newest first


def test_a_bad_filter_option_is_a_usage_error_naming_it(any_db: str) -> None:
    out = CliRunner().invoke(cli, ["retry", "--campaign", "1", "--enhanced", "five"])
    assert out.exit_code == 2 and "--enhanced" in out.output
    out = CliRunner().invoke(cli, ["cancel", "--state", "queued"])
    assert out.exit_code == 2 and "say what to cancel" in out.output


def test_a_filter_without_scope_acts_window_by_window(any_db: str) -> None:
    _campaign()
    runner = CliRunner()
    out = runner.invoke(cli, ["retry", "--code", "5xx", "--state", "failed", "--dry-run"])
    assert "3 deliveries would be queued again" in out.output, out.output
    out = runner.invoke(cli, ["retry", "--enhanced", "5.7.1", "--state", "failed"])
    assert "3 deliveries queued again" in out.output, out.output
    [entry] = _audit()
    assert entry.target == {"states": ["failed"], "enhanced": "5.7.1"} and entry.count == 3

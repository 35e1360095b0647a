"""An operator's change to many deliveries (cancel, retry, resume) goes a batch at a time, each
batch committed: the count is exact, and a change stopped part-way is completed by running it
again."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import event, update

import mailer
from mailer import batches, clock, config, db, dispatcher, outcomes
from mailer.cli import cli
from mailer.filters import DeliveryFilter
from mailer.models import Campaign, Delivery, DeliveryState, Suppression
from tests.helpers import add_template, count, deliveries

S = DeliveryState
N = 10


@pytest.fixture
def campaign(any_db: str, monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(batches, "BATCH", 3)
    add_template()
    rows = [{"email": f"r{i}@example.com", "name": "x"} for i in range(N)]
    return mailer.send_campaign("welcome", rows).campaign_id


def _set(ids: list[int], **values: Any) -> None:
    with db.session_scope() as session:
        session.execute(update(Delivery).where(Delivery.id.in_(ids)).values(**values))


def _states() -> list[str]:
    return [d.state.value for d in deliveries()]


class Stop(Exception):
    pass


def _stop_after(batches_done: int) -> Callable[[int, int], None]:
    """A progress callback that stops the change once `batches_done` batches committed."""
    seen: list[int] = []

    def progress(done: int, total: int) -> None:
        seen.append(done)
        if len(seen) >= batches_done:
            raise Stop

    return progress


def _updates_of_deliveries() -> list[str]:
    """The UPDATE statements on deliveries the engine sends while this list is watched."""
    seen: list[str] = []

    def before(_c: Any, _cur: Any, sql: str, *_: Any) -> None:
        if sql.lstrip().upper().startswith("UPDATE DELIVERIES"):
            seen.append(sql)

    event.listen(db.engine(), "before_cursor_execute", before)
    return seen


def test_cancel_goes_in_batches_and_counts_exactly(campaign: int) -> None:
    ids = [d.id for d in deliveries()]
    _set(ids[:2], state=S.SENT)  # gone out: not cancelled
    _set(ids[2:3], state=S.SENDING)  # in flight: finishes as it will
    _set(ids[3:4], state=S.DEFERRED)
    told: list[tuple[int, int]] = []
    statements = _updates_of_deliveries()
    with db.session_scope() as session:
        selection = DeliveryFilter(campaign_id=campaign).ids()
        n = outcomes.cancel(session, selection, clock.now(), lambda d, t: told.append((d, t)))
    assert n == 7
    assert told == [(3, 7), (6, 7), (7, 7)]
    assert len(statements) == 3  # one UPDATE a batch
    if db.engine().dialect.name == "postgresql":
        assert all("= ANY (" in sql.upper() for sql in statements)  # a typed array, not an IN list
    assert _states() == ["sent", "sent", "sending"] + ["cancelled"] * 7


def test_a_cancel_stopped_part_way_keeps_its_batches_and_finishes_when_run_again(
    campaign: int,
) -> None:
    selection = DeliveryFilter(campaign_id=campaign).ids()
    with pytest.raises(Stop), db.session_scope() as session:
        outcomes.cancel(session, selection, clock.now(), _stop_after(2))
    assert _states().count("cancelled") == 6  # two batches committed
    with db.session_scope() as session:
        assert outcomes.cancel(session, selection, clock.now()) == N - 6
    assert set(_states()) == {"cancelled"}


def test_the_cancel_command_counts_what_it_cancelled(campaign: int) -> None:
    _set([deliveries()[0].id], state=S.SENT)
    out = CliRunner().invoke(cli, ["cancel", "--campaign", str(campaign)])
    assert out.exit_code == 0, out.output
    assert f"{N - 1} deliveries cancelled" in out.output


def test_retry_goes_in_batches_and_a_stopped_one_finishes_when_run_again(campaign: int) -> None:
    ids = [d.id for d in deliveries()]
    _set(ids, state=S.FAILED, attempts=3, published_at=clock.now())
    _set(ids[:1], state=S.SENT)
    with db.session_scope() as session:
        session.add_all(
            Suppression(address=f"r{i}@example.com", reason="test", created_at=clock.now())
            for i in range(N)
        )
    selection = DeliveryFilter(campaign_id=campaign, states=(S.FAILED,)).ids()
    with pytest.raises(Stop), db.session_scope() as session:
        outcomes.requeue(
            session, selection, clock.now(), include_suppressed=True, progress=_stop_after(1)
        )
    # the first batch is queued again and off the suppression list; the rest are as they were
    assert _states() == ["sent"] + ["queued"] * 3 + ["failed"] * 6
    assert count(Suppression) == N - 3
    with db.session_scope() as session:
        n = outcomes.requeue(session, selection, clock.now(), include_suppressed=True)
    assert n == 6
    assert _states() == ["sent"] + ["queued"] * 9
    assert all(d.attempts == 0 and d.published_at is None for d in deliveries()[1:])
    assert count(Suppression) == 1  # the address that was sent keeps its entry


def test_a_resume_stopped_part_way_leaves_the_campaign_paused_until_run_again(
    campaign: int,
) -> None:
    ids = [d.id for d in deliveries()]
    _set(ids, published_at=clock.now())  # wake-ups the workers dropped while it was paused
    with db.session_scope() as session:
        outcomes.pause_campaign(session, campaign, True, clock.now())
    with pytest.raises(Stop), db.session_scope() as session:
        outcomes.pause_campaign(session, campaign, False, clock.now(), _stop_after(2))
    assert sum(d.published_at is None for d in deliveries()) == 6
    with db.session_scope() as session:
        assert session.get(Campaign, campaign).paused  # type: ignore[union-attr]
    out = CliRunner().invoke(cli, ["campaign", "resume", str(campaign)])
    assert out.exit_code == 0, out.output
    assert all(d.published_at is None for d in deliveries())
    with db.session_scope() as session:
        assert not session.get(Campaign, campaign).paused  # type: ignore[union-attr]


def test_a_paused_campaigns_waiting_deliveries_are_parked_out_of_the_dispatchers_way(
    campaign: int,
) -> None:
    ids = [d.id for d in deliveries()]
    _set(ids[:4], published_at=None)  # owed a wake-up
    _set(ids[:1], state=S.SENT)  # gone: left alone
    with db.session_scope() as session:
        outcomes.pause_campaign(session, campaign, True, clock.now())
    assert [d.published_at == outcomes.PARKED for d in deliveries()] == [False] + [True] * 9
    later = clock.now() + timedelta(days=30)  # every wake-up long lost, the queue empty
    with db.session_scope() as session:
        assert dispatcher.due(session, config.settings(), later, queue_empty=True) == []
    with db.session_scope() as session:
        outcomes.pause_campaign(session, campaign, False, clock.now())
    with db.session_scope() as session:
        found = dispatcher.due(session, config.settings(), later, queue_empty=True)
    assert sorted(i for i, _ in found) == ids[1:]


def test_a_long_change_tells_stderr_how_far_it_has_gone(
    campaign: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mailer.cli import deliveries as commands

    monkeypatch.setattr(commands, "PROGRESS_EVERY", 0.0)
    out = CliRunner().invoke(cli, ["cancel", "--campaign", str(campaign)])
    assert out.exit_code == 0, out.output
    assert "cancel: 3 of 10 done" in out.stderr and "cancel: 6 of 10 done" in out.stderr
    assert out.stdout == f"{N} deliveries cancelled\n"


def test_an_action_stopped_part_way_is_in_the_audit_log_unfinished(campaign: int) -> None:
    from mailer import actions, browse

    operator = actions.Actor("ops", actions.Role.OPERATOR)
    chosen = DeliveryFilter(campaign_id=campaign)
    with pytest.raises(Stop), db.session_scope() as session:
        actions.cancel(session, operator, chosen, progress=_stop_after(1))
    with db.session_scope() as session:
        [entry] = browse.audit_page(session).rows
    assert (entry.action, entry.actor, entry.count) == ("cancel", "ops", None)
    assert _states().count("cancelled") == 3  # the batch it committed stands

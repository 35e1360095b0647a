"""The campaign every fault scenario sends, and the check that a fault struck in its middle."""

from __future__ import annotations

from mailer import enqueue
from tests.faults.harness import RECIPIENTS, Rig
from tests.helpers import add_template

# the fault strikes once the server has stored this many messages: well inside the campaign
MIDWAY = 600


def recipient_address(i: int) -> str:
    return f"r{i:05d}@example.com"


def queue_campaign(
    n: int = RECIPIENTS, *, extra: dict[str, dict[str, object]] | None = None
) -> enqueue.CampaignResult:
    """The campaign every scenario sends: one template, one row (own context) per recipient;
    `extra` adds context to some rows (a row with `big` gets a body of `big` 96-byte lines)."""
    add_template(
        text=(
            "Hi {{ name }}, this is {{ email }}.\n"
            "{% if big is defined %}{% for _ in range(big) %}{{ 'x' * 95 }}\n{% endfor %}"
            "{% endif %}"
        )
    )
    extra = extra or {}
    rows = [
        {"email": recipient_address(i), "name": f"n{i}", **extra.get(recipient_address(i), {})}
        for i in range(n)
    ]
    result = enqueue.send_campaign("welcome", rows, name="faults")
    assert result.queued == n
    return result


def assert_mid_campaign(rig: Rig, total: int = RECIPIENTS) -> None:
    stored = len(rig.server.messages)
    assert stored < total, f"the campaign was over ({stored} stored) before the fault"

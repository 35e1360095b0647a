"""The dashboard tests' data: a small campaign delivered in this process, with bounces, policy
failures, a reply that holds markup and a script, and a transactional message."""

from __future__ import annotations

from dataclasses import dataclass

import mailer
from mailer import enqueue
from mailer.delivery import deliver_chunk
from mailer.replies import Phase, SMTPReply
from mailer.transport.memory import MemoryTransport
from tests.helpers import add_template, deliveries

GOOD = [f"ok{n}@example.com" for n in range(6)]
GONE = ["gone1@example.org", "gone2@example.org"]
POLICY = ["policy1@example.net", "policy2@example.net"]
HOSTILE_ADDRESS = "evil@example.net"
# markup and a script in a server's reply: the pages must show it as text and run nothing
HOSTILE_REPLY = (
    "5.7.1 <script>window.pwned = 1; alert('pwned')</script>"
    '<b id="injected">bold</b><img src=x onerror="window.pwned=2">'
)


@dataclass(frozen=True)
class Scenario:
    campaign_id: int
    transactional_id: int


def build() -> Scenario:
    add_template()
    rows = [{"email": a, "name": a.split("@")[0]} for a in [*GOOD, *GONE, *POLICY, HOSTILE_ADDRESS]]
    result = enqueue.send_campaign("welcome", rows, name="December <news> & offers")
    transport = MemoryTransport()
    for address in GONE:
        transport.script(address, Phase.RCPT, SMTPReply.of(550, "5.1.1 No such user here"))
    for address in POLICY:
        transport.script(address, Phase.DOT, SMTPReply.of(550, "5.7.1 Message refused by policy"))
    transport.script(HOSTILE_ADDRESS, Phase.DOT, SMTPReply.of(554, HOSTILE_REPLY))
    deliver_chunk([d.id for d in deliveries()], transport=transport)
    # a password reset to an address whose newsletter failed: search finds both messages
    reset = mailer.send(template="welcome", to=POLICY[0], context={"name": "reset"})
    return Scenario(result.campaign_id, reset)

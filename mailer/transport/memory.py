"""A transport that keeps what it is given and answers from a script: for tests and dry runs."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from datetime import datetime

from mailer import clock
from mailer.replies import Phase, ReplyCode, SMTPReply
from mailer.transport.base import Outgoing, RecipientResult, TransactionResult

_ACCEPTED = SMTPReply.of(ReplyCode.OK, "2.0.0 Ok: queued")
_TOO_MANY = SMTPReply.of(ReplyCode.INSUFFICIENT_STORAGE, "4.5.3 Too many recipients")


class MemoryTransport:
    """`script(address, phase, reply)` queues replies for one recipient, used in order; with
    none left the recipient is accepted. `sent` holds every accepted (recipient, data)."""

    name = "memory"

    def __init__(self, *, max_recipients: int | None = None) -> None:
        self.max_recipients = max_recipients  # beyond it, RCPT gets 452 4.5.3
        self._script: dict[str, list[tuple[Phase, SMTPReply]]] = defaultdict(list)
        self.sent: list[tuple[str, bytes]] = []
        self.transactions: list[Outgoing] = []
        self._outage: tuple[datetime, Phase, SMTPReply] | None = None
        # as SMTPSession would have sent them: each transaction's envelope behind the one
        # before it (`following`); `unkept` counts announced transactions not sent next
        self.following: list[Outgoing | None] = []
        self.unkept = 0

    def script(self, address: str, phase: Phase, reply: SMTPReply, times: int = 1) -> None:
        self._script[address.lower()].extend([(phase, reply)] * times)

    def outage(self, until: datetime, phase: Phase, reply: SMTPReply) -> None:
        """Until `until` (on mailer's clock), every transaction gets `reply` at `phase`."""
        self._outage = (until, phase, reply)

    def send(self, outgoing: Outgoing, *, deadline: float | None = None) -> TransactionResult:
        return self.send_overlapped(outgoing, None, None, deadline=deadline)

    def send_overlapped(
        self,
        outgoing: Outgoing,
        following: Outgoing | None,
        meanwhile: Callable[[], object] | None,
        *,
        deadline: float | None = None,
    ) -> TransactionResult:
        started = clock.now()
        if meanwhile is not None:
            meanwhile()
        if self.following and self.following[-1] is not None:
            self.unkept += self.following[-1] is not outgoing
        self.following.append(following)
        self.transactions.append(outgoing)
        if self._outage is not None and started < self._outage[0]:
            _, phase, reply = self._outage
            refused = tuple(RecipientResult(r, reply, phase) for r in outgoing.recipients)
            return TransactionResult(refused, self.name, False, started, clock.now())
        results = []
        for index, recipient in enumerate(outgoing.recipients):
            queued = self._script.get(recipient.lower())
            if self.max_recipients is not None and index >= self.max_recipients:
                phase, reply = Phase.RCPT, _TOO_MANY
            else:
                phase, reply = queued.pop(0) if queued else (Phase.DOT, _ACCEPTED)
            if reply.code is not None and reply.code < 400 and phase is Phase.DOT:
                self.sent.append((recipient, outgoing.data))
            results.append(RecipientResult(recipient, reply, phase))
        return TransactionResult(tuple(results), self.name, False, started, clock.now())

    def close(self) -> None:
        pass

"""What every transport takes and returns: one SMTP transaction, per-recipient replies."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import NamedTuple, Protocol

from mailer.replies import Phase, SMTPReply

# Made for every message: tuples, immutable as frozen dataclasses are and cheaper to make.


class Outgoing(NamedTuple):
    """One transaction: the envelope (never taken from headers) and the message bytes (sent
    with CRLF line ends only, whatever `data` has)."""

    sender: str
    recipients: tuple[str, ...]
    data: bytes
    smtputf8: bool = False


class RecipientResult(NamedTuple):
    recipient: str
    reply: SMTPReply
    phase: Phase


class TransactionResult(NamedTuple):
    results: tuple[RecipientResult, ...]
    relay: str
    tls: bool
    started: datetime
    finished: datetime


class Transport(Protocol):
    """Sends one transaction at a time: the whole interface a transport must offer."""

    name: str

    def send(self, outgoing: Outgoing, *, deadline: float | None = None) -> TransactionResult:
        """One transaction. A reply that has not come by `deadline` (on the monotonic clock)
        is a timeout."""
        ...

    def close(self) -> None: ...


class Overlapping(Transport, Protocol):
    """A transport that can overlap transactions, as an SMTP session with PIPELINING does."""

    def send_overlapped(
        self,
        outgoing: Outgoing,
        following: Outgoing | None,
        meanwhile: Callable[[], object] | None,
        *,
        deadline: float | None = None,
    ) -> TransactionResult:
        """One transaction. `following` is the transaction the caller sends next on this
        transport: its envelope may go out ahead. `meanwhile` is work for the wait on the
        server's reply to the message (run at most once)."""
        ...


def send(
    transport: Transport,
    outgoing: Outgoing,
    following: Outgoing | None = None,
    meanwhile: Callable[[], object] | None = None,
    *,
    deadline: float | None = None,
) -> TransactionResult:
    """One transaction, overlapped with the next where the transport can overlap; elsewhere
    `meanwhile` runs first and the transaction is sent plainly."""
    overlapped = getattr(transport, "send_overlapped", None)
    if overlapped is not None:
        result: TransactionResult = overlapped(outgoing, following, meanwhile, deadline=deadline)
        return result
    if meanwhile is not None:
        meanwhile()
    return transport.send(outgoing, deadline=deadline)

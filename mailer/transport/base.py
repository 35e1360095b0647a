"""What every transport takes and returns: one SMTP transaction, per-recipient replies."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import NamedTuple, Protocol

from mailer.replies import Phase, SMTPReply

# Made for every message: tuples, immutable as frozen dataclasses are and 1 us cheaper to make.


class Outgoing(NamedTuple):
    """One transaction: the envelope (never taken from headers) and the message bytes."""

    sender: str
    recipients: tuple[str, ...]
    data: bytes
    smtputf8: bool = False
    # the producer vouches that `data` has CRLF line ends only, as compose.build's output has
    # by construction: the SMTP transport then skips its own check for a bare CR or LF (3 us
    # of a 2 KB message: the dearest step of a transaction's own work)
    crlf_only: bool = False


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
    name: str

    def send(
        self,
        outgoing: Outgoing,
        following: Outgoing | None = None,
        meanwhile: Callable[[], object] | None = None,
        *,
        deadline: float | None = None,
    ) -> TransactionResult:
        """One transaction. `following` is the transaction the caller will send next on this
        transport, when it knows it: an SMTP session sends its envelope ahead. `meanwhile`
        is work for the wait on the server's reply to the message (run at most once). A reply
        that has not come by `deadline` (on the monotonic clock) is a timeout."""
        ...

    def close(self) -> None: ...

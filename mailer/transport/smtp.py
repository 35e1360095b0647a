"""SMTP sessions' transactions: MAIL, RCPT and DATA, pipelined or in lockstep, and retries.

A session (SMTPSession) is opened lazily and reused across tasks (its owner, a lane of
delivery.py, uses it from one thread at a time; close_all() QUITs them all); its connection,
from the TCP connect to AUTH, is transport/connection.py's. A transaction is pipelined
(RFC 2920) when the relay URL allows it and the server offers PIPELINING, and so is the gap
between two: given the transaction that follows, `send_overlapped` writes its envelope (MAIL,
RCPT..., DATA) right behind this one's final "." (the content is allowed to open a group,
RFC 2920 3.1), so that a message costs one round trip instead of two. The session never
decides what a reply means: it reports each recipient's reply and the phase it came in
(replies.classify judges). It retries a transaction only where nothing can have been accepted
yet: once on a fresh connection when a reused one turns out stale at MAIL, once in lockstep
when a pipelined envelope goes unanswered, and once when an envelope sent behind a message
does; never past the caller's deadline, by which every reply of the transaction must have
come, those of a connection opened within the send (connect, EHLO, STARTTLS, AUTH) included:
a chunk's lease must not run out while it waits.
"""

from __future__ import annotations

import enum
import itertools
import logging
import smtplib
import threading
import time
import weakref
from collections.abc import Callable, Iterator

from mailer import clock
from mailer.replies import Phase, ReplyCode, SMTPReply
from mailer.transport.base import Outgoing, RecipientResult, TransactionResult
from mailer.transport.connection import Connection, peer_closed
from mailer.transport.failures import NETWORK_ERRORS, Failed, failing_at, failure
from mailer.transport.reader import envelope_replies, read_reply
from mailer.transport.relay import RelayConfig
from mailer.transport.wire import CRLF, Envelope, closes, dot_stuffed, envelope, phases, positive

log = logging.getLogger(__name__)

# the phases in which a lost connection or a refusal means the server accepted nothing yet
_NOTHING_ACCEPTED = (Phase.MAIL, Phase.RCPT, Phase.DATA)


class _Retry(enum.Enum):
    STALE = "a reused session was gone"
    LOCKSTEP = "the pipelined envelope went unanswered"
    AHEAD = "the envelope sent behind the last message went unanswered"


class SMTPSession(Connection):
    """One relay's persistent session: `send` never raises for anything the network does."""

    def __init__(self, config: RelayConfig) -> None:
        super().__init__(config)
        self._pipelining_broken = False
        self._ahead_broken = False  # the server loses what follows a message's "."
        # the running send's transaction that follows, and its work for the wait on the reply
        # to the message (run once, then dropped)
        self._following: Outgoing | None = None
        self._meanwhile: Callable[[], object] | None = None

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
        """Run one transaction. With `following`, the transaction the caller sends next on this
        session, that one's envelope may go out behind this message (then the next call must
        be send(following)). `meanwhile` is run, at most once, while the server takes the
        message (between its "." and the reply), if the transaction gets that far. No reply is
        awaited past `deadline` (time.monotonic()): one that late is a timeout."""
        if self._announced is not None and self._announced.out is not outgoing:
            log.debug("relay %s: the announced transaction was not sent; reconnecting", self.name)
            self._abort()
        started = clock.now()
        self._deadline, self._following, self._meanwhile = deadline, following, meanwhile
        try:
            results = self._deliver(outgoing) if outgoing.recipients else []
            tls = self._tls
            self._after_transaction()
        finally:
            self._deadline = self._following = self._meanwhile = None  # they were this call's
        return TransactionResult(tuple(results), self.name, tls, started, clock.now())

    def _deliver(self, out: Outgoing) -> list[RecipientResult]:
        retried: set[_Retry] = set()
        while True:
            decided: dict[str, RecipientResult] = {}
            reused = pipelined = announced = False
            try:
                if self._announced is not None and self._smtp is not None and not self._idle():
                    # its envelope went out behind the last message: its replies come next (a
                    # session idle since then goes through _ready, which drops it: the server
                    # may have timed the transaction out)
                    smtp, reused, pipelined, announced = self._smtp, True, True, True
                else:
                    smtp, reused = self._ready()
                    pipelined = self._use_pipelining()
                self._transaction(smtp, out, pipelined, decided)
                return [decided[r] for r in out.recipients]
            except Failed as failed:
                if failed.phase is not Phase.LOCAL:  # a local refusal leaves the session in step
                    self._abort()
                retry = _retry_reason(failed, reused, pipelined, announced)
                if self._deadline is not None and time.monotonic() >= self._deadline:
                    retry = None  # out of time: neither a retry nor a verdict on the server
                if retry is None or retry in retried:
                    return [
                        decided.get(r) or RecipientResult(r, failed.reply, failed.phase)
                        for r in out.recipients
                    ]
                retried.add(retry)
                self._before_retry(retry, failed)

    def _before_retry(self, retry: _Retry, failed: Failed) -> None:
        if retry is _Retry.AHEAD:
            self._ahead_broken = True
            log.warning(
                "relay %s: the envelope sent behind a message went unanswered (%s); envelopes "
                "now wait for the message before them",
                self.name,
                failed.reply.text,
            )
        elif retry is _Retry.LOCKSTEP:
            self._pipelining_broken = True
            log.warning(
                "relay %s: pipelined envelope failed (%s); using lockstep from now on",
                self.name,
                failed.reply.text,
            )
        else:
            log.info("relay %s: reused session was gone (%s); retrying", self.name, failed.reply)

    def _transaction(
        self,
        smtp: smtplib.SMTP,
        out: Outgoing,
        pipelined: bool,
        decided: dict[str, RecipientResult],
    ) -> None:
        """Run one transaction, filling `decided` as replies come in (raises Failed)."""
        announced, self._announced = self._announced, None
        sending = announced or envelope(out, self._features)
        if announced is None:  # a command goes out first (each reply then sets its own wait)
            self._limit(smtp, self.config.command_timeout)
        replies: Iterator[SMTPReply]
        if pipelined:
            if announced is None:
                with failing_at(Phase.MAIL):
                    smtp.send(sending.wire)
            replies = self._pipelined_replies(smtp, len(sending.commands))
        else:
            replies = self._replies(smtp, sending.commands)

        mail = next(replies)
        mail_ok = positive(mail)
        accepted = []
        for recipient in out.recipients:
            if not mail_ok:
                decided[recipient] = RecipientResult(recipient, mail, Phase.MAIL)
                continue
            reply = next(replies)
            if positive(reply):
                accepted.append(recipient)
            else:
                decided[recipient] = RecipientResult(recipient, reply, Phase.RCPT)
        if not accepted and not pipelined:
            self._rset(smtp)
            return
        if pipelined and not mail_ok:
            for _ in out.recipients:  # the server answers every pipelined RCPT: stay in step
                next(replies)
        self._data(smtp, next(replies), accepted, dot_stuffed(sending.message), decided)

    def _announce(self) -> Envelope | None:
        """The envelope to write behind this message (the following transaction's): none
        without PIPELINING, for a session that closes after it, or for a transaction the
        server would refuse (its own send() reports that)."""
        following = self._following
        if following is None or not following.recipients or self._ahead_broken:
            return None
        if not self._use_pipelining():
            return None
        if self._in_session + 1 >= self.config.max_messages:
            return None
        try:
            return envelope(following, self._features)
        except Failed:
            return None

    def _replies(self, smtp: smtplib.SMTP, commands: list[bytes]) -> Iterator[SMTPReply]:
        """Lockstep: each envelope command sent once the reply before it is read, and only
        while the transaction can go on (the caller stops asking)."""
        for phase, command in zip(phases(len(commands)), commands, strict=True):
            yield self._ask(smtp, phase, command)

    def _pipelined_replies(self, smtp: smtplib.SMTP, count: int) -> Iterator[SMTPReply]:
        """The replies to a pipelined envelope's `count` commands (MAIL, RCPT..., DATA), read
        at once, each in the time left; a failure (a reply that closes the session, or none)
        is raised where the caller reaches it, after the replies before it, as _ask would."""
        replies: list[SMTPReply] = []
        phase = Phase.MAIL
        buffered = False  # whether the next reply is in smtplib's buffer already (no wait)
        try:
            for phase in phases(count):
                if not buffered:
                    self._limit(smtp, self.config.command_timeout)
                reply, buffered = read_reply(smtp, envelope_replies)
                if closes(reply):
                    return itertools.chain(replies, _raise(Failed(reply, phase)))
                replies.append(reply)
        except NETWORK_ERRORS as exc:
            return itertools.chain(replies, _raise(failure(exc, phase)))
        return iter(replies)

    def _ask(self, smtp: smtplib.SMTP, phase: Phase, command: bytes) -> SMTPReply:
        with failing_at(phase):
            smtp.send(command + CRLF)
            self._limit(smtp, self.config.command_timeout)  # each reply: the time left
            reply, _ = read_reply(smtp, envelope_replies)
        if closes(reply):
            raise Failed(reply, phase)
        return reply

    def _data(
        self,
        smtp: smtplib.SMTP,
        data: SMTPReply,
        accepted: list[str],
        body: bytes,
        decided: dict[str, RecipientResult],
    ) -> None:
        if data.code != ReplyCode.START_INPUT or not accepted:
            for recipient in accepted:
                decided[recipient] = RecipientResult(recipient, data, Phase.DATA)
            if data.code == ReplyCode.START_INPUT:
                # a pipelining server said 354 although it accepted no recipient (RFC 2920
                # 3.1): end the empty message so that the session stays in step
                self._ask(smtp, Phase.BODY, b".")
            self._rset(smtp)
            return
        then = self._announce()
        with failing_at(Phase.BODY):
            if peer_closed(smtp):
                # gone before a byte of the body left: certainly not delivered, so a plain
                # retry rather than the "lost after '.'" that writing into the void would give
                raise smtplib.SMTPServerDisconnected("the server closed the connection after 354")
            smtp.send(b"".join((body, b".\r\n", then.wire if then is not None else b"")))
        self._announced = then
        self._in_session += 1
        meanwhile, self._meanwhile = self._meanwhile, None  # run once at most
        if meanwhile is not None:
            try:
                meanwhile()
            except Exception:  # the message is out: its reply must still be read and reported
                log.exception("relay %s: work done while waiting for a reply failed", self.name)
        with failing_at(Phase.DOT):
            self._limit(smtp, self.config.data_timeout)
            final, _ = read_reply(smtp)
        for recipient in accepted:
            decided[recipient] = RecipientResult(recipient, final, Phase.DOT)
        if closes(final):
            self._abort()

    def _rset(self, smtp: smtplib.SMTP) -> None:
        try:
            code, _ = smtp.rset()
        except NETWORK_ERRORS:
            code = 0
        if code != ReplyCode.OK:
            # the transaction already failed; a session that cannot even RSET is not reusable
            self._abort()

    def _use_pipelining(self) -> bool:
        return self.config.pipelining and not self._pipelining_broken and self._features.pipelining


def _retry_reason(failed: Failed, reused: bool, pipelined: bool, announced: bool) -> _Retry | None:
    """Why the transaction may be tried again at once (nothing can have been accepted)."""
    if failed.phase not in _NOTHING_ACCEPTED:
        return None
    lost = failed.reply.code is None
    if announced and lost:
        # sent behind the last message and never answered: some servers drop what follows
        # a message's "." (or close the connection after it)
        return _Retry.AHEAD
    if reused and failed.phase is Phase.MAIL and (lost or closes(failed.reply)):
        return _Retry.STALE  # e.g. the server's idle timeout: a 421, or nothing at all
    if pipelined and lost:
        # some servers close the connection on, or ignore, pipelined commands they advertised
        return _Retry.LOCKSTEP
    return None


def _raise(failure: Failed) -> Iterator[SMTPReply]:
    raise failure
    yield  # a generator: raises when reached


_all_sessions: weakref.WeakSet[SMTPSession] = weakref.WeakSet()
_registry = threading.Lock()


def new_session(config: RelayConfig) -> SMTPSession:
    """A persistent session to `config`'s relay, one that close_all() QUITs. It is not
    thread-safe: its owner (a lane of delivery.py) uses it from one thread at a time."""
    session = SMTPSession(config)
    with _registry:
        _all_sessions.add(session)
    return session


def close_all() -> None:
    """QUIT every session of this process (worker shutdown); a session used again reopens."""
    with _registry:
        sessions = list(_all_sessions)
    for session in sessions:
        session.close()


def open_sessions() -> int:
    """How many of this process's sessions hold a connection to their relay now."""
    with _registry:
        return sum(1 for session in _all_sessions if session._smtp is not None)

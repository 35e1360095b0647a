"""Persistent smtplib sessions: verified TLS, AUTH, then transactions that know their phase.

A session is opened lazily and reused across tasks (its owner, a lane of delivery.py, uses it
from one thread at a time; close_all() QUITs them all). A transaction is pipelined (RFC 2920)
when the server offers PIPELINING, and so is the gap between two: given the transaction that
follows, `send` writes its envelope (MAIL, RCPT..., DATA) right behind this one's final "."
(the content is allowed to open a group, RFC 2920 3.1), so that a message costs one round trip
instead of two. The session never decides what a reply means: it reports each recipient's
reply and the phase it came in (replies.classify judges). It retries a transaction only where
nothing can have been accepted yet: once on a fresh connection when a reused one turns out
stale at MAIL, once in lockstep when a pipelined envelope goes unanswered, and once when an
envelope sent behind a message does; never past the caller's deadline, by which every reply
of the transaction must have come, those of a connection opened within the send (connect,
EHLO, STARTTLS, AUTH) included: a chunk's lease must not run out while it waits.
"""

from __future__ import annotations

import enum
import functools
import itertools
import logging
import re
import select
import smtplib
import socket
import ssl
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, cast

from mailer import clock
from mailer.errors import RelayError
from mailer.replies import Phase, ReplyCode, SMTPReply
from mailer.transport.base import Outgoing, RecipientResult, TransactionResult
from mailer.transport.relay import RelayConfig

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

log = logging.getLogger(__name__)

Report = Callable[[str, str], None]
_CRLF = b"\r\n"
_EOL = re.compile(rb"\r\n|\r(?!\n)|\n")
_LEADING_DOT = re.compile(rb"(?m)^\.")
_DOT_AFTER_LF = re.compile(rb"\n\.")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# the phases in which a lost connection or a refusal means the server accepted nothing yet
_NOTHING_ACCEPTED = (Phase.MAIL, Phase.RCPT, Phase.DATA)
# the AUTH mechanisms tried, in order; only one is tried, so a wrong password fails once
_MECHANISMS = ("PLAIN", "LOGIN", "CRAM-MD5")
# RFC 5321 4.2.1: the first digit of every reply, and the one of a positive completion
_REPLY_DIGITS = (2, 3, 4, 5)
_POSITIVE_COMPLETION = 2
_MAXLINE = 8192  # smtplib's own limit on a reply line (smtplib._MAXLINE)


class _Failed(Exception):
    """The session cannot carry on; each recipient not decided yet gets `reply` at `phase`."""

    def __init__(self, reply: SMTPReply, phase: Phase) -> None:
        super().__init__(reply, phase)
        self.reply = reply
        self.phase = phase


class _Envelope(NamedTuple):
    """A transaction ready to go: its envelope commands, as sent together (`wire`), and its
    message (CRLF line ends only, not yet dot-stuffed)."""

    out: Outgoing
    commands: list[bytes]
    wire: bytes
    message: bytes


class _Features(NamedTuple):
    """What the connected server offers that a transaction depends on, read once a
    connection (after STARTTLS, whose EHLO may offer more)."""

    pipelining: bool
    size: bool
    size_limit: int  # 0: none announced
    smtputf8: bool
    eightbitmime: bool

    @classmethod
    def of(cls, smtp: smtplib.SMTP) -> _Features:
        return cls(
            smtp.has_extn("pipelining"),
            smtp.has_extn("size"),
            _size_limit(smtp),
            smtp.has_extn("smtputf8"),
            smtp.has_extn("8bitmime"),
        )


class _Retry(enum.Enum):
    STALE = "a reused session was gone"
    LOCKSTEP = "the pipelined envelope went unanswered"
    AHEAD = "the envelope sent behind the last message went unanswered"


class SMTPSession:
    """One relay's persistent connection: `send` never raises for anything the network does."""

    def __init__(self, config: RelayConfig) -> None:
        self.config = config
        self.name = config.name
        self.connections = 0
        self._smtp: smtplib.SMTP | None = None
        self._tls = False
        self._in_session = 0
        self._last_used = 0.0
        self._pipelining_broken = False
        self._ahead_broken = False  # the server loses what follows a message's "."
        self._context: ssl.SSLContext | None = None
        # the envelope written behind the last message's "." (its replies are on their way):
        # the next send() must be that transaction, or the connection is dropped, which
        # aborts it (no body was sent, so nothing can be delivered)
        self._announced: _Envelope | None = None
        self._deadline: float | None = None  # the transaction's (send's `deadline`)
        self._features = _Features(False, False, 0, False, False)  # the connection's

    # --- the transaction ----------------------------------------------------------------

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
        self._deadline = deadline
        try:
            results = self._deliver(outgoing, following, meanwhile) if outgoing.recipients else []
            tls = self._tls
            self._after_transaction()
        finally:
            self._deadline = None  # it was this call's
        return TransactionResult(tuple(results), self.name, tls, started, clock.now())

    def _deliver(
        self, out: Outgoing, following: Outgoing | None, meanwhile: Callable[[], object] | None
    ) -> list[RecipientResult]:
        # a retry comes only where no body was sent, so `meanwhile` runs once at most
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
                self._transaction(smtp, out, pipelined, decided, following, meanwhile)
                return [decided[r] for r in out.recipients]
            except _Failed as failed:
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

    def _before_retry(self, retry: _Retry, failed: _Failed) -> None:
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
        following: Outgoing | None,
        meanwhile: Callable[[], object] | None,
    ) -> None:
        """Run one transaction, filling `decided` as replies come in (raises _Failed)."""
        announced, self._announced = self._announced, None
        envelope = announced or self._envelope(out)
        if announced is None:  # a command goes out first (each reply then sets its own wait)
            self._limit(smtp, self.config.command_timeout)
        replies: Iterator[SMTPReply]
        if pipelined:
            if announced is None:
                with _phase(Phase.MAIL):
                    smtp.send(envelope.wire)
            replies = self._pipelined_replies(smtp, len(envelope.commands))
        else:
            replies = self._replies(smtp, envelope.commands)

        mail = next(replies)
        mail_ok = _positive(mail)
        accepted = []
        for recipient in out.recipients:
            if not mail_ok:
                decided[recipient] = RecipientResult(recipient, mail, Phase.MAIL)
                continue
            reply = next(replies)
            if _positive(reply):
                accepted.append(recipient)
            else:
                decided[recipient] = RecipientResult(recipient, reply, Phase.RCPT)
        if not accepted and not pipelined:
            self._rset(smtp)
            return
        if pipelined and not mail_ok:
            for _ in out.recipients:  # the server answers every pipelined RCPT: stay in step
                next(replies)
        body = _dot_stuffed(envelope.message)
        self._data(smtp, next(replies), accepted, body, decided, following, meanwhile)

    def _envelope(self, out: Outgoing) -> _Envelope:
        """The transaction's commands for the connected server (its `_features`; raises
        _Failed at Phase.LOCAL for what it would refuse)."""
        # a bare CR or LF is never sent (SMTP smuggling)
        message = out.data if out.crlf_only else _crlf_only(out.data)
        options = self._mail_options(out, len(message))
        encoding = "utf-8" if "SMTPUTF8" in options else "ascii"
        commands = [line.encode(encoding) for line in _envelope(out, options)]
        return _Envelope(out, commands, _CRLF.join(commands) + _CRLF, message)

    def _announce(self, following: Outgoing | None) -> _Envelope | None:
        """The envelope to write behind this message: none without PIPELINING, for a session
        that closes after it, or for a transaction the server would refuse (its own send()
        reports that)."""
        if following is None or not following.recipients or self._ahead_broken:
            return None
        if not self._use_pipelining():
            return None
        if self._in_session + 1 >= self.config.max_messages:
            return None
        try:
            return self._envelope(following)
        except _Failed:
            return None

    def _replies(self, smtp: smtplib.SMTP, commands: list[bytes]) -> Iterator[SMTPReply]:
        """Lockstep: each envelope command sent once the reply before it is read, and only
        while the transaction can go on (the caller stops asking)."""
        for phase, command in zip(_phases(len(commands)), commands, strict=True):
            yield self._ask(smtp, phase, command)

    def _pipelined_replies(self, smtp: smtplib.SMTP, count: int) -> Iterator[SMTPReply]:
        """The replies to a pipelined envelope's `count` commands (MAIL, RCPT..., DATA), read
        at once, each in the time left; a failure (a reply that closes the session, or none)
        is raised where the caller reaches it, after the replies before it, as _ask would."""
        replies: list[SMTPReply] = []
        phase = Phase.MAIL
        buffered = False  # whether the next reply is in smtplib's buffer already (no wait)
        try:
            for phase in _phases(count):
                if not buffered:
                    self._limit(smtp, self.config.command_timeout)
                reply, buffered = _read(smtp, _envelope_replies)
                if _closes(reply):
                    return itertools.chain(replies, _raise(_Failed(reply, phase)))
                replies.append(reply)
        except _NETWORK_ERRORS as exc:
            return itertools.chain(replies, _raise(_failure(exc, phase)))
        return iter(replies)

    def _ask(self, smtp: smtplib.SMTP, phase: Phase, command: bytes) -> SMTPReply:
        with _phase(phase):
            smtp.send(command + _CRLF)
            self._limit(smtp, self.config.command_timeout)  # each reply: the time left
            reply, _ = _read(smtp, _envelope_replies)
        if _closes(reply):
            raise _Failed(reply, phase)
        return reply

    def _data(
        self,
        smtp: smtplib.SMTP,
        data: SMTPReply,
        accepted: list[str],
        body: bytes,
        decided: dict[str, RecipientResult],
        following: Outgoing | None,
        meanwhile: Callable[[], object] | None,
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
        then = self._announce(following)
        with _phase(Phase.BODY):
            if _peer_closed(smtp):
                # gone before a byte of the body left: certainly not delivered, so a plain
                # retry rather than the "lost after '.'" that writing into the void would give
                raise smtplib.SMTPServerDisconnected("the server closed the connection after 354")
            smtp.send(b"".join((body, b".\r\n", then.wire if then is not None else b"")))
        self._announced = then
        self._in_session += 1
        if meanwhile is not None:
            try:
                meanwhile()
            except Exception:  # the message is out: its reply must still be read and reported
                log.exception("relay %s: work done while waiting for a reply failed", self.name)
        with _phase(Phase.DOT):
            self._limit(smtp, self.config.data_timeout)
            final, _ = _read(smtp)
        for recipient in accepted:
            decided[recipient] = RecipientResult(recipient, final, Phase.DOT)
        if _closes(final):
            self._abort()

    def _limit(self, smtp: smtplib.SMTP, seconds: float) -> None:
        """The socket's timeout for the next wait: `seconds`, or less, so that no reply is
        awaited past the send's deadline (unchanged, it costs no system call); and the
        deadline by which the wait's later reads must end, if any (_Bounded)."""
        seconds = self._within(seconds)
        sock = cast("_Bounded | None", smtp.sock)
        if sock is not None:
            sock.deadline = self._deadline
            if sock.gettimeout() != seconds:
                sock.settimeout(seconds)  # a system call (ioctl) each time: only when it changes

    def _within(self, seconds: float) -> float:
        """`seconds`, or the time left before the send's deadline if that is shorter."""
        if self._deadline is not None:
            left = self._deadline - time.monotonic()
            if left < seconds:
                seconds = left
            seconds = max(_ALREADY_COME, seconds)  # past it, what has come is still read
        return seconds

    def _rset(self, smtp: smtplib.SMTP) -> None:
        try:
            code, _ = smtp.rset()
        except (smtplib.SMTPException, OSError):
            code = 0
        if code != ReplyCode.OK:
            # the transaction already failed; a session that cannot even RSET is not reusable
            self._abort()

    def _mail_options(self, out: Outgoing, size: int) -> list[str]:
        """MAIL FROM parameters; refuses here (Phase.LOCAL) what the server would refuse."""
        features = self._features
        addresses = (out.sender, *out.recipients)
        for address in addresses:
            # (isprintable() is True for nearly every address: the search is left for the rest)
            if "<" in address or ">" in address or (
                not address.isprintable() and _CONTROL.search(address)
            ):
                raise _Failed(
                    SMTPReply.lost(f"address {address!r} contains a control character or <>"),
                    Phase.LOCAL,
                )
        limit = features.size_limit
        if limit and size > limit:
            raise _Failed(
                SMTPReply.lost(
                    f"message is {size} bytes; the server accepts at most {limit} (SIZE)"
                ),
                Phase.LOCAL,
            )
        options = [f"SIZE={size}"] if features.size else []
        if out.smtputf8 or not all(a.isascii() for a in addresses):
            if not features.smtputf8:
                raise _Failed(
                    SMTPReply.lost(
                        "an address is not ASCII and the server does not offer SMTPUTF8"
                    ),
                    Phase.LOCAL,
                )
            options.append("SMTPUTF8")
        if features.eightbitmime and not out.data.isascii():
            options.append("BODY=8BITMIME")
        return options

    def _use_pipelining(self) -> bool:
        return self.config.pipelining and not self._pipelining_broken and self._features.pipelining

    def _after_transaction(self) -> None:
        self._last_used = time.monotonic()
        if self._smtp is not None and self._in_session >= self.config.max_messages:
            self.close()

    # --- the session ----------------------------------------------------------------------

    def _ready(self) -> tuple[smtplib.SMTP, bool]:
        """The open connection (checked with NOOP after idling) or a new one; True if reused."""
        if self._announced is not None:
            self._abort()  # a command now would be read as that transaction's message
        smtp = self._smtp
        if smtp is not None and self._idle():
            self._limit(smtp, self.config.command_timeout)  # in a send, its time left
            try:
                code, _ = smtp.noop()
            except (smtplib.SMTPException, OSError):
                code = 0
            if code != ReplyCode.OK:
                log.info("relay %s: idle session is gone, reconnecting", self.name)
                self._abort()
                smtp = None
        if smtp is None:
            return self._open(lambda step, detail: None), False
        return smtp, True

    def _idle(self) -> bool:
        return time.monotonic() - self._last_used > self.config.idle_noop_after

    def open(self, report: Report | None = None) -> smtplib.SMTP:
        """Connect, EHLO, STARTTLS and AUTH as configured; `report(step, detail)` sees each.

        Raises RelayError naming the step that failed.
        """
        try:
            return self._open(report or (lambda step, detail: None))
        except _Failed as failed:
            reply = failed.reply
            if reply.code is None:
                raise RelayError(failed.phase.value, reply.text) from None
            raise RelayError(failed.phase.value, "refused", reply.code, reply.text) from None

    def _open(self, say: Report) -> smtplib.SMTP:
        self._abort()
        self._tls = False
        smtp = self._connect(say)
        try:
            self._handshake(smtp, say)
        except _Failed:
            smtp.close()
            raise
        self._smtp = smtp
        self._features = _Features.of(smtp)
        self._tls = isinstance(smtp.sock, ssl.SSLSocket)
        self._in_session = 0
        self._last_used = time.monotonic()
        self.connections += 1
        return smtp

    def _connect(self, say: Report) -> smtplib.SMTP:
        cfg = self.config
        name = cfg.ehlo_name or _local_hostname()
        # Connect through the constructor: smtplib verifies the certificate against the host
        # given there (and raises SMTPConnectError for a greeting other than 220).
        with _phase(Phase.CONNECT):
            smtp = (
                _SMTP_SSL(
                    cfg.host,
                    cfg.port,
                    name,
                    self._within(cfg.connect_timeout),
                    self._ssl(),
                    self._deadline,
                )
                if cfg.tls == "implicit"
                else _SMTP(
                    cfg.host, cfg.port, name, self._within(cfg.connect_timeout), self._deadline
                )
            )
        say("connect", f"{cfg.host}:{cfg.port} connected")
        if cfg.tls == "implicit":
            say("tls", _cipher(smtp))
        return smtp

    def _handshake(self, smtp: smtplib.SMTP, say: Report) -> None:
        """EHLO, STARTTLS and AUTH as configured; in a send, each step waits the time left."""
        self._ehlo(smtp, say)
        if self.config.tls in ("starttls", "opportunistic"):
            self._starttls(smtp, say)
        if self.config.username:
            self._login(smtp, say)
        else:
            say("auth", "skipped: no user in the relay URL")

    def _ehlo(self, smtp: smtplib.SMTP, say: Report) -> None:
        self._limit(smtp, self.config.command_timeout)
        with _phase(Phase.EHLO):
            code, text = smtp.ehlo()
            if code >= ReplyCode.SYNTAX_ERROR:  # not ESMTP (a 421 is not answered by HELO)
                code, text = smtp.helo()
        reply = SMTPReply.of(code, text)
        if code != ReplyCode.OK:
            raise _Failed(reply, Phase.EHLO)
        server = reply.text.splitlines()[0] if reply.text else ""
        extensions = " ".join(sorted(smtp.esmtp_features)) or "(none)"
        say("ehlo", f"{code} {server}; extensions: {extensions}")

    def _starttls(self, smtp: smtplib.SMTP, say: Report) -> None:
        if not smtp.has_extn("starttls"):
            if self.config.tls == "starttls":
                raise _Failed(
                    SMTPReply.lost(
                        "the server does not offer STARTTLS and tls=starttls requires it; nothing "
                        "was sent (check the port: 587 offers STARTTLS, 465 wants smtps://)"
                    ),
                    Phase.TLS,
                )
            say("starttls", "not offered by the server; continuing without TLS (opportunistic)")
            return
        self._limit(smtp, self.config.command_timeout)
        with _phase(Phase.TLS):
            code, _ = smtp.starttls(context=self._ssl())
        say("starttls", f"{code} {_cipher(smtp)}")
        self._ehlo(smtp, say)

    def _login(self, smtp: smtplib.SMTP, say: Report) -> None:
        cfg = self.config
        if not isinstance(smtp.sock, ssl.SSLSocket) and cfg.tls != "none":
            raise _Failed(
                SMTPReply.lost(
                    "refusing to send the password without TLS: the server offered no STARTTLS "
                    "(use tls=starttls or smtps://, or tls=none on a trusted network)"
                ),
                Phase.AUTH,
            )
        mechanism = _mechanism(smtp)
        smtp.user, smtp.password = cfg.username or "", cfg.password or ""
        authenticate = getattr(smtp, "auth_" + mechanism.lower().replace("-", "_"))
        self._limit(smtp, cfg.command_timeout)
        try:
            with _phase(Phase.AUTH):
                code, _ = smtp.auth(mechanism, authenticate)
        finally:
            smtp.password = ""
        say("auth", f"{code} authenticated as {cfg.username} ({mechanism})")

    def _ssl(self) -> ssl.SSLContext:
        # verified certificates and host names, always: smtplib's own default verifies nothing
        if self._context is None:
            try:
                self._context = _bounded_context(self.config.ca_file)
            except OSError as exc:  # ssl.SSLError is an OSError too
                raise _Failed(
                    SMTPReply.lost(f"cannot load ca_file {self.config.ca_file!r}: {exc}"),
                    Phase.TLS,
                ) from None
        return self._context

    # --- one-off commands and the end ------------------------------------------------------

    def verify(self, address: str) -> SMTPReply:
        """VRFY: most servers answer 252 (cannot verify, will try); a lost session is a reply."""
        if not address.isascii() or _CONTROL.search(address):
            return SMTPReply.lost(f"cannot VRFY {address!r}: not a plain ASCII address")
        return self._command(lambda smtp: smtp.verify(address))

    def noop(self) -> SMTPReply:
        return self._command(lambda smtp: smtp.noop())

    def _command(self, run: Callable[[smtplib.SMTP], tuple[int, bytes]]) -> SMTPReply:
        try:
            smtp, _ = self._ready()
            self._limit(smtp, self.config.command_timeout)  # outside a send: no deadline
            with _phase(Phase.CONNECT):
                reply = SMTPReply.of(*run(smtp))
        except _Failed as failed:
            self._abort()
            return failed.reply
        self._last_used = time.monotonic()
        if _closes(reply):
            self._abort()
        return reply

    def close(self) -> None:
        """QUIT politely; errors on QUIT are ignored (the session is over either way)."""
        if self._announced is not None:
            self._abort()  # QUIT now would be read as the announced transaction's message
        smtp, self._smtp = self._smtp, None
        if smtp is None:
            return
        self._limit(smtp, self.config.command_timeout)  # a send's deadline, if in one
        try:
            smtp.quit()
        except (smtplib.SMTPException, OSError):
            smtp.close()

    def _abort(self) -> None:
        self._announced = None
        smtp, self._smtp = self._smtp, None
        if smtp is not None:
            smtp.close()


def check(config: RelayConfig, say: Report) -> bool:
    """For `mailer smtp check`: connect, EHLO, STARTTLS, AUTH, NOOP and QUIT, saying each
    step's reply as say(step, detail); at the first failure, say why and return False."""
    try:
        smtp = SMTPSession(config)._open(say)
    except _Failed as failed:
        step = failed.phase.value
        if failed.phase is Phase.TLS and config.tls != "implicit":
            step = "starttls"
        say(step, f"FAILED: {failed.reply}")
        return False
    try:
        return _check_step(smtp, say, "noop", ReplyCode.OK) and _check_step(
            smtp, say, "quit", ReplyCode.CLOSING
        )
    finally:
        smtp.close()


def _check_step(smtp: smtplib.SMTP, say: Report, step: str, expected: ReplyCode) -> bool:
    try:
        with _phase(Phase.CONNECT):
            reply = SMTPReply.of(*smtp.docmd(step.upper()))
    except _Failed as failed:
        reply = failed.reply
    if reply.code != expected:
        say(step, f"FAILED: {reply}")
        return False
    say(step, str(reply))
    return True


class _Phase:
    """Turn a failure inside the block into _Failed at `phase` (a TLS failure: at Phase.TLS).
    A class, and one instance per phase: a generator-based context manager cost several
    microseconds on every command."""

    __slots__ = ("phase",)

    def __init__(self, phase: Phase) -> None:
        self.phase = phase

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        if exc is not None and isinstance(exc, _NETWORK_ERRORS):
            raise _failure(exc, self.phase) from None


_NETWORK_ERRORS = (smtplib.SMTPException, OSError)


_PHASES = {phase: _Phase(phase) for phase in Phase}


def _phase(phase: Phase) -> _Phase:
    return _PHASES[phase]


def _failure(exc: smtplib.SMTPException | OSError, phase: Phase) -> _Failed:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _Failed(
            SMTPReply.lost(
                f"the server's certificate is not trusted ({exc.verify_message}); for a "
                "private CA set ca_file=/path/ca.pem in MAILER_SMTP_URL"
            ),
            Phase.TLS,
        )
    if isinstance(exc, ssl.SSLError) and phase in (Phase.CONNECT, Phase.TLS):
        return _Failed(SMTPReply.lost(f"TLS handshake failed: {exc}"), Phase.TLS)
    if isinstance(exc, smtplib.SMTPConnectError):
        return _Failed(SMTPReply.of(exc.smtp_code, exc.smtp_error), Phase.GREETING)
    if isinstance(exc, smtplib.SMTPResponseException):
        return _Failed(SMTPReply.of(exc.smtp_code, exc.smtp_error), phase)
    return _Failed(SMTPReply.lost(_describe(exc)), phase)


def _retry_reason(failed: _Failed, reused: bool, pipelined: bool, announced: bool) -> _Retry | None:
    """Why the transaction may be tried again at once (nothing can have been accepted)."""
    if failed.phase not in _NOTHING_ACCEPTED:
        return None
    lost = failed.reply.code is None
    if announced and lost:
        # sent behind the last message and never answered: some servers drop what follows
        # a message's "." (or close the connection after it)
        return _Retry.AHEAD
    if reused and failed.phase is Phase.MAIL and (lost or _closes(failed.reply)):
        return _Retry.STALE  # e.g. the server's idle timeout: a 421, or nothing at all
    if pipelined and lost:
        # some servers close the connection on, or ignore, pipelined commands they advertised
        return _Retry.LOCKSTEP
    return None


# A server answers MAIL, RCPT and DATA with the same few lines message after message: each is
# parsed once per process, then found by the line as read (a bounded number of them; a server
# that echoes the address in every reply fills the table once, then its replies are parsed
# each time).
_envelope_replies: dict[bytes, SMTPReply] = {}
_ENVELOPE_REPLIES_KEPT = 256


def _read(smtp: smtplib.SMTP, seen: dict[bytes, SMTPReply] | None = None) -> tuple[SMTPReply, bool]:
    """The next reply, and whether the one after it is already buffered whole: a complete line
    that ends its reply, which getreply reads without a wait whatever it says (so reading it
    needs no timeout of its own).

    smtplib's getreply, except for the usual reply (one line, already buffered), which is read
    straight from smtplib's own buffer as getreply would read it: 99 -> 87-89 us of user CPU
    a message."""
    file = smtp.file
    if file is not None:
        buffered = file.peek()
        end = buffered.find(b"\n", 0, _MAXLINE)
        if end > 2 and buffered[3:4] != b"-" and buffered[:3].isdigit():
            line = file.read(end + 1)
            following = buffered.find(b"\n", end + 1, end + 1 + _MAXLINE)
            whole = following > end + 4 and buffered[end + 4 : end + 5] != b"-"
            if seen is not None and (reply := seen.get(line)) is not None:
                return reply, whole
            reply = _reply(int(line[:3]), line[4:].strip(b" \t\r\n"))
            if seen is not None and len(seen) < _ENVELOPE_REPLIES_KEPT:
                seen[line] = reply  # a tuple: safe to share between sessions and threads
            return reply, whole
    code, text = smtp.getreply()
    return _reply(code, text), False


def _reply(code: int, text: bytes) -> SMTPReply:
    if code // 100 not in _REPLY_DIGITS:
        # a garbled reply: the dialogue is out of step and the session cannot go on
        raise smtplib.SMTPServerDisconnected(f"unreadable reply {text[:80]!r}")
    return SMTPReply.of(code, text)


def _envelope(out: Outgoing, options: list[str]) -> list[str]:
    mail = " ".join([f"MAIL FROM:<{out.sender}>", *options])
    return [mail, *(f"RCPT TO:<{r}>" for r in out.recipients), "DATA"]


def _crlf_only(data: bytes) -> bytes:
    # counting is much cheaper than the substitution, and a composed message needs none
    crlf = data.count(_CRLF)
    if data.count(b"\r") == crlf and data.count(b"\n") == crlf:
        return data
    return _EOL.sub(_CRLF, data)


def _dot_stuffed(message: bytes) -> bytes:
    # (CRLF line ends only here) the regular expression finds a line's leading dot in 0.6 us
    # of a 2 KB message, `in` in 1.4
    if message.startswith(b".") or _DOT_AFTER_LF.search(message):
        message = _LEADING_DOT.sub(b"..", message)
    return message if message.endswith(_CRLF) else message + _CRLF


def _size_limit(smtp: smtplib.SMTP) -> int:
    try:
        return int(smtp.esmtp_features.get("size", "") or 0) if smtp.has_extn("size") else 0
    except ValueError:
        return 0


def _mechanism(smtp: smtplib.SMTP) -> str:
    if not smtp.has_extn("auth"):
        raise _Failed(
            SMTPReply.lost(
                "the server offers no AUTH; check the port, or remove the user from the URL"
            ),
            Phase.AUTH,
        )
    offered = smtp.esmtp_features["auth"].upper().split()
    for mechanism in _MECHANISMS:
        if mechanism in offered:
            return mechanism
    raise _Failed(
        SMTPReply.lost(
            f"no AUTH mechanism in common: the server offers {' '.join(offered) or 'none'}, "
            f"mailer speaks {', '.join(_MECHANISMS)}"
        ),
        Phase.AUTH,
    )


def _peer_closed(smtp: smtplib.SMTP) -> bool:
    """Whether the server has closed (or, out of turn, written to) the connection."""
    sock = smtp.sock
    if sock is None:
        return True
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True  # the server spoke out of turn: the dialogue is out of step
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return False
    if isinstance(sock, ssl.SSLSocket):
        return True  # TLS: readable here means a close notify, an alert or stray data
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


@functools.cache  # a few sizes (a transaction has at most delivery.MAX_RECIPIENTS), every message
def _phases(commands: int) -> tuple[Phase, ...]:
    """The phase of each command of an envelope: MAIL, RCPT..., DATA."""
    return (Phase.MAIL, *[Phase.RCPT] * (commands - 2), Phase.DATA)


def _raise(failure: _Failed) -> Iterator[SMTPReply]:
    raise failure
    yield  # a generator: raises when reached


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out waiting for the server"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _positive(reply: SMTPReply) -> bool:
    # 250 and 251, and any other 2xx a lenient server uses (classify() counts 2xx as accepted)
    return reply.code is not None and reply.code // 100 == _POSITIVE_COMPLETION


def _closes(reply: SMTPReply) -> bool:
    return reply.code == ReplyCode.SERVICE_UNAVAILABLE


def _cipher(smtp: smtplib.SMTP) -> str:
    sock = smtp.sock
    if isinstance(sock, ssl.SSLSocket):
        cipher = sock.cipher()
        return f"{sock.version()} {cipher[0] if cipher else ''}".strip()
    return "(no TLS)"


@functools.cache
def _local_hostname() -> str:
    # smtplib's own EHLO name (the FQDN, or an address literal), but worked out once: it
    # costs a DNS lookup that smtplib would repeat on every connection
    return smtplib.SMTP().local_hostname


# how far past a send's deadline a wait for the relay may end (see _bound)
_SLACK = 0.05
# past the deadline, a reply that has already come is still read (a wait is _ALREADY_COME
# at most), for _GRACE: the step's other sessions may have waited until the deadline first.
# A quarter of a second stays within the quarter of the lease left after the deadline for
# any lease over a second (delivery._Limits).
_GRACE = 0.25
_ALREADY_COME = 0.001


class _Bounded(Protocol):
    """A socket whose reads end by its `deadline` (time.monotonic(), or None: no bound but
    the timeout), which SMTPSession._limit sets before each wait; `_bound` says why."""

    deadline: float | None

    def gettimeout(self) -> float | None: ...

    def settimeout(self, value: float | None) -> None: ...


def _bound(sock: _Bounded) -> None:
    """Before a read from the relay (or a TLS handshake): it ends by the socket's deadline,
    give or take _SLACK. The socket's timeout bounds one read, and a server that trickles a
    reply a byte at a time would otherwise hold a send, and its chunk's lease, as long as it
    liked. _limit set the timeout to the time left when the wait began, so that the wait's
    first read (nearly always its only one) needs no second system call here. Past the
    deadline, only what has already come is read (as after _limit), and nothing once _GRACE
    is over too."""
    deadline = sock.deadline
    if deadline is not None:
        left = deadline - time.monotonic()
        if left <= -_GRACE:
            raise TimeoutError("timed out")
        timeout = sock.gettimeout()
        if left <= 0:
            if timeout != _ALREADY_COME:
                sock.settimeout(_ALREADY_COME)
        elif timeout is None or left < timeout - _SLACK:
            sock.settimeout(left)


class _BoundedSocket(socket.socket):
    deadline: float | None = None

    def recv_into(self, buffer: WriteableBuffer, nbytes: int = 0, flags: int = 0) -> int:
        _bound(self)
        return socket.socket.recv_into(self, buffer, nbytes, flags)


class _BoundedTLSSocket(ssl.SSLSocket):  # the class of the sessions' SSLContext's sockets
    deadline: float | None = None

    def recv_into(self, buffer: WriteableBuffer, nbytes: int | None = None, flags: int = 0) -> int:
        _bound(self)
        return ssl.SSLSocket.recv_into(self, buffer, nbytes, flags)


def _bounded_context(cafile: str | None) -> ssl.SSLContext:
    """ssl's default client context (verified certificates and host names), whose sockets are
    bounded: the handshake, which reads in C and not through `recv_into`, gets the time left
    as its timeout (the TLS socket takes the plain one's), and the TLS socket keeps the
    plain one's deadline."""
    context = ssl.create_default_context(cafile=cafile)
    context.sslsocket_class = _BoundedTLSSocket
    wrap = context.wrap_socket

    def wrap_bounded(sock: _BoundedSocket, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        _bound(sock)
        tls = cast(_BoundedTLSSocket, wrap(sock, *args, **kwargs))
        tls.deadline = sock.deadline
        return tls

    context.wrap_socket = wrap_bounded  # type: ignore[method-assign,assignment]
    return context


class _SMTP(smtplib.SMTP):
    """smtplib's client over a _BoundedSocket, bound by `deadline` from the greeting on."""

    def __init__(
        self, host: str, port: int, name: str, timeout: float, deadline: float | None
    ) -> None:
        self.deadline = deadline
        super().__init__(host, port, name, timeout)

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        plain = super()._get_socket(host, port, timeout)  # type: ignore[misc]
        sock = _BoundedSocket(plain.family, plain.type, plain.proto, fileno=plain.detach())
        sock.settimeout(timeout)
        sock.deadline = self.deadline
        return sock


class _SMTP_SSL(smtplib.SMTP_SSL, _SMTP):
    """Implicit TLS: SMTP_SSL wraps _SMTP's bounded socket with the session's context."""

    def __init__(
        self,
        host: str,
        port: int,
        name: str,
        timeout: float,
        context: ssl.SSLContext,
        deadline: float | None,
    ) -> None:
        self.deadline = deadline  # SMTP_SSL's __init__ calls SMTP's, not _SMTP's
        smtplib.SMTP_SSL.__init__(
            self, host, port, local_hostname=name, timeout=timeout, context=context
        )


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

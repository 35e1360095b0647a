"""A session's connection to its relay: connect, EHLO, STARTTLS, AUTH, NOOP, VRFY, QUIT, reuse.

Connection is the base of SMTPSession (transport/smtp.py), which adds the transactions; it
opens the connection lazily, keeps it across transactions, checks it with NOOP after idling,
and bounds every wait by the send's deadline while in one (transport/bounded.py). A network
failure inside a step becomes Failed at that step's phase (transport/failures.py).
"""

from __future__ import annotations

import functools
import logging
import select
import smtplib
import socket
import ssl
import time
from collections.abc import Callable
from typing import cast

from mailer.errors import RelayError
from mailer.replies import Phase, ReplyCode, SMTPReply
from mailer.transport.bounded import (
    ALREADY_COME,
    Bounded,
    BoundedSMTP,
    BoundedSMTP_SSL,
    bounded_context,
)
from mailer.transport.failures import NETWORK_ERRORS, Failed, failing_at
from mailer.transport.relay import RelayConfig
from mailer.transport.wire import CONTROL, Envelope, Features, closes

log = logging.getLogger(__name__)

Report = Callable[[str, str], None]
# the AUTH mechanisms tried, in order; only one is tried, so a wrong password fails once
_MECHANISMS = ("PLAIN", "LOGIN", "CRAM-MD5")


def _quiet(step: str, detail: str) -> None:
    """A Report that says nothing."""


class Connection:
    """One relay's persistent connection. Not thread-safe: one thread at a time uses it."""

    def __init__(self, config: RelayConfig) -> None:
        self.config = config
        self.name = config.name
        self.connections = 0
        self._smtp: smtplib.SMTP | None = None
        self._tls = False
        self._in_session = 0  # messages sent on this connection
        self._last_used = 0.0
        self._context: ssl.SSLContext | None = None
        self._features = Features()  # the connection's
        # the envelope written behind the last message's "." (its replies are on their way):
        # a command now would be read as that transaction's message, so the connection is
        # dropped instead (which aborts the transaction: no body was sent)
        self._announced: Envelope | None = None
        self._deadline: float | None = None  # the running send's

    # --- the deadline -----------------------------------------------------------------------

    def _limit(self, smtp: smtplib.SMTP, seconds: float) -> None:
        """The socket's timeout for the next wait: `seconds`, or less, so that no reply is
        awaited past the send's deadline (unchanged, it costs no system call); and the
        deadline by which the wait's later reads must end, if any (bounded.Bounded)."""
        seconds = self._within(seconds)
        sock = cast("Bounded | None", smtp.sock)
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
            seconds = max(ALREADY_COME, seconds)  # past it, what has come is still read
        return seconds

    # --- opening and reuse ------------------------------------------------------------------

    def _ready(self) -> tuple[smtplib.SMTP, bool]:
        """The open connection (checked with NOOP after idling) or a new one; True if reused."""
        if self._announced is not None:
            self._abort()  # a command now would be read as that transaction's message
        smtp = self._smtp
        if smtp is not None and self._idle():
            self._limit(smtp, self.config.command_timeout)  # in a send, its time left
            try:
                code, _ = smtp.noop()
            except NETWORK_ERRORS:
                code = 0
            if code != ReplyCode.OK:
                log.info("relay %s: idle session is gone, reconnecting", self.name)
                self._abort()
                smtp = None
        if smtp is None:
            return self.establish(_quiet), False
        return smtp, True

    def _idle(self) -> bool:
        return time.monotonic() - self._last_used > self.config.idle_noop_after

    def _after_transaction(self) -> None:
        self._last_used = time.monotonic()
        if self._smtp is not None and self._in_session >= self.config.max_messages:
            self.close()

    def open(self, report: Report | None = None) -> smtplib.SMTP:
        """Connect, EHLO, STARTTLS and AUTH as configured; `report(step, detail)` sees each.

        Raises RelayError naming the step that failed.
        """
        try:
            return self.establish(report or _quiet)
        except Failed as failed:
            reply = failed.reply
            if reply.code is None:
                raise RelayError(failed.phase.value, reply.text) from None
            raise RelayError(failed.phase.value, "refused", reply.code, reply.text) from None

    def establish(self, say: Report) -> smtplib.SMTP:
        """A new connection, through each step as open() (raises Failed at the step's phase)."""
        self._abort()
        self._tls = False
        smtp = self._connect(say)
        try:
            self._handshake(smtp, say)
        except Failed:
            smtp.close()
            raise
        self._smtp = smtp
        self._features = _features(smtp)
        self._tls = isinstance(smtp.sock, ssl.SSLSocket)
        self._in_session = 0
        self._last_used = time.monotonic()
        self.connections += 1
        return smtp

    def _connect(self, say: Report) -> smtplib.SMTP:
        cfg = self.config
        name = cfg.ehlo_name or _local_hostname()
        timeout = self._within(cfg.connect_timeout)
        # Connect through the constructor: smtplib verifies the certificate against the host
        # given there (and raises SMTPConnectError for a greeting other than 220).
        with failing_at(Phase.CONNECT):
            smtp = (
                BoundedSMTP_SSL(cfg.host, cfg.port, name, timeout, self._ssl(), self._deadline)
                if cfg.tls == "implicit"
                else BoundedSMTP(cfg.host, cfg.port, name, timeout, self._deadline)
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
        with failing_at(Phase.EHLO):
            code, text = smtp.ehlo()
            if code >= ReplyCode.SYNTAX_ERROR:  # not ESMTP (a 421 is not answered by HELO)
                code, text = smtp.helo()
        reply = SMTPReply.of(code, text)
        if code != ReplyCode.OK:
            raise Failed(reply, Phase.EHLO)
        server = reply.text.splitlines()[0] if reply.text else ""
        extensions = " ".join(sorted(smtp.esmtp_features)) or "(none)"
        say("ehlo", f"{code} {server}; extensions: {extensions}")

    def _starttls(self, smtp: smtplib.SMTP, say: Report) -> None:
        if not smtp.has_extn("starttls"):
            if self.config.tls == "starttls":
                raise Failed(
                    SMTPReply.lost(
                        "the server does not offer STARTTLS and tls=starttls requires it; nothing "
                        "was sent (check the port: 587 offers STARTTLS, 465 wants smtps://)"
                    ),
                    Phase.TLS,
                )
            say("starttls", "not offered by the server; continuing without TLS (opportunistic)")
            return
        self._limit(smtp, self.config.command_timeout)
        with failing_at(Phase.TLS):
            code, _ = smtp.starttls(context=self._ssl())
        say("starttls", f"{code} {_cipher(smtp)}")
        self._ehlo(smtp, say)

    def _login(self, smtp: smtplib.SMTP, say: Report) -> None:
        cfg = self.config
        if not isinstance(smtp.sock, ssl.SSLSocket) and cfg.tls != "none":
            raise Failed(
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
            with failing_at(Phase.AUTH):
                code, _ = smtp.auth(mechanism, authenticate)
        finally:
            smtp.password = ""
        say("auth", f"{code} authenticated as {cfg.username} ({mechanism})")

    def _ssl(self) -> ssl.SSLContext:
        # verified certificates and host names, always: smtplib's own default verifies nothing
        if self._context is None:
            try:
                self._context = bounded_context(self.config.ca_file)
            except OSError as exc:  # ssl.SSLError is an OSError too
                raise Failed(
                    SMTPReply.lost(f"cannot load ca_file {self.config.ca_file!r}: {exc}"),
                    Phase.TLS,
                ) from None
        return self._context

    # --- one-off commands and the end -------------------------------------------------------

    def verify(self, address: str) -> SMTPReply:
        """VRFY: most servers answer 252 (cannot verify, will try); a lost session is a reply."""
        if not address.isascii() or CONTROL.search(address):
            return SMTPReply.lost(f"cannot VRFY {address!r}: not a plain ASCII address")
        return self._command(lambda smtp: smtp.verify(address))

    def noop(self) -> SMTPReply:
        return self._command(lambda smtp: smtp.noop())

    def _command(self, run: Callable[[smtplib.SMTP], tuple[int, bytes]]) -> SMTPReply:
        try:
            smtp, _ = self._ready()
            self._limit(smtp, self.config.command_timeout)  # outside a send: no deadline
            with failing_at(Phase.CONNECT):
                reply = SMTPReply.of(*run(smtp))
        except Failed as failed:
            self._abort()
            return failed.reply
        self._last_used = time.monotonic()
        if closes(reply):
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
        except NETWORK_ERRORS:
            smtp.close()

    def _abort(self) -> None:
        self._announced = None
        smtp, self._smtp = self._smtp, None
        if smtp is not None:
            smtp.close()


def peer_closed(smtp: smtplib.SMTP) -> bool:
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


def _features(smtp: smtplib.SMTP) -> Features:
    return Features(
        smtp.has_extn("pipelining"),
        smtp.has_extn("size"),
        _size_limit(smtp),
        smtp.has_extn("smtputf8"),
        smtp.has_extn("8bitmime"),
    )


def _size_limit(smtp: smtplib.SMTP) -> int:
    try:
        return int(smtp.esmtp_features.get("size", "") or 0) if smtp.has_extn("size") else 0
    except ValueError:
        return 0


def _mechanism(smtp: smtplib.SMTP) -> str:
    if not smtp.has_extn("auth"):
        raise Failed(
            SMTPReply.lost(
                "the server offers no AUTH; check the port, or remove the user from the URL"
            ),
            Phase.AUTH,
        )
    offered = smtp.esmtp_features["auth"].upper().split()
    for mechanism in _MECHANISMS:
        if mechanism in offered:
            return mechanism
    raise Failed(
        SMTPReply.lost(
            f"no AUTH mechanism in common: the server offers {' '.join(offered) or 'none'}, "
            f"mailer speaks {', '.join(_MECHANISMS)}"
        ),
        Phase.AUTH,
    )


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

"""Persistent smtplib sessions: verified TLS, AUTH, then transactions that know their phase.

One session per relay per worker thread, opened lazily and reused across tasks. A reused
session that went stale is reopened once; a transaction is pipelined (RFC 2920) when the
server offers PIPELINING. The session never decides what a reply means: it reports each
recipient's reply and the phase it came in (replies.classify judges).
"""

from __future__ import annotations

import logging
import re
import smtplib
import ssl
import threading
import time
from collections.abc import Callable, Sequence

from mailer import clock
from mailer.replies import Phase, ReplyCode, SMTPReply
from mailer.transport.base import Outgoing, RecipientResult, TransactionResult
from mailer.transport.relay import RelayConfig

log = logging.getLogger(__name__)

Report = Callable[[str, str], None]
_LEADING_DOT = re.compile(rb"(?m)^\.")
_CRLF = b"\r\n"


class _Failed(Exception):
    """The session cannot carry this transaction; each undecided recipient gets `reply`."""

    def __init__(self, reply: SMTPReply, phase: Phase) -> None:
        super().__init__(reply, phase)
        self.reply = reply
        self.phase = phase


class SMTPSession:
    def __init__(self, config: RelayConfig) -> None:
        self.config = config
        self.name = config.name
        self._smtp: smtplib.SMTP | None = None
        self._in_session = 0
        self._last_used = 0.0
        self._pipelining_broken = False
        self.connections = 0

    # --- the transaction ----------------------------------------------------------------

    def send(self, outgoing: Outgoing) -> TransactionResult:
        started = clock.now()
        for attempt in (1, 2):
            reused = self._smtp is not None
            pipelined = False
            try:
                smtp = self._ready()
                pipelined = self._use_pipelining(smtp)
                results = self._transaction(smtp, outgoing, pipelined)
            except _Failed as failed:
                self._abort()
                if attempt == 1 and self._worth_retrying(failed, reused, pipelined):
                    continue
                decided = failed.decided if isinstance(failed, _FailedWith) else {}
                results = [
                    decided.get(r) or RecipientResult(r, failed.reply, failed.phase)
                    for r in outgoing.recipients
                ]
            break
        tls = self._smtp is not None and isinstance(self._smtp.sock, ssl.SSLSocket)
        self._after_transaction()
        return TransactionResult(
            tuple(results), self.name, tls or self.config.tls == "implicit", started, clock.now()
        )

    def _worth_retrying(self, failed: _Failed, reused: bool, pipelined: bool) -> bool:
        # Nothing was accepted before MAIL finished, so a second try cannot duplicate: a
        # reused session the server had closed, or a pipelined exchange the server mangled.
        if failed.reply.code is not None or failed.phase not in (
            Phase.MAIL,
            Phase.RCPT,
            Phase.DATA,
        ):
            return False
        if pipelined:
            self._pipelining_broken = True
            log.warning(
                "relay %s: pipelined transaction failed (%s); continuing in lockstep",
                self.name,
                failed.reply.text,
            )
            return True
        return reused and failed.phase is Phase.MAIL

    def _transaction(
        self, smtp: smtplib.SMTP, out: Outgoing, pipelined: bool
    ) -> list[RecipientResult]:
        options = self._mail_options(smtp, out)
        decided: dict[str, RecipientResult] = {}
        if pipelined:
            mail, rcpts, data = self._pipelined_envelope(smtp, out, options)
        else:
            mail, rcpts, data = self._lockstep_envelope(smtp, out, options)
        accepted = []
        for recipient, reply in zip(out.recipients, rcpts, strict=False):
            if mail.code == ReplyCode.OK and reply.code in (ReplyCode.OK, ReplyCode.WILL_FORWARD):
                accepted.append(recipient)
            elif mail.code != ReplyCode.OK:
                decided[recipient] = RecipientResult(recipient, mail, Phase.MAIL)
            else:
                decided[recipient] = RecipientResult(recipient, reply, Phase.RCPT)
        if _closes(mail) or any(_closes(r) for r in rcpts):
            raise _FailedWith(decided, _first_closing(mail, rcpts), Phase.RCPT)
        if not accepted:
            self._finish_refused(smtp, data)
            return [decided[r] for r in out.recipients]
        if data is None or data.code != ReplyCode.START_INPUT:
            refusal = data or SMTPReply.lost("no reply to DATA")
            for recipient in accepted:
                decided[recipient] = RecipientResult(recipient, refusal, Phase.DATA)
            if _closes(refusal):
                raise _FailedWith(decided, refusal, Phase.DATA)
            self._rset(smtp)
            return [decided[r] for r in out.recipients]
        final, phase = self._body(smtp, out.data)
        for recipient in accepted:
            decided[recipient] = RecipientResult(recipient, final, phase)
        return [decided[r] for r in out.recipients]

    def _lockstep_envelope(
        self, smtp: smtplib.SMTP, out: Outgoing, options: list[str]
    ) -> tuple[SMTPReply, list[SMTPReply], SMTPReply | None]:
        with _phase(Phase.MAIL):
            mail = SMTPReply.of(*smtp.mail(out.sender, options))
        if mail.code != ReplyCode.OK:
            return mail, [mail] * len(out.recipients), None
        rcpts: list[SMTPReply] = []
        for recipient in out.recipients:
            with _phase(Phase.RCPT):
                reply = SMTPReply.of(*smtp.rcpt(recipient))
            rcpts.append(reply)
            if _closes(reply):
                return mail, rcpts + [reply] * (len(out.recipients) - len(rcpts)), None
        if not any(r.code in (ReplyCode.OK, ReplyCode.WILL_FORWARD) for r in rcpts):
            return mail, rcpts, None
        with _phase(Phase.DATA):
            smtp.putcmd("data")
            data = SMTPReply.of(*smtp.getreply())
        return mail, rcpts, data

    def _pipelined_envelope(
        self, smtp: smtplib.SMTP, out: Outgoing, options: list[str]
    ) -> tuple[SMTPReply, list[SMTPReply], SMTPReply | None]:
        encoding = "utf-8" if out.smtputf8 else "ascii"
        option_text = "".join(" " + o for o in options)
        lines = [f"MAIL FROM:{smtplib.quoteaddr(out.sender)}{option_text}\r\n"]
        lines += [f"RCPT TO:{smtplib.quoteaddr(r)}\r\n" for r in out.recipients]
        lines.append("DATA\r\n")
        with _phase(Phase.MAIL):
            smtp.send("".join(lines).encode(encoding))
            mail = SMTPReply.of(*smtp.getreply())
        rcpts = []
        for _ in out.recipients:
            with _phase(Phase.RCPT):
                rcpts.append(SMTPReply.of(*smtp.getreply()))
        with _phase(Phase.DATA):
            data = SMTPReply.of(*smtp.getreply())
        return mail, rcpts, data

    def _body(self, smtp: smtplib.SMTP, data: bytes) -> tuple[SMTPReply, Phase]:
        body = _LEADING_DOT.sub(b"..", data)
        if not body.endswith(_CRLF):
            body += _CRLF
        with _phase(Phase.BODY):
            smtp.send(body + b"." + _CRLF)
        with _phase(Phase.DOT):
            self._timeout(smtp, self.config.data_timeout)
            final = SMTPReply.of(*smtp.getreply())
            self._timeout(smtp, self.config.command_timeout)
        self._in_session += 1
        if _closes(final):
            self._abort()
        return final, Phase.DOT

    def _finish_refused(self, smtp: smtplib.SMTP, data: SMTPReply | None) -> None:
        if data is not None and data.code == ReplyCode.START_INPUT:
            # a pipelining server said 354 although no recipient was accepted (RFC 2920 3.1):
            # end the empty message so that the session stays in step
            with _phase(Phase.BODY):
                smtp.send(b"." + _CRLF)
                smtp.getreply()
        self._rset(smtp)

    def _rset(self, smtp: smtplib.SMTP) -> None:
        try:
            smtp.rset()
        except (smtplib.SMTPException, OSError):
            # the transaction already failed; a session that cannot even RSET is not reusable
            self._abort()

    def _mail_options(self, smtp: smtplib.SMTP, out: Outgoing) -> list[str]:
        options = []
        limit = int(smtp.esmtp_features.get("size", "0") or 0) if smtp.has_extn("size") else 0
        if limit and len(out.data) > limit:
            raise _Failed(
                SMTPReply.lost(
                    f"message is {len(out.data)} bytes; the server accepts at most {limit} (SIZE)"
                ),
                Phase.LOCAL,
            )
        if smtp.has_extn("size"):
            options.append(f"SIZE={len(out.data)}")
        if out.smtputf8:
            if not smtp.has_extn("smtputf8"):
                raise _Failed(
                    SMTPReply.lost(
                        "an address is not ASCII and the server does not offer SMTPUTF8"
                    ),
                    Phase.LOCAL,
                )
            options.append("SMTPUTF8")
        if smtp.has_extn("8bitmime") and not out.data.isascii():
            options.append("BODY=8BITMIME")
        return options

    def _use_pipelining(self, smtp: smtplib.SMTP) -> bool:
        return (
            self.config.pipelining and not self._pipelining_broken and smtp.has_extn("pipelining")
        )

    # --- the session ----------------------------------------------------------------------

    def _ready(self) -> smtplib.SMTP:
        smtp = self._smtp
        if smtp is not None and time.monotonic() - self._last_used > self.config.idle_noop_after:
            try:
                code, _ = smtp.noop()
            except (smtplib.SMTPException, OSError):
                code = 0
            if code != ReplyCode.OK:
                log.info("relay %s: idle session is gone, reconnecting", self.name)
                self._abort()
                smtp = None
        if smtp is None:
            smtp = self.open()
        return smtp

    def open(self, report: Report | None = None) -> smtplib.SMTP:
        """Connect, EHLO, STARTTLS and AUTH as configured; `report(step, detail)` sees each."""
        say = report or (lambda step, detail: None)
        cfg = self.config
        with _phase(Phase.CONNECT):
            smtp: smtplib.SMTP
            if cfg.tls == "implicit":
                with _phase(Phase.TLS):
                    smtp = smtplib.SMTP_SSL(
                        local_hostname=cfg.ehlo_name,
                        timeout=cfg.connect_timeout,
                        context=self._ssl(),
                    )
                    code, banner = smtp.connect(cfg.host, cfg.port)
            else:
                smtp = smtplib.SMTP(local_hostname=cfg.ehlo_name, timeout=cfg.connect_timeout)
                code, banner = smtp.connect(cfg.host, cfg.port)
        self._smtp = smtp
        self.connections += 1
        greeting = SMTPReply.of(code, banner)
        say("connect", f"{cfg.host}:{cfg.port} {greeting}")
        if code != ReplyCode.READY:
            raise _Failed(greeting, Phase.GREETING)
        self._timeout(smtp, cfg.command_timeout)
        self._ehlo(smtp, say)
        if cfg.tls in ("starttls", "opportunistic"):
            self._starttls(smtp, say)
        if cfg.username:
            self._login(smtp, say)
        self._in_session = 0
        self._last_used = time.monotonic()
        return smtp

    def _ehlo(self, smtp: smtplib.SMTP, say: Report) -> None:
        with _phase(Phase.EHLO):
            code, text = smtp.ehlo()
            if code != ReplyCode.OK:
                code, text = smtp.helo()
        reply = SMTPReply.of(code, text)
        if code != ReplyCode.OK:
            raise _Failed(reply, Phase.EHLO)
        say("ehlo", f"{code} extensions: {' '.join(sorted(smtp.esmtp_features)) or '(none)'}")

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
            say("starttls", "not offered by the server; continuing without TLS (tls=opportunistic)")
            return
        with _phase(Phase.TLS):
            code, text = smtp.starttls(context=self._ssl())
        if code != ReplyCode.READY:
            raise _Failed(SMTPReply.of(code, text), Phase.TLS)
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
        try:
            with _phase(Phase.AUTH):
                code, _ = smtp.login(cfg.username or "", cfg.password or "")
        except smtplib.SMTPAuthenticationError as exc:
            raise _Failed(SMTPReply.of(exc.smtp_code, exc.smtp_error), Phase.AUTH) from None
        except smtplib.SMTPNotSupportedError:
            raise _Failed(
                SMTPReply.lost(
                    "the server offers no AUTH; check the port, or remove the user from the URL"
                ),
                Phase.AUTH,
            ) from None
        except smtplib.SMTPException as exc:
            offered = smtp.esmtp_features.get("auth", "").strip() or "none"
            raise _Failed(
                SMTPReply.lost(
                    f"no AUTH mechanism in common ({exc}); the server offers: {offered}"
                ),
                Phase.AUTH,
            ) from None
        say("auth", f"{code} authenticated as {cfg.username}")

    def _ssl(self) -> ssl.SSLContext:
        # verified certificates and host names, always: smtplib's own default verifies nothing
        return ssl.create_default_context(cafile=self.config.ca_file)

    def _after_transaction(self) -> None:
        self._last_used = time.monotonic()
        if self._smtp is not None and self._in_session >= self.config.max_messages:
            self.close()

    @staticmethod
    def _timeout(smtp: smtplib.SMTP, seconds: float) -> None:
        if smtp.sock is not None:
            smtp.sock.settimeout(seconds)

    def verify(self, address: str) -> SMTPReply:
        smtp = self._ready()
        with _phase(Phase.RCPT):
            return SMTPReply.of(*smtp.verify(address))

    def noop(self) -> SMTPReply:
        smtp = self._ready()
        with _phase(Phase.MAIL):
            return SMTPReply.of(*smtp.noop())

    def close(self) -> None:
        """QUIT politely; errors on QUIT are ignored (the session is over either way)."""
        smtp, self._smtp = self._smtp, None
        if smtp is None:
            return
        try:
            smtp.quit()
        except (smtplib.SMTPException, OSError):
            smtp.close()

    def _abort(self) -> None:
        smtp, self._smtp = self._smtp, None
        if smtp is not None:
            smtp.close()


class _FailedWith(_Failed):
    """A reply that ends the session (421) after some recipients were already decided."""

    def __init__(self, decided: dict[str, RecipientResult], reply: SMTPReply, phase: Phase) -> None:
        super().__init__(reply, phase)
        self.decided = decided


class _phase:
    """Turn a dropped connection or a timeout inside the block into _Failed at that phase."""

    def __init__(self, phase: Phase) -> None:
        self.phase = phase

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, _tb: object
    ) -> bool:
        if exc is None or isinstance(exc, _Failed):
            return False
        if isinstance(exc, ssl.SSLCertVerificationError):
            raise _Failed(
                SMTPReply.lost(
                    f"the server's certificate is not trusted ({exc.verify_message}); for a "
                    "private CA set ca_file=/path/ca.pem in MAILER_SMTP_URL"
                ),
                Phase.TLS,
            ) from None
        if isinstance(exc, ssl.SSLError):
            raise _Failed(SMTPReply.lost(f"TLS failed: {exc}"), Phase.TLS) from None
        if isinstance(exc, smtplib.SMTPServerDisconnected | OSError):
            raise _Failed(SMTPReply.lost(_describe(exc)), self.phase) from None
        return False


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out waiting for the server"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _closes(reply: SMTPReply) -> bool:
    return reply.code == ReplyCode.SERVICE_UNAVAILABLE


def _first_closing(mail: SMTPReply, rcpts: Sequence[SMTPReply]) -> SMTPReply:
    return next(r for r in (mail, *rcpts) if _closes(r))


def _cipher(smtp: smtplib.SMTP) -> str:
    sock = smtp.sock
    if isinstance(sock, ssl.SSLSocket):
        cipher = sock.cipher()
        return f"{sock.version()} {cipher[0] if cipher else ''}".strip()
    return "(no TLS)"


_local = threading.local()


def session_for(config: RelayConfig) -> SMTPSession:
    """This thread's persistent session to `config`'s relay."""
    sessions: dict[RelayConfig, SMTPSession] = _local.__dict__.setdefault("sessions", {})
    if config not in sessions:
        sessions[config] = SMTPSession(config)
        _all_sessions.append(sessions[config])
    return sessions[config]


_all_sessions: list[SMTPSession] = []


def close_all() -> None:
    """QUIT every session of this process (worker shutdown)."""
    while _all_sessions:
        _all_sessions.pop().close()

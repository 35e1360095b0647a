"""How a session fails: Failed (a reply at a phase), and network errors turned into one."""

from __future__ import annotations

import smtplib
import ssl

from mailer.replies import Phase, SMTPReply

# what the network raises through smtplib: a lost connection, a timeout, an unexpected reply
NETWORK_ERRORS = (smtplib.SMTPException, OSError)


class Failed(Exception):
    """The session cannot carry on; each recipient not decided yet gets `reply` at `phase`."""

    def __init__(self, reply: SMTPReply, phase: Phase) -> None:
        super().__init__(reply, phase)
        self.reply = reply
        self.phase = phase


class _Phase:
    """Turn a network failure inside the block into Failed at `phase` (a TLS failure: at
    Phase.TLS). A class, one instance per phase: it is entered on every command, and a
    generator-based context manager costs much more to enter."""

    __slots__ = ("phase",)

    def __init__(self, phase: Phase) -> None:
        self.phase = phase

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        if exc is not None and isinstance(exc, NETWORK_ERRORS):
            raise failure(exc, self.phase) from None


_PHASES = {phase: _Phase(phase) for phase in Phase}


def failing_at(phase: Phase) -> _Phase:
    """`with failing_at(phase):` a network failure in the block is raised as Failed."""
    return _PHASES[phase]


def failure(exc: smtplib.SMTPException | OSError, phase: Phase) -> Failed:
    """What a network failure at `phase` means for the session."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return Failed(
            SMTPReply.lost(
                f"the server's certificate is not trusted ({exc.verify_message}); for a "
                "private CA set ca_file=/path/ca.pem in MAILER_SMTP_URL"
            ),
            Phase.TLS,
        )
    if isinstance(exc, ssl.SSLError) and phase in (Phase.CONNECT, Phase.TLS):
        return Failed(SMTPReply.lost(f"TLS handshake failed: {exc}"), Phase.TLS)
    if isinstance(exc, smtplib.SMTPConnectError):
        return Failed(SMTPReply.of(exc.smtp_code, exc.smtp_error), Phase.GREETING)
    if isinstance(exc, smtplib.SMTPResponseException):
        return Failed(SMTPReply.of(exc.smtp_code, exc.smtp_error), phase)
    return Failed(SMTPReply.lost(_describe(exc)), phase)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out waiting for the server"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__

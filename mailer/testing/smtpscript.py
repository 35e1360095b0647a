"""The scripted SMTP server's script: rules, what the server observed, and aiosmtpd's handler
hooks that apply the rules. Internal to mailer.testing; tests use smtpserver.ScriptedSMTPServer."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Envelope, LoginPassword, Session

Command = Literal["EHLO", "MAIL", "RCPT", "DATA", "DOT", "NOOP", "RSET", "VRFY", "QUIT"]
Phase = Literal["greeting", "ehlo", "mail", "rcpt", "data", "body", "after_dot"]
TLSMode = Literal["none", "starttls", "implicit"]
# How a server that advertises PIPELINING can still mishandle a pipelined batch of commands:
# "close" drops the connection, "first_only" answers the first command and discards the rest,
# "after_body" handles a batch of commands but discards whatever follows a message's "."
PipeliningFault = Literal["close", "first_only", "after_body"]

# A hook's answer: a reply line, or aiosmtpd's MISSING for "do the normal thing".
_HookResult = object

DEFAULT_VRFY = "252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery"
SERVER_NAME = "scripted-smtp.localhost"

# Rules are keyed by the point in the session where they fire. "GREETING" and "BODY" exist for
# drops only; "DOT" is the reply to the final "." (aiosmtpd's handle_DATA hook).
PHASE_POINTS: dict[str, str] = {
    "greeting": "GREETING",
    "ehlo": "EHLO",
    "mail": "MAIL",
    "rcpt": "RCPT",
    "data": "DATA",
    "body": "BODY",
    "after_dot": "DOT",
}
RECIPIENT_POINTS = frozenset({"RCPT", "DATA", "BODY", "DOT"})


@dataclass(frozen=True)
class StoredMessage:
    """A message the server accepted (or stored before dropping, for "after_dot")."""

    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    smtputf8: bool
    mail_options: list[str]


@dataclass
class Rule:
    point: str
    response: str | None  # None: drop the connection instead of replying
    recipient: str | None  # lower-case
    remaining: int | None
    delay: float = 0.0  # seconds before the response
    trickle: float = 0.0  # seconds of continuation lines, a byte at a time, before it

    def matches(self, point: str, recipients: Iterable[str]) -> bool:
        if self.point != point:
            return False
        return self.recipient is None or self.recipient in {r.lower() for r in recipients}


@dataclass
class Observed:
    connections: int = 0
    transactions: int = 0
    quits: int = 0
    auth_attempts: int = 0
    auth_successes: int = 0
    messages: list[StoredMessage] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)


def _positive(response: str) -> bool:
    return response.startswith("2")


async def drop(server: SMTP) -> NoReturn:
    """Abort the TCP connection and end the session without sending anything more."""
    assert isinstance(server.transport, asyncio.Transport)
    server.transport.abort()
    # Unwinds through aiosmtpd's _handle_client, which treats CancelledError as "connection
    # gone" and stops quietly; returning instead would make aiosmtpd push a reply.
    raise asyncio.CancelledError


async def _trickle(server: SMTP, code: str, seconds: float) -> None:
    """Write continuation lines of a `code` reply a byte every 20 ms for `seconds` (a tarpit
    whose every read returns at once), whole lines only: the reply goes on after them."""
    transport = server.transport
    assert isinstance(transport, asyncio.Transport)
    end = asyncio.get_running_loop().time() + seconds
    while asyncio.get_running_loop().time() < end:
        for byte in f"{code}-please wait\r\n".encode():
            if transport.is_closing():
                raise asyncio.CancelledError  # the client gave up: end the session
            transport.write(bytes([byte]))
            await asyncio.sleep(0.02)


async def _close_after(server: SMTP, response: str) -> NoReturn:
    """Send `response`, then close the connection, as servers do after a 421."""
    await server.push(response)
    assert server.transport is not None
    server.transport.close()
    raise asyncio.CancelledError  # as in drop: end the session without another reply


async def answer(server: SMTP, rule: Rule) -> str:
    if rule.delay:
        await asyncio.sleep(rule.delay)
    if rule.trickle and rule.response:
        await _trickle(server, rule.response[:3], rule.trickle)
    if rule.response is None:
        await drop(server)
    if rule.response.startswith("421"):
        await _close_after(server, rule.response)
    return rule.response


class Script:
    """Rules and observations shared by all sessions; also the aiosmtpd handler.

    Hooks run in the server's loop thread; everything else may run in any thread.
    """

    def __init__(self, users: Mapping[str, str] | None, pipelining: bool) -> None:
        self.lock = threading.Condition()
        self.live = False  # False while Controller.start() probes the listener
        self.rules: list[Rule] = []
        self.vrfy: dict[str, str] = {}
        self.seen = Observed()
        self._users = {u.encode(): p.encode() for u, p in (users or {}).items()}
        self._offer_auth = users is not None
        self._pipelining = pipelining

    def add(self, rule: Rule) -> None:
        with self.lock:
            self.rules.append(rule)

    def take(self, point: str, recipients: Iterable[str] = ()) -> Rule | None:
        """The first rule matching, with one use consumed."""
        recipients = list(recipients)
        with self.lock:
            for rule in self.rules:
                if rule.matches(point, recipients):
                    if rule.remaining is not None:
                        rule.remaining -= 1
                        if rule.remaining == 0:
                            self.rules.remove(rule)
                    return rule
            return None

    def accept(self) -> bool:
        """Count a new connection; False for the controller's start-up probe."""
        with self.lock:
            if self.live:
                self.seen.connections += 1
            return self.live

    def record(self, verb: str) -> None:
        with self.lock:
            self.seen.commands.append(verb)

    def store(self, envelope: Envelope) -> None:
        assert envelope.mail_from is not None
        message = StoredMessage(
            mail_from=envelope.mail_from,
            rcpt_tos=list(envelope.rcpt_tos),
            data=envelope.original_content or b"",
            smtputf8=envelope.smtp_utf8,
            mail_options=list(envelope.mail_options),
        )
        with self.lock:
            self.seen.messages.append(message)
            self.lock.notify_all()

    def authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        ok = (
            isinstance(auth_data, LoginPassword)
            and auth_data.login in self._users
            and self._users[auth_data.login] == auth_data.password
        )
        with self.lock:
            self.seen.auth_attempts += 1
            self.seen.auth_successes += ok
        return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)

    def _extensions(self, responses: list[str]) -> list[str]:
        if not self._offer_auth:
            # aiosmtpd advertises its built-in AUTH mechanisms whenever TLS is not required
            responses = [r for r in responses if not r[4:].upper().startswith("AUTH")]
        if self._pipelining:
            responses.insert(-1, "250-PIPELINING")
        return responses

    def _count_transaction(self) -> None:
        with self.lock:
            self.seen.transactions += 1

    async def _reply_or(self, server: SMTP, point: str, default: _HookResult) -> _HookResult:
        rule = self.take(point)
        return default if rule is None else await answer(server, rule)

    # aiosmtpd handler hooks

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        rule = self.take("EHLO")
        if rule is None:
            session.host_name = hostname  # the 5-argument hook must do this itself
            return self._extensions(responses)
        response = await answer(server, rule)
        if _positive(response):
            session.host_name = hostname
        return response.splitlines()

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> _HookResult:
        rule = self.take("MAIL")
        if rule is None:
            self._count_transaction()
            return MISSING
        response = await answer(server, rule)
        if _positive(response):  # a hook returning a status must update the envelope itself
            envelope.mail_from = address
            envelope.mail_options.extend(options)
            self._count_transaction()
        return response

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> _HookResult:
        rule = self.take("RCPT", [address])
        if rule is None:
            return MISSING
        response = await answer(server, rule)
        if _positive(response):
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(options)
        return response

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> _HookResult:
        rule = self.take("DOT", envelope.rcpt_tos)
        if rule is None:
            self.store(envelope)
            return MISSING
        if rule.response is None or _positive(rule.response):  # "after_dot" stores, then drops
            self.store(envelope)
        return await answer(server, rule)

    async def handle_VRFY(
        self, server: SMTP, session: Session, envelope: Envelope, address: str
    ) -> _HookResult:
        with self.lock:
            default = self.vrfy.get(address.lower(), DEFAULT_VRFY)
        return await self._reply_or(server, "VRFY", default)

    async def handle_NOOP(
        self, server: SMTP, session: Session, envelope: Envelope, arg: str | None
    ) -> _HookResult:
        return await self._reply_or(server, "NOOP", MISSING)

    async def handle_RSET(self, server: SMTP, session: Session, envelope: Envelope) -> _HookResult:
        return await self._reply_or(server, "RSET", MISSING)

    async def handle_QUIT(self, server: SMTP, session: Session, envelope: Envelope) -> _HookResult:
        with self.lock:
            self.seen.quits += 1
        return await self._reply_or(server, "QUIT", MISSING)

"""A scripted SMTP server (aiosmtpd in a background thread) that misbehaves on cue."""

from __future__ import annotations

import asyncio
import collections
import ssl
import threading
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, NoReturn, get_args
from urllib.parse import quote

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import (
    ALLOWED_BEFORE_STARTTLS,
    MISSING,
    SMTP,
    AuthResult,
    Envelope,
    LoginPassword,
    Session,
)

__all__ = ["Command", "Phase", "PipeliningFault", "ScriptedSMTPServer", "StoredMessage", "TLSMode"]

Command = Literal["EHLO", "MAIL", "RCPT", "DATA", "DOT", "NOOP", "RSET", "VRFY", "QUIT"]
Phase = Literal["greeting", "ehlo", "mail", "rcpt", "data", "body", "after_dot"]
TLSMode = Literal["none", "starttls", "implicit"]
# How a server that advertises PIPELINING can still mishandle a pipelined batch of commands:
# "close" drops the connection, "first_only" answers the first command and discards the rest,
# "after_body" handles a batch of commands but discards whatever follows a message's "."
PipeliningFault = Literal["close", "first_only", "after_body"]

# A hook's answer: a reply line, or aiosmtpd's MISSING for "do the normal thing".
_HookResult = object
_SMTPMethod = Callable[[str | None], Awaitable[None]]

DEFAULT_VRFY = "252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery"
SERVER_NAME = "scripted-smtp.localhost"
_NO_IDLE_TIMEOUT = 7 * 24 * 3600.0

# Rules are keyed by the point in the session where they fire. "GREETING" and "BODY" exist for
# drops only; "DOT" is the reply to the final "." (aiosmtpd's handle_DATA hook).
_PHASE_POINTS: dict[str, str] = {
    "greeting": "GREETING",
    "ehlo": "EHLO",
    "mail": "MAIL",
    "rcpt": "RCPT",
    "data": "DATA",
    "body": "BODY",
    "after_dot": "DOT",
}
_RECIPIENT_POINTS = frozenset({"RCPT", "DATA", "BODY", "DOT"})


@dataclass(frozen=True)
class StoredMessage:
    """A message the server accepted (or stored before dropping, for "after_dot")."""

    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    smtputf8: bool
    mail_options: list[str]


@dataclass
class _Rule:
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
class _Observed:
    connections: int = 0
    transactions: int = 0
    quits: int = 0
    auth_attempts: int = 0
    auth_successes: int = 0
    messages: list[StoredMessage] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)


def _positive(response: str) -> bool:
    return response.startswith("2")


async def _drop(server: SMTP) -> NoReturn:
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
    raise asyncio.CancelledError  # as in _drop: end the session without another reply


async def _answer(server: SMTP, rule: _Rule) -> str:
    if rule.delay:
        await asyncio.sleep(rule.delay)
    if rule.trickle and rule.response:
        await _trickle(server, rule.response[:3], rule.trickle)
    if rule.response is None:
        await _drop(server)
    if rule.response.startswith("421"):
        await _close_after(server, rule.response)
    return rule.response


class _Script:
    """Rules and observations shared by all sessions; also the aiosmtpd handler.

    Hooks run in the server's loop thread; everything else may run in any thread.
    """

    def __init__(self, users: Mapping[str, str] | None, pipelining: bool) -> None:
        self.lock = threading.Condition()
        self.live = False  # False while Controller.start() probes the listener
        self.rules: list[_Rule] = []
        self.vrfy: dict[str, str] = {}
        self.seen = _Observed()
        self._users = {u.encode(): p.encode() for u, p in (users or {}).items()}
        self._offer_auth = users is not None
        self._pipelining = pipelining

    def add(self, rule: _Rule) -> None:
        with self.lock:
            self.rules.append(rule)

    def take(self, point: str, recipients: Iterable[str] = ()) -> _Rule | None:
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
        return default if rule is None else await _answer(server, rule)

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
        response = await _answer(server, rule)
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
        response = await _answer(server, rule)
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
        response = await _answer(server, rule)
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
        return await _answer(server, rule)

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


class _Session(SMTP):
    """One SMTP connection: aiosmtpd's SMTP plus the hooks aiosmtpd does not have."""

    def __init__(
        self,
        script: _Script,
        *,
        require_starttls: bool,
        auth_required: bool,
        pipelining_fault: PipeliningFault | None,
        idle_reply: str | None,
        **kwargs: Any,
    ) -> None:
        super().__init__(script, **kwargs)
        self._script = script
        self._live = script.accept()
        self._starttls_required = require_starttls
        self._pipelining_fault = pipelining_fault
        self._idle_reply = idle_reply
        # Set after __init__: aiosmtpd warns (once per connection) when AUTH is required
        # without TLS, which is exactly what plain-text test servers do.
        self._auth_required = auth_required
        # aiosmtpd dispatches every verb through this table; wrapping it is the one place that
        # sees them all (and our STARTTLS gate answers with an enhanced status code).
        self._smtp_methods = {
            verb: self._observed(verb, method) for verb, method in self._smtp_methods.items()
        }

    def _observed(self, verb: str, method: _SMTPMethod) -> _SMTPMethod:
        async def observed(arg: str | None) -> None:
            self._script.record(verb)
            batch_fault = self._pipelining_fault in ("close", "first_only")
            if batch_fault and self._more_input_waiting():
                if self._pipelining_fault == "close":
                    await _drop(self)
                self._discard_waiting_input()
            if self._needs_starttls(verb):
                await self.push("530 5.7.0 Must issue a STARTTLS command first")
                return
            await method(arg)

        return observed

    # A command with more already behind it in the read buffer came in a pipelined batch.
    # (StreamReader has no public way to peek; this is a test server.)

    def _more_input_waiting(self) -> bool:
        return bool(getattr(self._reader, "_buffer", b""))

    def _discard_waiting_input(self) -> None:
        buffer = getattr(self._reader, "_buffer", None)
        if isinstance(buffer, bytearray):
            buffer.clear()

    def _timeout_cb(self) -> None:
        # aiosmtpd closes an idle session silently; real servers first say why
        if isinstance(self.transport, asyncio.Transport):
            if self._idle_reply is not None:
                self.transport.write(self._idle_reply.encode("ascii") + b"\r\n")
            self.transport.close()

    def _needs_starttls(self, verb: str) -> bool:
        return (
            self._starttls_required
            and self._tls_protocol is None
            and verb not in ALLOWED_BEFORE_STARTTLS
        )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        after_starttls = self._original_transport is not None  # called again after STARTTLS
        super().connection_made(transport)
        if after_starttls or not self._live:
            return
        rule = self._script.take("GREETING")
        if rule is not None:
            # The session task has not run yet: cancelling it means no 220 banner is sent.
            assert self._handler_coroutine is not None
            self._handler_coroutine.cancel()
            assert isinstance(transport, asyncio.Transport)
            transport.abort()

    async def smtp_DATA(self, arg: str) -> None:
        assert self.envelope is not None
        recipients = self.envelope.rcpt_tos
        rule = self._script.take("DATA", recipients)
        if rule is not None:
            await self.push(await _answer(self, rule))
            return
        if recipients and not arg and self._script.take("BODY", recipients) is not None:
            await self._drop_mid_body()
        await super().smtp_DATA(arg)
        if self._pipelining_fault == "after_body":
            self._discard_waiting_input()

    async def _drop_mid_body(self) -> NoReturn:
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        await self._reader.read(self.line_length_limit)  # some of the body has arrived
        await _drop(self)


class _Controller(Controller):
    """aiosmtpd's threaded Controller that builds our sessions and can bind port 0."""

    def __init__(
        self,
        factory: Callable[[], SMTP],
        *,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None,
    ) -> None:
        super().__init__(None, hostname=host, port=port, ssl_context=ssl_context)
        self._make_session = factory
        self._sessions: weakref.WeakSet[SMTP] = weakref.WeakSet()

    def factory(self) -> SMTP:
        session = self._make_session()
        self._sessions.add(session)
        return session

    def cancel_tasks(self, stop_loop: bool = True) -> None:
        # Runs in the loop at stop(). Abort open sessions first: closing a TLS session politely
        # waits for the client's close_notify, which the stopping loop never sees (socket leak).
        for session in list(self._sessions):
            if isinstance(session.transport, asyncio.Transport):
                session.transport.abort()
        super().cancel_tasks(stop_loop)

    def _create_server(self) -> Awaitable[asyncio.AbstractServer]:
        return self._bind()

    async def _bind(self) -> asyncio.AbstractServer:
        server = await super()._create_server()
        # Read back the port the OS picked before start() self-connects to self.port.
        assert isinstance(server, asyncio.Server)
        self.port = server.sockets[0].getsockname()[1]
        return server


class ScriptedSMTPServer:
    """An SMTP server on 127.0.0.1 whose replies and disconnects are scripted by the test.

    idle_timeout closes a session idle that long, after sending idle_reply if given (e.g.
    "421 4.4.2 Timeout exceeded", as Postfix does). pipelining_fault makes the server mishandle
    pipelined batches although it advertises PIPELINING (see PipeliningFault). A scripted 421
    reply closes the connection after it is sent, as real servers do.

    Scripting (reply/drop/set_vrfy/clear) and observation may be used from any thread,
    before or while the server runs. Observations survive stop()/start(); reset() clears them.

    connections: TCP connections accepted (with implicit TLS, failed handshakes included);
    transactions: MAIL commands accepted; quits: QUIT commands received;
    auth_attempts/auth_successes: AUTH exchanges that got as far as checking credentials;
    messages: stored messages in arrival order;
    commands: every known verb received, in order (including ones refused by the STARTTLS
    gate or answered by rules; not AUTH continuation lines or message bodies).
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tls: TLSMode = "none",
        ssl_context: ssl.SSLContext | None = None,
        require_starttls: bool = False,
        auth: Mapping[str, str] | None = None,
        size_limit: int | None = None,
        smtputf8: bool = True,
        pipelining: bool = True,
        idle_timeout: float | None = None,
        idle_reply: str | None = None,
        pipelining_fault: PipeliningFault | None = None,
    ) -> None:
        if tls not in get_args(TLSMode):
            raise ValueError(f"tls must be one of {get_args(TLSMode)}, not {tls!r}")
        if tls != "none" and ssl_context is None:
            raise ValueError(f"tls={tls!r} needs a server-side ssl_context")
        if require_starttls and tls != "starttls":
            raise ValueError("require_starttls needs tls='starttls'")
        if pipelining_fault is not None and pipelining_fault not in get_args(PipeliningFault):
            raise ValueError(f"pipelining_fault must be one of {get_args(PipeliningFault)}")
        if pipelining_fault is not None and not pipelining:
            raise ValueError("pipelining_fault needs pipelining=True")
        self.host = host
        self.port = port
        self.tls: TLSMode = tls
        self._ssl_context = ssl_context
        self._require_starttls = require_starttls
        self._auth_required = auth is not None
        self._size_limit = size_limit
        self._smtputf8 = smtputf8
        self._idle_timeout = idle_timeout
        self._idle_reply = idle_reply
        self._pipelining_fault: PipeliningFault | None = pipelining_fault
        self._script = _Script(auth, pipelining)
        self._controller: _Controller | None = None

    # lifecycle

    def start(self) -> ScriptedSMTPServer:
        """Listen (port 0 picks a free port; a restart re-binds the same port)."""
        if self._controller is not None:
            raise RuntimeError("server already started")
        controller = _Controller(
            self._new_session,
            host=self.host,
            port=self.port,
            ssl_context=self._ssl_context if self.tls == "implicit" else None,
        )
        controller.start()
        self.port = controller.port
        self._controller = controller
        with self._script.lock:
            self._script.live = True
        return self

    def stop(self) -> None:
        controller, self._controller = self._controller, None
        if controller is None:
            return
        with self._script.lock:
            self._script.live = False
        controller.stop()

    def __enter__(self) -> ScriptedSMTPServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _new_session(self) -> SMTP:
        return _Session(
            self._script,
            require_starttls=self._require_starttls,
            auth_required=self._auth_required,
            pipelining_fault=self._pipelining_fault,
            idle_reply=self._idle_reply,
            hostname=SERVER_NAME,
            tls_context=self._ssl_context if self.tls == "starttls" else None,
            # aiosmtpd only counts STARTTLS as TLS, so implicit TLS must not require it
            auth_require_tls=self.tls == "starttls",
            authenticator=self._script.authenticate,
            data_size_limit=self._size_limit,
            enable_SMTPUTF8=self._smtputf8,
            timeout=self._idle_timeout or _NO_IDLE_TIMEOUT,
        )

    def url(
        self, *, user: str | None = None, password: str | None = None, tls: str | None = None
    ) -> str:
        """E.g. "smtp://127.0.0.1:2525?tls=none" or "smtps://u:p%40ss@127.0.0.1:2465"."""
        mode = tls or self.tls
        userinfo = ""
        if user is not None:
            userinfo = quote(user, safe="")
            if password is not None:
                userinfo += ":" + quote(password, safe="")
            userinfo += "@"
        host = f"[{self.host}]" if ":" in self.host else self.host
        if mode == "implicit":
            return f"smtps://{userinfo}{host}:{self.port}"
        return f"smtp://{userinfo}{host}:{self.port}?tls={mode}"

    # scripting

    def reply(
        self,
        command: Command,
        response: str,
        *,
        recipient: str | None = None,
        times: int | None = None,
        delay: float = 0.0,
        trickle: float = 0.0,
    ) -> None:
        """Answer `response` instead of the normal reply to `command` ("DOT": the final "."),
        after `delay` seconds, and after `trickle` seconds of continuation lines written a
        byte at a time.

        A 2xx response still does what the command normally does (a 2xx at DOT stores the
        message); any other code does not. A DATA rule answers the DATA command itself and must
        be a 4xx/5xx; an EHLO response may be multi-line (lines joined by CRLF). `recipient`
        (RCPT: that address; DATA and DOT: the transaction includes it) is matched
        case-insensitively. Rules are tried in insertion order, first match wins; times=None
        means forever.
        """
        if command not in get_args(Command):
            raise ValueError(f"command must be one of {get_args(Command)}, not {command!r}")
        if command == "DATA" and not response.startswith(("4", "5")):
            raise ValueError("a DATA rule can only refuse; script the reply to '.' with DOT")
        rule = self._rule(command, response, recipient, times)
        rule.delay = delay
        rule.trickle = trickle
        self._script.add(rule)

    def drop(self, phase: Phase, *, recipient: str | None = None, times: int | None = 1) -> None:
        """Close the connection abruptly at `phase` instead of replying.

        "greeting": before the 220 banner; "data": before 354; "body": after 354 and some body
        (nothing stored); "after_dot": the message is stored, then no reply to ".".
        """
        if phase not in _PHASE_POINTS:
            raise ValueError(f"phase must be one of {list(_PHASE_POINTS)}, not {phase!r}")
        self._script.add(self._rule(_PHASE_POINTS[phase], None, recipient, times))

    @staticmethod
    def _rule(point: str, response: str | None, recipient: str | None, times: int | None) -> _Rule:
        if recipient is not None and point not in _RECIPIENT_POINTS:
            raise ValueError(f"recipient= is meaningless at {point}")
        if times is not None and times < 1:
            raise ValueError("times must be None (forever) or >= 1")
        return _Rule(point, response, None if recipient is None else recipient.lower(), times)

    def set_vrfy(self, address: str, response: str) -> None:
        with self._script.lock:
            self._script.vrfy[address.lower()] = response

    def clear(self) -> None:
        """Remove all reply/drop rules and VRFY answers."""
        with self._script.lock:
            self._script.rules.clear()
            self._script.vrfy.clear()

    def reset(self) -> None:
        """Forget everything observed so far (counters, messages, commands)."""
        with self._script.lock:
            self._script.seen = _Observed()

    # observation

    @property
    def connections(self) -> int:
        with self._script.lock:
            return self._script.seen.connections

    @property
    def transactions(self) -> int:
        with self._script.lock:
            return self._script.seen.transactions

    @property
    def quits(self) -> int:
        with self._script.lock:
            return self._script.seen.quits

    @property
    def auth_attempts(self) -> int:
        with self._script.lock:
            return self._script.seen.auth_attempts

    @property
    def auth_successes(self) -> int:
        with self._script.lock:
            return self._script.seen.auth_successes

    @property
    def messages(self) -> list[StoredMessage]:
        with self._script.lock:
            return list(self._script.seen.messages)

    @property
    def commands(self) -> list[str]:
        with self._script.lock:
            return list(self._script.seen.commands)

    def copies(self) -> collections.Counter[str]:
        """Recipient address (lower-case) -> number of stored copies."""
        return collections.Counter(r.lower() for m in self.messages for r in m.rcpt_tos)

    def wait_for(self, n_messages: int, timeout: float = 10.0) -> bool:
        """Block until at least `n_messages` are stored; False on timeout."""
        with self._script.lock:
            return self._script.lock.wait_for(
                lambda: len(self._script.seen.messages) >= n_messages, timeout
            )

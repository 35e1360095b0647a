"""The scripted SMTP server's connections: aiosmtpd's SMTP session with the hooks aiosmtpd
lacks (greeting drops, pipelining faults, a STARTTLS gate, idle replies), and its threaded
controller. Internal to mailer.testing; tests use smtpserver.ScriptedSMTPServer."""

from __future__ import annotations

import asyncio
import ssl
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import ALLOWED_BEFORE_STARTTLS, SMTP

from mailer.testing.smtpscript import PipeliningFault, Script, answer, drop

_SMTPMethod = Callable[[str | None], Awaitable[None]]


class ScriptedSession(SMTP):
    """One SMTP connection: aiosmtpd's SMTP plus the hooks aiosmtpd does not have."""

    def __init__(
        self,
        script: Script,
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
                    await drop(self)
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
            await self.push(await answer(self, rule))
            return
        if recipients and not arg and self._script.take("BODY", recipients) is not None:
            await self._drop_mid_body()
        await super().smtp_DATA(arg)
        if self._pipelining_fault == "after_body":
            self._discard_waiting_input()

    async def _drop_mid_body(self) -> NoReturn:
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        await self._reader.read(self.line_length_limit)  # some of the body has arrived
        await drop(self)


class ScriptedController(Controller):
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

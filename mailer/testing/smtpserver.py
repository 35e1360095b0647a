"""A scripted SMTP server (aiosmtpd in a background thread) that misbehaves on cue."""

from __future__ import annotations

import collections
import ssl
from collections.abc import Mapping
from types import TracebackType
from typing import get_args
from urllib.parse import quote

from aiosmtpd.smtp import SMTP

from mailer.testing.smtpscript import (
    PHASE_POINTS,
    RECIPIENT_POINTS,
    SERVER_NAME,
    Command,
    Observed,
    Phase,
    PipeliningFault,
    Rule,
    Script,
    StoredMessage,
    TLSMode,
)
from mailer.testing.smtpsession import ScriptedController, ScriptedSession

__all__ = ["Command", "Phase", "PipeliningFault", "ScriptedSMTPServer", "StoredMessage", "TLSMode"]

_NO_IDLE_TIMEOUT = 7 * 24 * 3600.0


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

    def __init__(  # noqa: PLR0913 (keyword-only options, as aiosmtpd takes them)
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
        self._script = Script(auth, pipelining)
        self._controller: ScriptedController | None = None

    # lifecycle

    def start(self) -> ScriptedSMTPServer:
        """Listen (port 0 picks a free port; a restart re-binds the same port)."""
        if self._controller is not None:
            raise RuntimeError("server already started")
        controller = ScriptedController(
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
        return ScriptedSession(
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
        if phase not in PHASE_POINTS:
            raise ValueError(f"phase must be one of {list(PHASE_POINTS)}, not {phase!r}")
        self._script.add(self._rule(PHASE_POINTS[phase], None, recipient, times))

    @staticmethod
    def _rule(point: str, response: str | None, recipient: str | None, times: int | None) -> Rule:
        if recipient is not None and point not in RECIPIENT_POINTS:
            raise ValueError(f"recipient= is meaningless at {point}")
        if times is not None and times < 1:
            raise ValueError("times must be None (forever) or >= 1")
        return Rule(point, response, None if recipient is None else recipient.lower(), times)

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
            self._script.seen = Observed()

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

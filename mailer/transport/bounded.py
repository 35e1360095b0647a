"""Reads from the relay that end by the send's deadline: sockets, TLS context, smtplib clients.

Why: a socket's timeout bounds one read, and a server that trickles a reply a byte at a time
(or stalls a TLS handshake) would otherwise hold a send, and its chunk's lease, as long as it
liked. Every read of a session's socket, the handshake's included, therefore ends by the
deadline the session sets on it (`deadline`, on the monotonic clock), give or take SLACK; past
it, what has already come is still read for GRACE, and then nothing. smtplib is kept as the
client: its SMTP classes are given these sockets through their socket factory (_get_socket)
and the TLS context (whose wrap_socket is patched), the two ways a socket reaches them.
"""

from __future__ import annotations

import smtplib
import socket
import ssl
import time
from typing import TYPE_CHECKING, Any, Protocol, cast

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

# how far past a send's deadline a wait for the relay may end (see bound)
SLACK = 0.05
# past the deadline, a reply that has already come is still read (a wait is ALREADY_COME
# at most), for GRACE: the step's other sessions may have waited until the deadline first.
# A quarter of a second stays within the quarter of the lease left after the deadline for
# any lease over a second (delivery._Limits).
GRACE = 0.25
ALREADY_COME = 0.001


class Bounded(Protocol):
    """A socket whose reads end by its `deadline` (time.monotonic(), or None: no bound but
    the timeout), which the connection sets before each wait (Connection._limit)."""

    deadline: float | None

    def gettimeout(self) -> float | None: ...

    def settimeout(self, value: float | None) -> None: ...


def bound(sock: Bounded) -> None:
    """Before a read from the relay (or a TLS handshake): it ends by the socket's deadline,
    give or take SLACK. Connection._limit set the timeout to the time left when the wait
    began, so that the wait's first read (nearly always its only one) needs no second system
    call here. Past the deadline, only what has already come is read, and nothing once GRACE
    is over too."""
    deadline = sock.deadline
    if deadline is not None:
        left = deadline - time.monotonic()
        if left <= -GRACE:
            raise TimeoutError("timed out")
        timeout = sock.gettimeout()
        if left <= 0:
            if timeout != ALREADY_COME:
                sock.settimeout(ALREADY_COME)
        elif timeout is None or left < timeout - SLACK:
            sock.settimeout(left)


class BoundedSocket(socket.socket):
    deadline: float | None = None

    def recv_into(self, buffer: WriteableBuffer, nbytes: int = 0, flags: int = 0) -> int:
        bound(self)
        return socket.socket.recv_into(self, buffer, nbytes, flags)


class BoundedTLSSocket(ssl.SSLSocket):  # the class of the sessions' SSLContext's sockets
    deadline: float | None = None

    def recv_into(self, buffer: WriteableBuffer, nbytes: int | None = None, flags: int = 0) -> int:
        bound(self)
        return ssl.SSLSocket.recv_into(self, buffer, nbytes, flags)


def bounded_context(cafile: str | None) -> ssl.SSLContext:
    """ssl's default client context (verified certificates and host names), whose sockets are
    bounded: the handshake, which reads in C and not through `recv_into`, gets the time left
    as its timeout (the TLS socket takes the plain one's), and the TLS socket keeps the
    plain one's deadline."""
    context = ssl.create_default_context(cafile=cafile)
    context.sslsocket_class = BoundedTLSSocket
    wrap = context.wrap_socket

    def wrap_bounded(sock: BoundedSocket, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        bound(sock)
        tls = cast(BoundedTLSSocket, wrap(sock, *args, **kwargs))
        tls.deadline = sock.deadline
        return tls

    context.wrap_socket = wrap_bounded  # type: ignore[method-assign,assignment]
    return context


class BoundedSMTP(smtplib.SMTP):
    """smtplib's client over a BoundedSocket, bound by `deadline` from the greeting on."""

    def __init__(
        self, host: str, port: int, name: str, timeout: float, deadline: float | None
    ) -> None:
        self.deadline = deadline
        super().__init__(host, port, name, timeout)

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        plain = super()._get_socket(host, port, timeout)  # type: ignore[misc]
        sock = BoundedSocket(plain.family, plain.type, plain.proto, fileno=plain.detach())
        sock.settimeout(timeout)
        sock.deadline = self.deadline
        return sock


class BoundedSMTP_SSL(smtplib.SMTP_SSL, BoundedSMTP):
    """Implicit TLS: SMTP_SSL wraps BoundedSMTP's socket with the session's context."""

    def __init__(
        self,
        host: str,
        port: int,
        name: str,
        timeout: float,
        context: ssl.SSLContext,
        deadline: float | None,
    ) -> None:
        self.deadline = deadline  # SMTP_SSL's __init__ calls SMTP's, not BoundedSMTP's
        smtplib.SMTP_SSL.__init__(
            self, host, port, local_hostname=name, timeout=timeout, context=context
        )

"""Serving mailer's metrics: the registry a scrape reads (every worker process's values from
the multiprocess directory, and the outbox's gauges from the database), over HTTP on a port
of its own (`mailer metrics`) or as an ASGI app that a web app mounts at /metrics.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector

from mailer import metrics_files
from mailer.metrics_outbox import OutboxCollector

DEFAULT_PORT = 9808

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class _Workers(MultiProcessCollector):
    """Every worker process's values, summed (prometheus_client's multiprocess collector),
    the live gauges of processes that are gone removed first."""

    def __init__(self, registry: CollectorRegistry, path: Path, sweep: bool) -> None:
        super().__init__(registry, str(path))  # type: ignore[no-untyped-call]
        self.directory = path
        self.sweep = sweep

    def collect(self) -> Iterable[Metric]:
        if self.sweep:
            metrics_files.sweep(self.directory)
        return super().collect()  # type: ignore[no-untyped-call,no-any-return]


def registry(url: str | None = None, *, sweep: bool = True) -> CollectorRegistry:
    """What a scrape reads: the workers' values when PROMETHEUS_MULTIPROC_DIR is set (`sweep`:
    remove the live gauges of processes gone; only where their PIDs are visible), and the
    outbox at `url` (default: MAILER_DATABASE_URL)."""
    found = CollectorRegistry()
    path = metrics_files.directory()
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        _Workers(found, path, sweep)
    found.register(OutboxCollector(url))
    return found


def scrape(source: CollectorRegistry) -> bytes:
    """The text a scrape returns (Prometheus's exposition format)."""
    return generate_latest(source)


def asgi_app(source: CollectorRegistry | None = None) -> ASGIApp:
    """An ASGI app answering every GET with the metrics (mount it at /metrics). The scrape
    reads the database, so it runs in a thread, off the event loop."""
    chosen = source

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal chosen
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        if scope.get("method", "GET") not in ("GET", "HEAD"):
            await _answer(send, 405, b"method not allowed\n", b"text/plain; charset=utf-8")
            return
        if chosen is None:
            chosen = registry()
        body = await asyncio.to_thread(scrape, chosen)
        await _answer(send, 200, body, CONTENT_TYPE_LATEST.encode())

    return app


async def _answer(send: Send, status: int, body: bytes, content_type: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", content_type)],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def serve(port: int, address: str, source: CollectorRegistry, stop: threading.Event) -> None:
    """Serve `source` over HTTP at address:port (any path) until `stop` is set."""
    from prometheus_client import start_http_server

    server, thread = start_http_server(port, address, registry=source)
    try:
        stop.wait()
    finally:
        server.shutdown()
        thread.join(timeout=5)

"""`mailer metrics`: serve the workers' and the outbox's metrics to Prometheus."""

from __future__ import annotations

import signal
import threading
from typing import Any

import click

DEFAULT_PORT = 9808  # mailer.metrics.DEFAULT_PORT, not imported: every command would pay for it


@click.command("metrics")
@click.option("--port", default=DEFAULT_PORT, show_default=True, help="Port to listen on.")
@click.option("--bind", default="0.0.0.0", show_default=True, help="Address to listen on.")
@click.option(
    "--sweep/--no-sweep",
    default=True,
    show_default=True,
    help="Remove the open-session gauges of worker processes that are gone (this process must "
    "see the worker's PIDs: the same host, or the same PID namespace).",
)
def metrics_cmd(port: int, bind: str, sweep: bool) -> None:
    """Serve the metrics on a port of their own, at any path: every process of the workers
    on this host (PROMETHEUS_MULTIPROC_DIR, as given to `mailer worker` with
    MAILER_HOOKS=mailer.hooks.metrics:Metrics) and the outbox's gauges, read at each scrape."""
    from mailer import metrics

    stop = threading.Event()

    def stopping(*_: Any) -> None:
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stopping)
    source = metrics.registry(sweep=sweep)
    click.echo(f"serving metrics on http://{bind}:{port}/metrics", err=True)
    metrics.serve(port, bind, source, stop)

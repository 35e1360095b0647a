"""What the bench's own asyncio servers (pysink.py, delayproxy.py) share."""

from __future__ import annotations

import asyncio
import signal


async def serve_until_stopped(server: asyncio.Server) -> None:
    """Serve until SIGTERM or SIGINT (bench/run.py stops its helpers with SIGTERM)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()

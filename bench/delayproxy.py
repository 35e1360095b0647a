"""A TCP proxy that adds latency: every chunk read on one side is written to the other side
`--delay` seconds later (0.010 in each direction = a 20 ms round trip), in order, without
limiting bandwidth (chunks in flight overlap, as on a long fat link)."""

from __future__ import annotations

import argparse
import asyncio
import collections

from serving import serve_until_stopped


class _Pipe:
    """One direction: a FIFO of (due time, bytes) drained by a single timer, so order holds."""

    def __init__(self, loop: asyncio.AbstractEventLoop, writer: asyncio.StreamWriter, delay: float):
        self.loop = loop
        self.writer = writer
        self.delay = delay
        self.fifo: collections.deque[tuple[float, bytes | None]] = collections.deque()
        self.timer: asyncio.TimerHandle | None = None
        self.done = asyncio.Event()

    def push(self, data: bytes | None) -> None:
        self.fifo.append((self.loop.time() + self.delay, data))
        if self.timer is None:
            self.timer = self.loop.call_at(self.fifo[0][0], self._flush)

    def _flush(self) -> None:
        self.timer = None
        now = self.loop.time()
        while self.fifo and self.fifo[0][0] <= now:
            _, data = self.fifo.popleft()
            if data is None:  # EOF from the other side, delayed like data
                self.done.set()
                if not self.writer.is_closing():
                    try:
                        if self.writer.can_write_eof():
                            self.writer.write_eof()
                        else:
                            self.writer.close()
                    except OSError:
                        self.writer.close()
            elif not self.writer.is_closing():
                self.writer.write(data)
        if self.fifo:
            self.timer = self.loop.call_at(self.fifo[0][0], self._flush)


async def _pump(reader: asyncio.StreamReader, pipe: _Pipe) -> None:
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            pipe.push(data)
    except (ConnectionError, OSError):
        pass
    pipe.push(None)
    await pipe.done.wait()


async def _serve(
    client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter, target: int, delay: float
) -> None:
    loop = asyncio.get_running_loop()
    try:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", target)
    except OSError:
        client_w.close()
        return
    up = _Pipe(loop, server_w, delay)
    down = _Pipe(loop, client_w, delay)
    try:
        await asyncio.gather(_pump(client_r, up), _pump(server_r, down))
    finally:
        client_w.close()
        server_w.close()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--target-port", type=int, required=True)
    parser.add_argument("--delay", type=float, default=0.010, help="seconds, each direction")
    args = parser.parse_args()
    server = await asyncio.start_server(
        lambda r, w: _serve(r, w, args.target_port, args.delay),
        "127.0.0.1",
        args.port,
        backlog=1000,
    )
    await serve_until_stopped(server)


if __name__ == "__main__":
    asyncio.run(main())

"""A fast asyncio SMTP sink (the fallback when Postfix's smtp-sink is not installed).

Accepts everything, advertises PIPELINING (commands are read from a buffered stream and the
replies to a pipelined group go out in one write), discards the data, and writes the same
running counter as `smtp-sink -c` ("sess=S quit=Q mesg=M\\r") to stdout after every message
and session, which is how bench/run.py counts what arrived.
"""

from __future__ import annotations

import argparse
import asyncio
import os

from serving import serve_until_stopped

COUNTS = {"sess": 0, "quit": 0, "mesg": 0}
EHLO = b"250-pysink\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250 SIZE 0\r\n"


def _show() -> None:
    os.write(1, f"sess={COUNTS['sess']} quit={COUNTS['quit']} mesg={COUNTS['mesg']}\r".encode())


async def _session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"220 pysink ESMTP\r\n")
    try:
        while True:
            line = await reader.readline()
            if not line:
                break
            verb = line[:4].upper()
            if verb == b"DATA":
                writer.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                await writer.drain()
                first = await reader.readline()
                if first != b".\r\n":
                    await reader.readuntil(b"\r\n.\r\n")
                COUNTS["mesg"] += 1
                _show()
                writer.write(b"250 2.0.0 Ok: queued\r\n")
            elif verb in (b"EHLO", b"LHLO"):
                writer.write(EHLO)
            elif verb == b"HELO":
                writer.write(b"250 pysink\r\n")
            elif verb == b"QUIT":
                COUNTS["quit"] += 1
                writer.write(b"221 2.0.0 Bye\r\n")
                await writer.drain()
                break
            elif verb in (b"MAIL", b"RCPT", b"RSET", b"NOOP"):
                writer.write(b"250 2.0.0 Ok\r\n")
            else:
                writer.write(b"502 5.5.2 Error: command not recognized\r\n")
            # flush only when the client has sent nothing more: one write per pipelined group
            if not reader._buffer:  # type: ignore[attr-defined]
                await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        pass
    finally:
        COUNTS["sess"] += 1
        _show()
        writer.close()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    server = await asyncio.start_server(_session, args.host, args.port, backlog=1000, limit=1 << 20)
    await serve_until_stopped(server)


if __name__ == "__main__":
    asyncio.run(main())

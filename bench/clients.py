"""The ceilings: plain clients over one persistent SMTP session each, no queue, no database.

    python bench/clients.py lockstep  --port P --count N --start-at T
    python bench/clients.py pipelined --port P --count N --start-at T

`lockstep`: smtplib.SMTP.sendmail() in a loop (MAIL, RCPT, DATA, body: a round trip each).
`pipelined`: a raw socket using PIPELINING (RFC 2920) as an MTA does: the body and its final
"." go out in one write with the next message's MAIL, RCPT and DATA, so a message costs one
round trip. Both send the same pre-built ~2 KB message (bench/content.py). Each process
waits until the wall-clock time T, so that several start together, and prints one JSON line:
its start and end times and how many messages the server accepted.
"""

from __future__ import annotations

import argparse
import json
import smtplib
import socket
import sys
import time

import content


def _wait(start_at: float) -> None:
    delay = start_at - time.time()
    if delay > 0:
        time.sleep(delay)


def lockstep(host: str, port: int, count: int, start_at: float) -> dict[str, float | int]:
    data = content.build_message()
    rcpt = [content.recipient(0)["email"]]
    smtp = smtplib.SMTP(host, port, timeout=60)
    smtp.ehlo("bench.example.com")
    _wait(start_at)
    t0, c0 = time.time(), time.process_time()
    for _ in range(count):
        smtp.sendmail(content.SENDER, rcpt, data)
    t1, c1 = time.time(), time.process_time()
    smtp.quit()
    return {"start": t0, "end": t1, "sent": count, "cpu_s": c1 - c0}


class _Replies:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def read(self) -> tuple[int, bytes]:
        """One (possibly multi-line) reply."""
        while True:
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError("server closed the connection")
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            if line[3:4] != b"-":
                return int(line[:3]), line


def _expect(replies: _Replies, first: int) -> None:
    code, line = replies.read()
    if code // 100 != first:
        raise RuntimeError(f"unexpected reply {line!r}")


def pipelined(host: str, port: int, count: int, start_at: float) -> dict[str, float | int]:
    data = content.build_message()
    body = data.replace(b"\r\n.", b"\r\n..")  # dot-stuffing (none here, but correct)
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    rcpt = content.recipient(0)["email"]
    envelope = f"MAIL FROM:<{content.SENDER}>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n".encode()
    sock = socket.create_connection((host, port), timeout=60)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    replies = _Replies(sock)
    _expect(replies, 2)
    sock.sendall(b"EHLO bench.example.com\r\n")
    code, line = replies.read()
    if code != 250:
        raise RuntimeError(f"EHLO: {line!r}")
    _wait(start_at)
    t0, c0 = time.time(), time.process_time()
    sock.sendall(envelope)  # the first message's envelope alone
    for i in range(count):
        _expect(replies, 2)  # MAIL
        _expect(replies, 2)  # RCPT
        _expect(replies, 3)  # DATA -> 354
        last = i == count - 1
        sock.sendall(body + b".\r\n" + (b"QUIT\r\n" if last else envelope))
        _expect(replies, 2)  # the message
    t1, c1 = time.time(), time.process_time()
    _expect(replies, 2)  # 221
    sock.close()
    return {"start": t0, "end": t1, "sent": count, "cpu_s": c1 - c0}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["lockstep", "pipelined"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--start-at", type=float, default=0.0)
    args = parser.parse_args()
    run = lockstep if args.mode == "lockstep" else pipelined
    result = run(args.host, args.port, args.count, args.start_at)
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()

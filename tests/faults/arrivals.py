"""When each copy reached the SMTP server: a thread samples the server's stored messages, so
that a scenario can say how long after a fault sending resumed."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import Any

SAMPLE = 0.01  # seconds between two looks at the server


class Arrivals:
    """Started on a ScriptedSMTPServer; `first(recipients, after)` is the monotonic time at
    which the first copy for one of `recipients` was seen, among copies stored after `after`."""

    def __init__(self, server: Any) -> None:
        self._server = server
        self._seen: list[tuple[float, list[str]]] = []  # (when seen, its recipients)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Arrivals:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE):
            messages = self._server.messages
            now = time.monotonic()
            for message in messages[len(self._seen) :]:
                self._seen.append((now, [r.lower() for r in message.rcpt_tos]))

    def first(self, recipients: Iterable[str], after: float) -> float | None:
        wanted = {r.lower() for r in recipients}
        for when, rcpts in list(self._seen):
            if when >= after and wanted.intersection(rcpts):
                return when
        return None

"""Hooks the tests register with MAILER_HOOKS: not tests themselves.

`Recording` appends what it sees, a JSON line an event, to the file MAILER_TEST_HOOK_FILE
names (appends of a short line are atomic, so a worker's processes can share the file).
`NotNowFor` holds back, for an hour, each group that includes an address in `HELD`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from mailer.hooks import Chunk, Hooks, NotNow
from mailer.models import DeliveryState
from mailer.outcomes import Claimed, Verdict


class Recording(Hooks):
    def _write(self, event: dict[str, Any]) -> None:
        line = json.dumps(event) + "\n"
        with open(os.environ["MAILER_TEST_HOOK_FILE"], "a", encoding="utf-8") as out:
            out.write(line)

    def chunk_claimed(self, chunk: Chunk, deliveries: Sequence[Claimed]) -> None:
        self._write({"event": "claimed", "ids": [d.id for d in deliveries]})

    def verdicts_recorded(self, chunk: Chunk, verdicts: Sequence[Verdict]) -> None:
        items = [[v.delivery_id, v.reply.code] for v in verdicts]
        self._write({"event": "recorded", "verdicts": items})

    def deliveries_released(
        self,
        chunk: Chunk,
        deliveries: Sequence[Claimed],
        state: DeliveryState,
        due: datetime,
        why: str,
    ) -> None:
        ids = [d.id for d in deliveries]
        self._write({"event": "released", "ids": ids, "state": state.value, "why": why})


HELD: set[str] = set()


class NotNowFor(Hooks):
    def before_transaction(self, chunk: Chunk, deliveries: Sequence[Claimed]) -> NotNow:
        if any(d.recipient in HELD for d in deliveries):
            return timedelta(hours=1)
        return None


def read(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as events:
        return [json.loads(line) for line in events]

"""A hook that logs one INFO line a chunk: what it claimed, what became of it, how long it took.

MAILER_HOOKS=mailer.hooks.chunklog:ChunkLog

chunk on smtp.example.com: claimed 500, sent 480, deferred 12, bounced 6, failed 2, in 1.84 s
chunk on smtp.example.com: claimed 500, sent 120, deferred 1, bounced 0, failed 0,
released 379 (the relay failed relay-wide: deferred until 14:02:11), in 0.52 s
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from mailer.hooks import Chunk, Hooks

if TYPE_CHECKING:
    from mailer.delivery import ChunkReport
    from mailer.models import DeliveryState
    from mailer.outcomes import Claimed, Verdict

log = logging.getLogger(__name__)
_KEY = "chunklog"
# the state a verdict's class usually leads to (ambiguous: as MAILER_AMBIGUOUS=hold has it)
_SHOWN = {
    "delivered": "sent",
    "transient": "deferred",
    "throttled": "deferred",
    "connection": "deferred",
    "too_many_recipients": "deferred",
    "configuration": "queued",
    "hard_bounce": "bounced",
    "message_failure": "failed",
    "protocol": "failed",
    "ambiguous": "unknown",
}


@dataclass
class _Tally:
    claimed: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    released: list[str] = field(default_factory=list)


class ChunkLog(Hooks):
    """Counts a chunk's outcomes as they are recorded and logs them when it is done."""

    def chunk_claimed(self, chunk: Chunk, deliveries: Sequence[Claimed]) -> None:
        chunk.notes[_KEY] = _Tally(claimed=len(deliveries))

    def verdicts_recorded(self, chunk: Chunk, verdicts: Sequence[Verdict]) -> None:
        tally: _Tally = chunk.notes.setdefault(_KEY, _Tally())
        tally.outcomes.update(_SHOWN.get(v.klass.value, v.klass.value) for v in verdicts)

    def deliveries_released(
        self,
        chunk: Chunk,
        deliveries: Sequence[Claimed],
        state: DeliveryState,
        due: datetime,
        why: str,
    ) -> None:
        tally: _Tally = chunk.notes.setdefault(_KEY, _Tally())
        tally.released.append(
            f"released {len(deliveries)} ({why}: {state.value} until {due:%H:%M:%S})"
        )

    def chunk_done(self, chunk: Chunk, report: ChunkReport) -> None:
        tally: _Tally = chunk.notes.get(_KEY, _Tally())
        counts = tally.outcomes.copy()
        parts = [f"claimed {tally.claimed}"]
        parts += [
            f"{name} {counts.pop(name, 0)}" for name in ("sent", "deferred", "bounced", "failed")
        ]
        parts += [f"{name} {n}" for name, n in sorted(counts.items())]  # unknown, queued
        parts += tally.released
        log.info(
            "chunk on %s: %s, in %.2f s",
            chunk.relay,
            ", ".join(parts),
            time.monotonic() - chunk.started,
        )

"""A hook that logs one INFO line a chunk: what it claimed, what became of it, how long it took.

MAILER_HOOKS=mailer.hooks.chunklog:ChunkLog

chunk on smtp.example.com: claimed 500, delivered 480, transient 12, hard_bounce 6,
message_failure 2, in 1.84 s
chunk on smtp.example.com: claimed 500, delivered 120, throttled 1, released 379 (the relay
failed relay-wide: deferred until 14:02:11), in 0.52 s

It counts the replies by class (mailer.replies.ReplyClass) rather than guess the states they
led to: outcomes.py alone decides those (a transient reply may end a delivery expired).
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
        tally.outcomes.update(v.klass.value for v in verdicts)

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
        parts = [f"claimed {tally.claimed}"]
        by_count = sorted(tally.outcomes.items(), key=lambda item: (-item[1], item[0]))
        parts += [f"{name} {n}" for name, n in by_count]
        parts += tally.released
        log.info(
            "chunk on %s: %s, in %.2f s",
            chunk.relay,
            ", ".join(parts),
            time.monotonic() - chunk.started,
        )

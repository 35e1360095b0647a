"""An operator's change to many deliveries (cancel, retry, resume): the ids read once, then
changed a batch at a time, each batch its own short transaction."""

from __future__ import annotations

from array import array
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sqlalchemy import Executable, Select
from sqlalchemy.orm import Session

from mailer.models import Delivery

# deliveries a transaction: its row locks are held for a fraction of a second, so a worker
# that claims one of them waits no longer than that
BATCH = 5000
Progress = Callable[[int, int], None]


def apply(
    session: Session,
    selected: Select[Any],
    statements: Sequence[Executable],
    params: Mapping[str, Any],
    progress: Progress | None = None,
) -> int:
    """Run `statements` (each taking the batch's ids as `ids`, see `bulk.among`, besides
    `params`) over the ids `selected` holds, BATCH ids at a time, committing after each
    batch; returns the rows the last statement changed, summed. `progress(done, total)` is
    told after each commit. Stopped part-way, the batches done stay done: a change must take
    its rows out of `selected`, so that running it again completes it."""
    # read once, in id order (each batch's rows close together), 8 bytes an id
    ids = array("q", session.scalars(selected.order_by(Delivery.id)))
    changed = 0
    for start in range(0, len(ids), BATCH):
        part = {**params, "ids": ids[start : start + BATCH].tolist()}
        for statement in statements:
            result: Any = session.execute(statement, part)
        changed += max(int(result.rowcount), 0)
        session.commit()
        if progress is not None:
            progress(min(start + BATCH, len(ids)), len(ids))
    return changed

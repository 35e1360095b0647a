"""Sending lanes: a chunk's groups over this process's sessions, two in step to a thread.

Generic over what it sends: the caller gives a `Steps` (compose a group; attempt a composed
group on a transport; say whether a result stops the chunk). `send` returns a `Sending`,
whose iteration yields each attempted group's result as it comes and whose `close` returns
the `Ending`: the groups not begun, the results sent but not yet handed on, and the
reasons that stopped it.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections.abc import Callable, Generator, Hashable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from mailer.transport.base import Transport

log = logging.getLogger(__name__)
G = TypeVar("G")  # a group: what one transaction sends
P = TypeVar("P")  # a group composed, ready to send (or why it cannot be)
R = TypeVar("R")  # a group's result
W = TypeVar("W")  # why a result stops the chunk
# sessions one sending thread (a lane) drives in step: it writes a message to each, then reads
# their replies, so that one wait for the relay covers them all (less CPU a message than one
# session alone: BENCHMARKS.md)
IN_STEP = 2

Meanwhile = Callable[[], object]


@dataclass(frozen=True)
class Steps(Generic[G, P, R, W]):
    """What sending a group means. `attempt(transport, group, composed, following, meanwhile)`
    sends `composed`; `following` is what this transport sends next (composed ahead, or None),
    `meanwhile` work for the wait on the server's reply (run at most once). `stops(result)`
    is why that result stops the chunk (a relay-wide failure), or None."""

    compose: Callable[[G], P]
    attempt: Callable[[Transport, G, P, P | None, Meanwhile], R]
    stops: Callable[[R], W | None]


@dataclass(frozen=True)
class Sessions:
    """The process's lanes for `relay` (any hashable key): `count` sessions, opened by `open`
    on first use and kept as long as the process."""

    count: int
    relay: Hashable
    open: Callable[[], Transport]


@dataclass
class Ending(Generic[G, R, W]):
    """How a chunk's sending ended: the groups not begun (after a relay-wide failure, or from
    `begin_by` on), the results of messages sent but not handed on when it was closed early
    (they went out: they must be recorded), and why it stopped (relay-wide failures, in the
    order they came; none: time ran out, or every group was tried)."""

    untried: list[G] = field(default_factory=list)
    unhanded: list[R] = field(default_factory=list)
    stops: list[W] = field(default_factory=list)


def send(
    groups: list[G], steps: Steps[G, P, R, W], begin_by: float, over: Transport | Sessions
) -> Sending[G, P, R, W]:
    """The groups, sent `over` a transport from this thread, or over the process's lanes; no
    group begins from `begin_by` (on the monotonic clock) on."""
    return Sending(groups, steps, begin_by, over)


class Sending(Generic[G, P, R, W]):
    """Iterate for each attempted group and its result, as they come; `close` (also after an
    early end) for the Ending. Closed early, it starts nothing more and waits for the lanes
    still sending, whose results it keeps in the Ending."""

    def __init__(
        self,
        groups: list[G],
        steps: Steps[G, P, R, W],
        begin_by: float,
        over: Transport | Sessions,
    ) -> None:
        self.steps = steps
        self._begin_by = begin_by
        self._halted = False
        self.ending: Ending[G, R, W] = Ending()
        self._results = self._run(groups, over)

    def __iter__(self) -> Iterator[tuple[G, R]]:
        return self._results

    def close(self) -> Ending[G, R, W]:
        self._results.close()
        return self.ending

    def over(self) -> bool:
        """A relay-wide failure, the consumer gone, or out of time."""
        return bool(self.ending.stops) or self._halted or time.monotonic() >= self._begin_by

    def attempt(
        self, session: Transport, group: G, composed: P, following: P | None, then: Meanwhile
    ) -> R | None:
        if self.over():
            return None
        result = self.steps.attempt(session, group, composed, following, then)
        why = self.steps.stops(result)
        if why is not None:
            self.ending.stops.append(why)
        return result

    def _run(self, groups: list[G], over: Transport | Sessions) -> Generator[tuple[G, R]]:
        if not isinstance(over, Sessions):
            yield from self._in_step(groups, [over])
            return
        # a chunk has its lanes to itself (chunks at once in a threaded worker take different
        # ones, or wait for one), so a process keeps `over.count` sessions, no more
        with _pool(over.count).lease(-(-len(groups) // IN_STEP)) as lanes:
            if len(lanes) == 1:  # sent from this thread
                yield from self._in_step(groups, lanes[0].sessions(over))
            else:
                yield from self._across(groups, lanes, over)

    def _across(
        self, groups: list[G], lanes: list[_Lane], over: Sessions
    ) -> Generator[tuple[G, R]]:
        """Several lanes, each sending from a thread of its own. At most one step per lane in
        flight: if the consumer stalls (recording waits for the database), little more is
        sent before it is back."""
        slots = [i for i, lane in enumerate(lanes) for _ in range(lane.size)]
        runs = [
            self._in_step(
                [g for n, g in enumerate(groups) if slots[n % len(slots)] == i],
                lane.sessions(over),
            )
            for i, lane in enumerate(lanes)
        ]
        ahead = {lane.thread.submit(next, runs[i], None): i for i, lane in enumerate(lanes)}
        try:
            while ahead:
                done, _ = wait(ahead, return_when=FIRST_COMPLETED)
                for future in done:
                    i = ahead.pop(future)
                    result = future.result()
                    if result is not None:
                        yield result
                        ahead[lanes[i].thread.submit(next, runs[i], None)] = i
        finally:
            # ended early (the consumer failed, or a lane did): the lanes go back idle, and
            # what they were sending, or had sent and not yet handed on, is kept to be recorded
            self._halted = True
            for future in ahead:
                try:
                    result = future.result()
                except Exception:
                    log.exception("a sending lane failed")
                    continue
                if result is not None:
                    self.ending.unhanded.append(result[1])
            for run in runs:
                run.close()  # idle now: its step's results not handed on go to the Ending

    def _in_step(self, groups: list[G], sessions: Sequence[Transport]) -> Generator[tuple[G, R]]:
        """The groups over a lane's sessions, in step: each step writes one message to each
        session, and reads their replies only then (the last written first), so that one wait
        for the relay covers them all. Closed early, it keeps the results of its step not yet
        handed on in the Ending (those messages went out: they must be recorded)."""
        step = _Step(self, groups, sessions)
        for first in range(0, len(groups), step.width):
            pending = step.run(range(first, min(first + step.width, len(groups))))
            try:
                while pending:
                    group, result = pending.pop(0)
                    if result is None:
                        self.ending.untried.append(group)
                    else:
                        yield group, result
            finally:
                self.ending.unhanded += [r for _, r in pending if r is not None]
            if step.failed:
                raise step.failed[0]


class _Step(Generic[G, P, R, W]):
    """A lane's steps, one at a time. Each session's next message is composed before its
    current one is sent, so that its envelope can go out behind it (`following`), and the
    step after next while the server takes the step's last message (`meanwhile`); once
    the sending is over, nothing more is composed."""

    def __init__(
        self, sending: Sending[G, P, R, W], groups: list[G], sessions: Sequence[Transport]
    ) -> None:
        self.sending = sending
        self.groups = groups
        self.sessions = sessions
        self.width = max(1, min(len(sessions), len(groups)))
        self.composed: dict[int, P] = {}
        self.failed: list[Exception] = []  # raised once the step's results are handed on

    def run(self, step: range) -> list[tuple[G, R | None]]:
        """The step's groups and their results (None: not tried), in the order sent."""
        results: dict[int, R | None] = {}
        self.send(step.start, step, results)
        for index in step:
            self.composed.pop(index, None)
        return [(self.groups[index], results[index]) for index in step if index in results]

    def compose(self, index: int) -> P | None:
        if index >= len(self.groups):
            return None
        found = self.composed.get(index)
        if found is None:
            if self.sending.over():
                return None
            found = self.composed[index] = self.sending.steps.compose(self.groups[index])
        return found

    def send(self, index: int, step: range, results: dict[int, R | None]) -> None:
        """Send the step's group `index` and, once its message is out, the ones after it:
        their replies are read in the reverse order."""
        if index >= step.stop:  # the step's last message is out: compose the step after next
            for ahead in range(step.start + 2 * self.width, step.start + 3 * self.width):
                self.compose(ahead)
            return
        if index in results or self.failed:
            return
        then = functools.partial(self.send, index + 1, step, results)
        current = self.compose(index)
        if current is None:  # over: the group goes back untried
            results[index] = None
        else:
            try:
                results[index] = self.sending.attempt(
                    self.sessions[index - step.start],
                    self.groups[index],
                    current,
                    self.compose(index + self.width),
                    then,
                )
            except Exception as exc:
                self.failed.append(exc)
                return
        then()  # the transaction ended before its "." (so the wait never came), or was over


class _Lane:
    """A sending thread and the sessions it drives in step. Both live as long as the process;
    the chunk that leases the lane has them to itself."""

    def __init__(self, number: int, size: int) -> None:
        self.thread = ThreadPoolExecutor(1, thread_name_prefix=f"smtp-{number}")
        self.size = size
        self._sessions: dict[Hashable, list[Transport]] = {}

    def sessions(self, over: Sessions) -> list[Transport]:
        if over.relay not in self._sessions:
            self._sessions[over.relay] = [over.open() for _ in range(self.size)]
        return self._sessions[over.relay]


class _Lanes:
    """This process's lanes: `sessions` sessions, IN_STEP to a lane."""

    def __init__(self, sessions: int) -> None:
        count = -(-sessions // IN_STEP)
        self.free: queue.SimpleQueue[_Lane] = queue.SimpleQueue()
        for n in range(count):
            self.free.put(_Lane(n, sessions // count + (n < sessions % count)))

    @contextmanager
    def lease(self, wanted: int) -> Iterator[list[_Lane]]:
        """Up to `wanted` lanes no other chunk is using (waiting for the first one)."""
        taken = [self.free.get()]
        while len(taken) < wanted:
            try:
                taken.append(self.free.get_nowait())
            except queue.Empty:
                break
        try:
            yield taken
        finally:
            for lane in taken:
                self.free.put(lane)


_pools: dict[int, _Lanes] = {}
_pools_lock = threading.Lock()


def _pool(sessions: int) -> _Lanes:
    with _pools_lock:
        if sessions not in _pools:
            _pools[sessions] = _Lanes(sessions)
        return _pools[sessions]

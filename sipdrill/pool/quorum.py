"""Enterprise pool quorum (Lync Server 2013), sans-IO.

A Lync 2013 Enterprise pool keeps working only while enough of its Front
Ends are up; below that the remaining servers stop their services and the
whole pool is down ("pool quorum loss"; REFERENCE.md, "Enterprise pool
quorum"). The figures, by pool size: 2 -> 1; 3-4 -> any 2; 5-6 -> any 3;
7 -> any 4; 8-9 -> any 4 of the first 7; 10-12 -> any 5 of the first 9.

:func:`quorum_rule` and :func:`has_quorum` are those figures as pure
functions. :class:`FrontEndQuorum` is one front end's view of its pool: the
adapter tells it which siblings answered and when (``heard``), and asks it
(``on_timer``) whether the pool's state changed; it answers with frozen
events along a declarative transition table, and never reads a clock.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from sipdrill.errors import SipdrillError
from sipdrill.topology import MAX_ENTERPRISE_FRONT_ENDS

MAX_FRONT_ENDS = MAX_ENTERPRISE_FRONT_ENDS


@dataclass(frozen=True)
class QuorumRule:
    """``need`` front ends up among the first ``among`` of a pool of ``size``."""

    size: int
    need: int
    among: int

    def describe(self) -> str:
        if self.among == self.size:
            return f"any {self.need} of {self.size}"
        return f"any {self.need} of the first {self.among} of {self.size}"


# (largest pool size the row covers, need, among: None = every front end)
_TABLE: tuple[tuple[int, int, int | None], ...] = (
    (1, 1, None),  # a one-front-end pool is up while its server is
    (2, 1, None),  # the Back End acts as the tie-breaker of an even count
    (4, 2, None),
    (6, 3, None),
    (7, 4, None),
    (9, 4, 7),
    (12, 5, 9),
)


def quorum_rule(size: int) -> QuorumRule:
    """The quorum of a pool of ``size`` front ends (ValueError outside 1-12)."""
    if not 1 <= size <= MAX_FRONT_ENDS:
        raise ValueError(f"a pool has 1 to {MAX_FRONT_ENDS} front ends, not {size}")
    for largest, need, among in _TABLE:
        if size <= largest:
            return QuorumRule(size, need, size if among is None else among)
    raise AssertionError("unreachable: the table ends at MAX_FRONT_ENDS")


def has_quorum(size: int, up: Iterable[int]) -> bool:
    """Whether a pool of ``size`` front ends works with the ones at positions
    ``up`` (0-based, topology order) running."""
    rule = quorum_rule(size)
    counted = {i for i in up if 0 <= i < rule.among}
    return len(counted) >= rule.need


# --- one front end's view of its pool ----------------------------------------------------


class PoolQuorumState(enum.Enum):
    SERVING = "serving"  # quorum: this front end runs its SIP service
    STOPPED = "stopped"  # quorum lost: the pool is down, SIP stopped


class QuorumTrigger(enum.Enum):
    LOST = "lost"
    REGAINED = "regained"


TRANSITIONS: dict[tuple[PoolQuorumState, QuorumTrigger], PoolQuorumState] = {
    (PoolQuorumState.SERVING, QuorumTrigger.LOST): PoolQuorumState.STOPPED,
    (PoolQuorumState.STOPPED, QuorumTrigger.REGAINED): PoolQuorumState.SERVING,
}


class IllegalQuorumTransition(SipdrillError):
    def __init__(self, state: PoolQuorumState, trigger: QuorumTrigger) -> None:
        super().__init__(f"no transition from {state.value} on {trigger.value}")
        self.state = state
        self.trigger = trigger


@dataclass(frozen=True)
class QuorumLost:
    """Fewer front ends than the quorum are up: stop the SIP service."""

    at: float
    up: tuple[int, ...]
    rule: QuorumRule


@dataclass(frozen=True)
class QuorumRegained:
    """Enough front ends are up again: start the SIP service."""

    at: float
    up: tuple[int, ...]
    rule: QuorumRule


QuorumEvent = QuorumLost | QuorumRegained


class FrontEndQuorum:
    """Front end ``me`` of a pool of ``size``: a sibling counts as up while it
    answered within ``down_after`` seconds. A sibling never heard from yet is
    presumed to be starting (the lab starts front ends one after another, on
    a loaded machine seconds apart), and counts as up: quorum is lost only
    to front ends that were up and went silent. (Lync also wants three
    front ends at a pool's first start; the lab does not model that.)"""

    def __init__(self, size: int, me: int, *, down_after: float, now: float) -> None:
        if not 0 <= me < size:
            raise ValueError(f"front end {me} is not in a pool of {size}")
        if down_after <= 0:
            raise ValueError("down_after must be positive")
        self.rule = quorum_rule(size)
        self.size = size
        self.me = me
        self.down_after = down_after
        self.state = PoolQuorumState.SERVING
        self.started = now
        #: When each sibling last answered; None: not yet (still starting).
        self._last: dict[int, float | None] = {i: None for i in range(size)}

    def heard(self, index: int, now: float) -> None:
        """Sibling ``index`` answered at ``now``."""
        if 0 <= index < self.size:
            last = self._last[index]
            if last is None or now > last:
                self._last[index] = now

    def up(self, now: float) -> tuple[int, ...]:
        """The front ends counted as up at ``now`` (this one always is: it is running)."""
        return tuple(i for i in range(self.size) if i == self.me or self._counts_up(i, now))

    def _counts_up(self, i: int, now: float) -> bool:
        last = self._last[i]
        return last is None or now - last < self.down_after

    def on_timer(self, now: float) -> list[QuorumEvent]:
        up = self.up(now)
        quorate = has_quorum(self.size, up)
        if self.state is PoolQuorumState.SERVING and not quorate:
            self._move(QuorumTrigger.LOST)
            return [QuorumLost(now, up, self.rule)]
        if self.state is PoolQuorumState.STOPPED and quorate:
            self._move(QuorumTrigger.REGAINED)
            return [QuorumRegained(now, up, self.rule)]
        return []

    def next_deadline(self) -> float | None:
        """When a sibling heard from would next be counted down."""
        pending = [
            t + self.down_after for i, t in self._last.items() if i != self.me and t is not None
        ]
        return min(pending) if pending else None

    def _move(self, trigger: QuorumTrigger) -> None:
        new = TRANSITIONS.get((self.state, trigger))
        if new is None:
            raise IllegalQuorumTransition(self.state, trigger)
        self.state = new

    def status(self, now: float) -> dict[str, object]:
        return {
            "state": self.state.value,
            "front_ends": self.size,
            "up": list(self.up(now)),
            "rule": self.rule.describe(),
            "quorum": has_quorum(self.size, self.up(now)),
        }

"""Pool failover states and the backup registrar's view of its partner pool.

Both are declarative transition tables over Enum states, in the manner of
h11's ``_state.py``: a pair (state, event) absent from the table is illegal,
raises :class:`TransitionError`, and changes nothing.

Everything here is sans-IO: no sockets, no sleeping, no reading the clock. The
caller passes ``now`` (any monotonic seconds, e.g. ``loop.time()``), asks
:meth:`PartnerMonitor.next_deadline` when to call back, and calls
:meth:`PartnerMonitor.on_timer` then.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Generic, TypeVar

from sipdrill.errors import OperationError

if TYPE_CHECKING:
    from sipdrill.topology import Topology

S = TypeVar("S", bound=Enum)
E = TypeVar("E", bound=Enum)


@dataclass
class TransitionError(OperationError):
    """An event that is illegal in the current state; nothing was changed."""

    state: Enum | None = None
    event: Enum | None = None


class TransitionTable(Generic[S, E]):
    """``(state, event) -> next state``; anything not listed is illegal."""

    def __init__(self, name: str, transitions: Mapping[tuple[S, E], S]) -> None:
        self.name = name
        self._table = dict(transitions)

    def next_state(self, state: S, event: E) -> S:
        try:
            return self._table[(state, event)]
        except KeyError:
            allowed = sorted(e.value for e in self.allowed_events(state))
            raise TransitionError(
                "invalid-transition",
                f"{self.name}: {event.value} is not possible in state {state.value} "
                f"(possible: {', '.join(allowed) or 'nothing'})",
                409,
                state=state,
                event=event,
            ) from None

    def allowed_events(self, state: S) -> frozenset[E]:
        return frozenset(e for (s, e) in self._table if s is state)

    def __contains__(self, pair: object) -> bool:
        return pair in self._table


# --- pool failover (Invoke-CsPoolFailOver / Invoke-CsPoolFailBack) ----------


class FailoverState(Enum):
    """The state of one (home pool -> backup pool) relationship.

    The four states Lync reports (docs/reference.md), plus FailingBack: failback
    takes up to an hour for 20,000 users, and during it a second failback or
    a new failover must be refused, which needs a state of its own.
    """

    ACTIVE = "Active"
    FAILING_OVER = "FailingOver"
    FAILED_OVER = "FailedOver"
    FAILING_BACK = "FailingBack"
    FAILED_BACK = "FailedBack"


class FailoverEvent(Enum):
    FAILOVER_STARTED = "failover-started"
    FAILOVER_COMPLETED = "failover-completed"
    FAILBACK_STARTED = "failback-started"
    FAILBACK_COMPLETED = "failback-completed"


FAILOVER_TRANSITIONS: TransitionTable[FailoverState, FailoverEvent] = TransitionTable(
    "pool failover",
    {
        (FailoverState.ACTIVE, FailoverEvent.FAILOVER_STARTED): FailoverState.FAILING_OVER,
        (FailoverState.FAILED_BACK, FailoverEvent.FAILOVER_STARTED): FailoverState.FAILING_OVER,
        # The documented remedy for a cmdlet that dies half-way is to run it
        # again, so starting the step already in progress is legal.
        (FailoverState.FAILING_OVER, FailoverEvent.FAILOVER_STARTED): FailoverState.FAILING_OVER,
        (FailoverState.FAILING_OVER, FailoverEvent.FAILOVER_COMPLETED): FailoverState.FAILED_OVER,
        (FailoverState.FAILED_OVER, FailoverEvent.FAILBACK_STARTED): FailoverState.FAILING_BACK,
        (FailoverState.FAILING_BACK, FailoverEvent.FAILBACK_STARTED): FailoverState.FAILING_BACK,
        (FailoverState.FAILING_BACK, FailoverEvent.FAILBACK_COMPLETED): FailoverState.FAILED_BACK,
    },
)

#: States in which the users of the home pool are (being) served by the backup.
SERVED_BY_BACKUP = frozenset(
    {FailoverState.FAILING_OVER, FailoverState.FAILED_OVER, FailoverState.FAILING_BACK}
)


def serving_pool(state: FailoverState, home_pool: str, backup_pool: str) -> str:
    """The pool that holds the users' live data in ``state``."""
    return backup_pool if state in SERVED_BY_BACKUP else home_pool


class PoolFailoverStates:
    """The failover state of every (home pool -> backup pool) relationship,
    and the rule that spans two of them: while P1's users are failed over to
    P2, P2's users cannot be failed over to P1 until P1 has been failed back.

    ``pairs`` maps each pool to its backup pool; pairing is symmetric, so
    listing one direction is enough. Pool FQDNs are compared lower-case.
    """

    def __init__(self, pairs: Mapping[str, str]) -> None:
        self._backup: dict[str, str] = {}
        for a, b in pairs.items():
            a, b = a.lower(), b.lower()
            if a == b:
                raise ValueError(f"pool {a} cannot be its own backup")
            for x, y in ((a, b), (b, a)):
                if self._backup.setdefault(x, y) != y:
                    raise ValueError(f"pool {x} is paired with both {self._backup[x]} and {y}")
        self._state = {pool: FailoverState.ACTIVE for pool in self._backup}

    @classmethod
    def from_topology(cls, topology: Topology) -> PoolFailoverStates:
        return cls({a.fqdn: b.fqdn for a, b in topology.pairs()})

    def backup_of(self, home_pool: str) -> str:
        home = home_pool.lower()
        if home not in self._backup:
            raise OperationError(
                "no-backup-pool",
                f"pool {home} has no paired backup pool, so it cannot fail over or back",
                409,
            )
        return self._backup[home]

    def state(self, home_pool: str) -> FailoverState:
        """The state of ``home_pool``'s users; unpaired pools are Active."""
        return self._state.get(home_pool.lower(), FailoverState.ACTIVE)

    def serving_pool(self, home_pool: str) -> str:
        home = home_pool.lower()
        if home not in self._backup:
            return home
        return serving_pool(self._state[home], home, self._backup[home])

    def snapshot(self) -> dict[str, FailoverState]:
        return dict(self._state)

    def restore(self, states: Mapping[str, FailoverState]) -> None:
        """Take back a :meth:`snapshot` (a pool process that restarts in the
        middle of a failover must not forget it). Pools this object does not
        pair are refused and nothing changes."""
        wanted = {pool.lower(): state for pool, state in states.items()}
        unknown = sorted(set(wanted) - set(self._state))
        if unknown:
            raise ValueError(f"not paired here: {', '.join(unknown)}")
        self._state.update(wanted)

    def handle(self, home_pool: str, event: FailoverEvent) -> FailoverState:
        """Apply ``event`` to the relationship of ``home_pool`` (the pool
        that homes the users, the PoolFqdn of both cmdlets); the new state."""
        home = home_pool.lower()
        backup = self.backup_of(home)
        current = self._state[home]
        new = FAILOVER_TRANSITIONS.next_state(current, event)
        if (
            event is FailoverEvent.FAILOVER_STARTED
            and current is not FailoverState.FAILING_OVER
            and self._state[backup] in SERVED_BY_BACKUP
        ):
            raise OperationError(
                "failover-order",
                f"the users of {backup} are failed over to {home} "
                f"({self._state[backup].value}); fail back {backup} before "
                f"failing over {home}",
                409,
            )
        self._state[home] = new
        return new

    def failover_started(self, home_pool: str) -> FailoverState:
        return self.handle(home_pool, FailoverEvent.FAILOVER_STARTED)

    def failover_completed(self, home_pool: str) -> FailoverState:
        return self.handle(home_pool, FailoverEvent.FAILOVER_COMPLETED)

    def failback_started(self, home_pool: str) -> FailoverState:
        return self.handle(home_pool, FailoverEvent.FAILBACK_STARTED)

    def failback_completed(self, home_pool: str) -> FailoverState:
        return self.handle(home_pool, FailoverEvent.FAILBACK_COMPLETED)


# --- the backup registrar's view of its partner ------------------------------


class PartnerState(Enum):
    #: Heartbeats arrive: redirect the partner's users home.
    UP = "up"
    #: No heartbeat for the failover detection interval: accept the
    #: partner's users in resiliency mode.
    DOWN = "down"
    #: Heartbeats again, but not yet for the failback interval: keep
    #: accepting in resiliency mode.
    RETURNING = "returning"


class PartnerTrigger(Enum):
    HEARTBEAT = "heartbeat"
    DETECTION_TIMEOUT = "detection-timeout"
    FAILBACK_ELAPSED = "failback-elapsed"


PARTNER_TRANSITIONS: TransitionTable[PartnerState, PartnerTrigger] = TransitionTable(
    "partner monitor",
    {
        (PartnerState.UP, PartnerTrigger.HEARTBEAT): PartnerState.UP,
        (PartnerState.UP, PartnerTrigger.DETECTION_TIMEOUT): PartnerState.DOWN,
        (PartnerState.DOWN, PartnerTrigger.HEARTBEAT): PartnerState.RETURNING,
        (PartnerState.RETURNING, PartnerTrigger.HEARTBEAT): PartnerState.RETURNING,
        (PartnerState.RETURNING, PartnerTrigger.FAILBACK_ELAPSED): PartnerState.UP,
        # The partner flapped: it is not back until it has been back for the
        # whole failback interval, so the clock starts again at its next return.
        (PartnerState.RETURNING, PartnerTrigger.DETECTION_TIMEOUT): PartnerState.DOWN,
    },
)


@dataclass(frozen=True)
class PartnerDown:
    """No heartbeat since ``last_heartbeat``: accept the partner's users in
    resiliency mode from ``at`` on."""

    partner: str
    at: float
    last_heartbeat: float


@dataclass(frozen=True)
class PartnerReturning:
    """The first heartbeat after the partner was declared down."""

    partner: str
    at: float


@dataclass(frozen=True)
class PartnerUp:
    """The partner has been back for the failback interval: redirect its
    users home from ``at`` on."""

    partner: str
    at: float
    returned_at: float


@dataclass(frozen=True)
class PartnerReturnAborted:
    """The partner went silent again before the failback interval was over."""

    partner: str
    at: float
    last_heartbeat: float


PartnerEvent = PartnerDown | PartnerReturning | PartnerUp | PartnerReturnAborted


class PartnerMonitor:
    """Heartbeats from the partner pool in, :data:`PartnerEvent` s out.

    Deadlines fire when ``now >= deadline``: a partner whose last heartbeat
    is exactly ``failover_detection_interval`` old is down, and one that has
    been back for exactly ``failback_interval`` is up. When both deadlines of
    the Returning state fall at the same instant, detection wins: the partner
    was silent for the full detection interval, so it is not back.

    The monitor starts Up with a heartbeat at ``now``: a registrar that has
    just started gives its partner one detection interval before taking over
    its users, rather than taking them over at boot.
    """

    def __init__(
        self,
        partner: str,
        *,
        failover_detection_interval: float,
        failback_interval: float,
        now: float,
    ) -> None:
        if failover_detection_interval <= 0 or failback_interval <= 0:
            raise ValueError("the failover detection and failback intervals must be positive")
        self.partner = partner.lower()
        self.failover_detection_interval = failover_detection_interval
        self.failback_interval = failback_interval
        self._state = PartnerState.UP
        self._last_heartbeat = now
        self._returned_at: float | None = None
        self._now = now

    @property
    def state(self) -> PartnerState:
        return self._state

    @property
    def last_heartbeat(self) -> float:
        return self._last_heartbeat

    @property
    def accepts_partner_users(self) -> bool:
        """Whether this registrar takes the partner's users (resiliency mode)."""
        return self._state is not PartnerState.UP

    def _advance(self, now: float) -> None:
        if now < self._now:
            raise ValueError(f"time went backwards: {now} < {self._now}")
        self._now = now

    def _deadlines(self) -> tuple[float | None, float | None]:
        """(detection deadline, failback deadline) in the current state."""
        detection = self._last_heartbeat + self.failover_detection_interval
        if self._state is PartnerState.UP:
            return detection, None
        if self._state is PartnerState.RETURNING:
            assert self._returned_at is not None
            return detection, self._returned_at + self.failback_interval
        return None, None

    def next_deadline(self) -> float | None:
        """When to call :meth:`on_timer` next; ``None``: only a heartbeat
        can change anything."""
        present = [d for d in self._deadlines() if d is not None]
        return min(present) if present else None

    def on_timer(self, now: float) -> list[PartnerEvent]:
        """Fire every deadline at or before ``now``, in time order (a late
        call still reports the timeline as it happened)."""
        self._advance(now)
        events: list[PartnerEvent] = []
        while True:
            detection, failback = self._deadlines()
            if (
                detection is not None
                and detection <= now
                and (failback is None or detection <= failback)
            ):
                previous = self._state
                self._state = PARTNER_TRANSITIONS.next_state(
                    previous, PartnerTrigger.DETECTION_TIMEOUT
                )
                self._returned_at = None
                if previous is PartnerState.UP:
                    events.append(PartnerDown(self.partner, detection, self._last_heartbeat))
                else:
                    events.append(
                        PartnerReturnAborted(self.partner, detection, self._last_heartbeat)
                    )
            elif failback is not None and failback <= now:
                self._state = PARTNER_TRANSITIONS.next_state(
                    self._state, PartnerTrigger.FAILBACK_ELAPSED
                )
                assert self._returned_at is not None
                events.append(PartnerUp(self.partner, failback, self._returned_at))
                self._returned_at = None
            else:
                return events

    def on_heartbeat(self, now: float) -> list[PartnerEvent]:
        """A heartbeat from the partner arrived at ``now``. Deadlines that
        passed before it fire first, so a heartbeat that arrives late still
        counts the partner as down in between."""
        events = self.on_timer(now)
        previous = self._state
        self._state = PARTNER_TRANSITIONS.next_state(previous, PartnerTrigger.HEARTBEAT)
        self._last_heartbeat = now
        if previous is PartnerState.DOWN:
            self._returned_at = now
            events.append(PartnerReturning(self.partner, now))
        return events

"""RFC 5626 client keep-alives (CRLF ping / pong) and the flow recovery backoff, sans-IO.

The keep-alive is a table-driven state machine like the transactions: the
caller passes ``now``, sends the bytes of :class:`SendPing`, reports pongs
from the framer, and calls :meth:`KeepAlive.handle_timer` at
:meth:`KeepAlive.next_deadline`. Randomness comes from an injected
``random.Random`` so tests can pin every interval.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from sipdrill.errors import SipError

__all__ = [
    "PING",
    "Backoff",
    "FlowFailed",
    "KeepAlive",
    "KeepAliveConfig",
    "KeepAliveEvent",
    "KeepAliveInput",
    "KeepAliveState",
    "KeepAliveStateError",
    "PongReceived",
    "SendPing",
    "backoff_window",
    "recovery_delay",
]

PING: Final = b"\r\n\r\n"


@dataclass(frozen=True)
class KeepAliveConfig:
    """RFC 5626 4.4.1 defaults."""

    pong_timeout: float = 10.0
    # Without a Flow-Timer from the registrar the interval is drawn from
    # this range instead of from a fraction of the Flow-Timer.
    default_interval: tuple[float, float] = (95.0, 120.0)
    flow_timer_fraction: tuple[float, float] = (0.8, 1.0)


@dataclass
class KeepAliveStateError(SipError):
    """An input the keep-alive table does not allow now (local misuse); nothing changed."""

    status_code: int = 500


@dataclass(frozen=True)
class SendPing:
    """Write ``data`` (CRLFCRLF) on the flow."""

    data: bytes = PING


@dataclass(frozen=True)
class PongReceived:
    """The pong came back; ``rtt`` is how long it took."""

    rtt: float


@dataclass(frozen=True)
class FlowFailed:
    """No pong within the pong timeout: treat the flow as failed (RFC 5626 4.4.1)."""

    reason: str


KeepAliveEvent = SendPing | PongReceived | FlowFailed


class KeepAliveState(enum.Enum):
    IDLE = "idle"
    WAITING = "waiting to ping"
    AWAITING_PONG = "awaiting pong"
    FAILED = "failed"


class KeepAliveInput(enum.Enum):
    START = "start"
    PING_DUE = "ping due"
    PONG = "pong"
    PONG_TIMEOUT = "pong timeout"
    STOP = "stop"


_S = KeepAliveState
_I = KeepAliveInput

_TABLE: Mapping[tuple[KeepAliveState, KeepAliveInput], KeepAliveState] = {
    (_S.IDLE, _I.START): _S.WAITING,
    (_S.IDLE, _I.STOP): _S.IDLE,
    (_S.IDLE, _I.PONG): _S.IDLE,
    (_S.WAITING, _I.PING_DUE): _S.AWAITING_PONG,
    # A pong nobody asked for (a late one, or the peer's CRLF before a
    # message) proves nothing and moves nothing.
    (_S.WAITING, _I.PONG): _S.WAITING,
    (_S.WAITING, _I.STOP): _S.IDLE,
    (_S.AWAITING_PONG, _I.PONG): _S.WAITING,
    (_S.AWAITING_PONG, _I.PONG_TIMEOUT): _S.FAILED,
    (_S.AWAITING_PONG, _I.STOP): _S.IDLE,
    (_S.FAILED, _I.PONG): _S.FAILED,
    (_S.FAILED, _I.STOP): _S.IDLE,
    # A new flow after a failure starts over.
    (_S.FAILED, _I.START): _S.WAITING,
}


class KeepAlive:
    """The client side of one flow's keep-alives."""

    def __init__(
        self,
        rng: random.Random,
        config: KeepAliveConfig = KeepAliveConfig(),
        flow_timer: float | None = None,
    ) -> None:
        self._rng = rng
        self.config = config
        self.flow_timer = flow_timer
        self.state = KeepAliveState.IDLE
        self._deadline: float | None = None
        self._ping_sent_at: float | None = None

    def _transition(self, inp: KeepAliveInput) -> None:
        new = _TABLE.get((self.state, inp))
        if new is None:
            raise KeepAliveStateError(
                reason=f"keep-alive: {inp.value} not allowed in {self.state.value}"
            )
        self.state = new

    def interval(self) -> float:
        """Draw the time to the next ping (RFC 5626 4.4.1)."""
        if self.flow_timer is None:
            low, high = self.config.default_interval
            return self._rng.uniform(low, high)
        low, high = self.config.flow_timer_fraction
        return self._rng.uniform(low, high) * self.flow_timer

    def next_deadline(self) -> float | None:
        return self._deadline

    def start(self, now: float) -> list[KeepAliveEvent]:
        self._transition(KeepAliveInput.START)
        self._deadline = now + self.interval()
        return []

    def stop(self) -> None:
        self._transition(KeepAliveInput.STOP)
        self._deadline = None
        self._ping_sent_at = None

    def set_flow_timer(self, flow_timer: float | None, now: float) -> None:
        """The registrar's Flow-Timer (None: it sent none). The next ping is redrawn
        from now while waiting; a ping in flight keeps its pong deadline."""
        self.flow_timer = flow_timer
        if self.state is KeepAliveState.WAITING:
            self._deadline = now + self.interval()

    def pong_received(self, now: float) -> list[KeepAliveEvent]:
        before = self.state
        self._transition(KeepAliveInput.PONG)
        if before is not KeepAliveState.AWAITING_PONG or self._ping_sent_at is None:
            return []
        rtt = now - self._ping_sent_at
        self._ping_sent_at = None
        self._deadline = now + self.interval()
        return [PongReceived(rtt)]

    def handle_timer(self, now: float) -> list[KeepAliveEvent]:
        if self._deadline is None or now < self._deadline:
            return []
        if self.state is KeepAliveState.WAITING:
            self._transition(KeepAliveInput.PING_DUE)
            self._ping_sent_at = now
            self._deadline = now + self.config.pong_timeout
            return [SendPing()]
        self._transition(KeepAliveInput.PONG_TIMEOUT)
        self._deadline = None
        return [FlowFailed(f"no pong within {self.config.pong_timeout:g} s")]


def backoff_window(
    failures: int,
    *,
    all_failed: bool,
    base_time_all_failed: float = 30.0,
    base_time_ok: float = 90.0,
    max_time: float = 1800.0,
) -> float:
    """RFC 5626 4.5: W = min(max_time, base_time * 2**failures).

    ``failures`` counts consecutive failures including the one just seen,
    so the first wait after a failure lies in [base, 2*base].
    """
    base = base_time_all_failed if all_failed else base_time_ok
    # Cap the exponent so a long outage cannot overflow a float.
    return min(max_time, base * (1 << min(max(failures, 0), 64)))


def recovery_delay(
    failures: int,
    rng: random.Random,
    *,
    all_failed: bool,
    base_time_all_failed: float = 30.0,
    base_time_ok: float = 90.0,
    max_time: float = 1800.0,
) -> float:
    """How long to wait before trying to recover a flow: uniform in [W/2, W]."""
    window = backoff_window(
        failures,
        all_failed=all_failed,
        base_time_all_failed=base_time_all_failed,
        base_time_ok=base_time_ok,
        max_time=max_time,
    )
    return rng.uniform(window / 2, window)


class Backoff:
    """Counts consecutive registration failures and draws the RFC 5626 4.5 waits.

    Random draws spread a 10,000-client reconnect storm over the window
    instead of synchronising it; the RNG is injected so tests can pin them.
    """

    def __init__(
        self,
        rng: random.Random,
        *,
        base_time_all_failed: float = 30.0,
        base_time_ok: float = 90.0,
        max_time: float = 1800.0,
    ) -> None:
        self._rng = rng
        self.base_time_all_failed = base_time_all_failed
        self.base_time_ok = base_time_ok
        self.max_time = max_time
        self.failures = 0

    def failure(self, *, all_failed: bool) -> float:
        """Record one more failure and return the delay before the next attempt."""
        self.failures += 1
        return recovery_delay(
            self.failures,
            self._rng,
            all_failed=all_failed,
            base_time_all_failed=self.base_time_all_failed,
            base_time_ok=self.base_time_ok,
            max_time=self.max_time,
        )

    def success(self) -> None:
        self.failures = 0

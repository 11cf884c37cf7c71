"""The backup registrar's view of its partner pool: OPTIONS heartbeats to it
every few seconds (and the ones it sends here) feed the sans-IO
:class:`~sipdrill.pool.state.PartnerMonitor`, whose events (partner down,
back, back for the failback interval) this pool acts on.

Heartbeats are real SIP over TLS between the pools, so a network cut stops
them as it would stop a Lync pool's.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import Protocol

from sipmessage import URI

from sipdrill.pool.sip_context import SipContext, Timer, new_request
from sipdrill.pool.sip_endpoint import RequestFailed
from sipdrill.pool.state import (
    PartnerDown,
    PartnerEvent,
    PartnerMonitor,
    PartnerReturnAborted,
    PartnerReturning,
    PartnerUp,
)
from sipdrill.sip.transport import Flow

log = logging.getLogger("sipdrill.pool")


class PartnerListener(Protocol):
    """Who acts on the partner's state."""

    def partner_changed(self) -> None:
        """Any partner event (soon: this pool's view of many users changes)."""

    def partner_down(self, pool: str) -> None:
        """No heartbeat for the failover detection interval."""

    def partner_up(self, pool: str) -> None:
        """Back for the failback interval: its users go home."""


class PartnerHeartbeat:
    """Heartbeats with ``monitor.partner`` every ``interval`` seconds, each
    given up after ``timeout``; a :class:`~sipdrill.sip.transport.TimerCore`
    for the monitor's deadlines (:meth:`start` arms it)."""

    def __init__(
        self, ctx: SipContext, monitor: PartnerMonitor, listener: PartnerListener,
        *, interval: float, timeout: float,
    ) -> None:
        self.ctx = ctx
        self.monitor = monitor
        self.listener = listener
        self.partner = monitor.partner
        self.interval = interval
        self.timeout = timeout
        self.heartbeats = {"sent": 0, "answered": 0, "failed": 0, "received": 0}
        self.last_event: dict[str, object] | None = None
        self._call_id = f"heartbeat-{secrets.token_hex(6)}@{ctx.fqdn}"
        self._tag = secrets.token_hex(4)
        self._cseq = 0
        self._timer: Timer | None = None

    def start(self) -> None:
        self._timer = self.ctx.timer(self)
        self._timer.poke()

    def next_deadline(self) -> float | None:
        return self.monitor.next_deadline()

    def handle_timer(self, now: float) -> object:
        self._events(self.monitor.on_timer(now))
        return None

    async def run(self) -> None:
        """Send heartbeats until cancelled."""
        metrics = self.ctx.metrics.heartbeats
        failures = 0
        while True:
            started = self.ctx.now()
            flow: Flow | None = None
            try:
                async with asyncio.timeout(self.timeout):
                    flow = await self.ctx.pool_flow(self.partner)
                self.heartbeats["sent"] += 1
                metrics.labels("sent").inc()
                self._cseq += 1
                request = new_request(
                    self.ctx, "OPTIONS", URI.parse(self.ctx.pool_sip_uri(self.partner)), flow,
                    from_=f"<sip:{self.ctx.fqdn}>;tag={self._tag}", to=f"<sip:{self.partner}>",
                    call_id=self._call_id, cseq=self._cseq,
                )
                response = await self.ctx.send(request, flow, give_up_after=self.timeout)
                if not 200 <= response.code < 300:
                    raise RequestFailed("status", str(response.code))
                failures = 0
                self.heartbeats["answered"] += 1
                metrics.labels("answered").inc()
                self._heard(self.ctx.now())
            except (RequestFailed, TimeoutError) as exc:
                failures += 1
                self.heartbeats["failed"] += 1
                metrics.labels("failed").inc()
                log.debug("heartbeat to %s failed: %s", self.partner, exc)
                # A half-dead connection (the peer stopped, the path cut)
                # would swallow every later heartbeat: start afresh. Not at
                # the first miss, though: on a loaded host a reconnect (a TLS
                # handshake) costs more than waiting for one late answer.
                if flow is not None and failures >= 2:
                    self.ctx.close_flow(flow)
            await asyncio.sleep(max(0.0, started + self.interval - self.ctx.now()))

    def received(self) -> None:
        """The partner's own heartbeat (an OPTIONS from it) arrived."""
        self.heartbeats["received"] += 1
        self.ctx.metrics.heartbeats.labels("received").inc()
        self._heard(self.ctx.now())

    def _heard(self, now: float) -> None:
        self._events(self.monitor.on_heartbeat(now))
        if self._timer is not None:
            self._timer.poke()

    def _events(self, events: list[PartnerEvent]) -> None:
        if events:
            self.listener.partner_changed()
        for ev in events:
            self.last_event = {"event": type(ev).__name__, "at": self.ctx.wall()}
            if isinstance(ev, PartnerDown):
                log.warning(
                    "partner pool %s down: no heartbeat for %.1fs; taking its users in "
                    "resiliency mode",
                    ev.partner, ev.at - ev.last_heartbeat,
                )
                self.listener.partner_down(ev.partner)
            elif isinstance(ev, PartnerReturning):
                log.info("partner pool %s is back; its users stay here until it has been "
                         "back for the failback interval", ev.partner)
            elif isinstance(ev, PartnerUp):
                log.info("partner pool %s back for the failback interval: sending its "
                         "users home", ev.partner)
                self.listener.partner_up(ev.partner)
            elif isinstance(ev, PartnerReturnAborted):
                log.warning("partner pool %s went silent again before the failback interval",
                            ev.partner)

    def status(self, now: float) -> dict[str, object]:
        monitor = self.monitor
        return {
            "pool": monitor.partner,
            "state": monitor.state.value,
            "accepts_partner_users": monitor.accepts_partner_users,
            "last_heartbeat_age": round(now - monitor.last_heartbeat, 3),
            "heartbeat_interval": self.interval,
            "failover_detection_interval": monitor.failover_detection_interval,
            "failback_interval": monitor.failback_interval,
            "heartbeats": dict(self.heartbeats),
            "last_event": self.last_event,
        }

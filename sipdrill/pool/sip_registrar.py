"""The pool's registrar side: REGISTER, bindings and their flows, 301
redirects, the service mode of every registered user, and sending users to
register again when their mode or pool changes (:meth:`RegistrarSide.reevaluate`).

Over the generic registrar (:class:`sipdrill.sip.registrar.Registrar`), whose
policy here is :func:`~sipdrill.pool.policy.registrar_decision` (through
:meth:`SipContext.decide`): a user this pool serves binds and gets its mode
in ``X-Sipdrill-Mode``; any other is redirected (301) or refused, and the
decision comes back in the registrar's result.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import secrets
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from sipmessage import Request, Response

from sipdrill.pool.policy import Feature, Redirect, Serve, ServiceMode, check_feature
from sipdrill.pool.sip_context import (
    MODE_HEADER,
    SENDER_MODE_HEADER,
    SipContext,
    Timer,
    from_pool,
    new_request,
    refuse,
)
from sipdrill.pool.sip_endpoint import RequestFailed
from sipdrill.sip.message import make_response
from sipdrill.sip.registrar import (
    Accept,
    Binding,
    BindingAdded,
    BindingExpired,
    BindingRefreshed,
    BindingRemoved,
    Decision,
    Registrar,
    RegistrarEvent,
    Reject,
    aor_of,
)
from sipdrill.sip.registrar import Redirect as SipRedirect
from sipdrill.sip.transport import Flow

log = logging.getLogger("sipdrill.pool")

#: The NOTIFY event that asks a client to send a REGISTER refresh now.
NUDGE_EVENT = "x-sipdrill-reregister"


@dataclass(frozen=True)
class Served(Accept):
    """The policy's answer for a user this pool serves: bind, in ``mode``."""

    mode: ServiceMode


class RegistrationWatcher(Protocol):
    """Who hears what the registrar side changed (the presence hub, the
    conference focus)."""

    def mode_changed(self, aor: str) -> None:
        """``aor``'s service mode here changed (it registered, or came back
        in another mode)."""

    def signed_out(self, aor: str) -> None:
        """``aor`` has no binding here any more."""

    def flow_closed(self, flow: Flow) -> None: ...

    def decisions_changed(self) -> None:
        """A failover event or a partner change: any user's decision may differ."""


@dataclass
class Reregistration:
    """Users this pool made register again (failover or failback event), and
    how long each took to come back here in its new mode."""

    reason: str
    started_at: float  # loop time
    started_wall: float
    users: set[str]
    done: dict[str, float] = field(default_factory=dict)
    logged: bool = False

    @property
    def complete(self) -> bool:
        return len(self.done) >= len(self.users)

    def summary(self, now: float) -> dict[str, object]:
        times = sorted(self.done.values())

        def pct(p: float) -> float | None:
            if not times:
                return None
            return round(times[min(len(times) - 1, int(p * len(times)))], 3)

        return {
            "reason": self.reason,
            "started_at": self.started_wall,
            "users": len(self.users),
            "reregistered": len(self.done),
            "complete": self.complete,
            "elapsed": round(now - self.started_at, 3),
            "p50": round(statistics.median(times), 3) if times else None,
            "p95": pct(0.95),
            "max": round(times[-1], 3) if times else None,
        }


class RegistrarSide:
    """The registrations of one pool; a :class:`~sipdrill.sip.transport.TimerCore`
    for binding expiry (:meth:`start` arms it)."""

    def __init__(
        self, ctx: SipContext, registrar: Registrar, watcher: RegistrationWatcher
    ) -> None:
        self.ctx = ctx
        self.registrar = registrar
        self.watcher = watcher
        #: The service mode of every registered AoR (absent: not registered).
        self.modes: dict[str, ServiceMode] = {}
        self._flow_bindings: dict[Flow, set[tuple[str, str]]] = {}
        #: Users asked to register again: (deadline for a REGISTER, reason).
        self._nudged: dict[str, tuple[float, str]] = {}
        self._nudge_queue: collections.deque[tuple[str, str]] = collections.deque()
        self._nudge_task: asyncio.Task[None] | None = None
        #: Nudged users whose REGISTER has not come yet (the pacing window).
        self._nudge_inflight: set[str] = set()
        self.reregistration: Reregistration | None = None
        self._expiry: Timer | None = None

    def start(self) -> None:
        self._expiry = self.ctx.timer(self)

    # -- what is registered -----------------------------------------------------------
    def registered(self, aor: str) -> list[Binding]:
        return self.registrar.lookup(aor, self.ctx.now())

    def counts(self) -> dict[str, int]:
        out = {"full": 0, "resiliency": 0}
        for mode in self.modes.values():
            out[mode.value] += 1
        return out

    def sender_mode(self, request: Request, flow: Flow, sender: str) -> ServiceMode | None:
        """The mode ``sender`` is served in: as the pool that relayed the
        request on ``flow`` says, else as registered here, else as this pool
        would."""
        if from_pool(self.ctx, flow) is not None:
            text = request.headers.get(SENDER_MODE_HEADER)
            try:
                return ServiceMode(text) if text else None
            except ValueError:
                return None
        mode = self.modes.get(sender)
        if mode is not None:
            return mode
        decision = self.ctx.decide(sender)
        return decision.mode if isinstance(decision, Serve) else None

    def check_sender(
        self, request: Request, flow: Flow, feature: Feature
    ) -> tuple[str, Response | None]:
        """The sender's AoR, and the answer refusing them ``feature`` (403
        when this pool does not serve them), or None."""
        sender = aor_of(request.from_address.uri)
        mode = self.sender_mode(request, flow, sender)
        if mode is None:
            return sender, make_response(request, 403, "Forbidden: register with this pool first")
        refusal = check_feature(feature, mode)
        return sender, None if refusal is None else refuse(self.ctx, request, refusal)

    def policy(self, aor: str, request: Request) -> Decision:
        """The registrar's policy: the pool's decision in SIP terms."""
        decision = self.ctx.decide(aor)
        if isinstance(decision, Serve):
            return Served(decision.mode)
        if isinstance(decision, Redirect):
            return SipRedirect(
                tuple((self.ctx.pool_sip_uri(t.pool), t.q) for t in decision.targets),
                decision.status_code,
            )
        return Reject(decision.status_code, decision.reason)

    # -- REGISTER -------------------------------------------------------------------------
    def register(self, request: Request, flow: Flow) -> Response:
        now = self.ctx.now()
        result = self.registrar.handle(request, now, flow, policy=self.policy)
        if result.aor is not None:
            self._nudged.pop(result.aor, None)
            self._nudge_inflight.discard(result.aor)
        metrics = self.ctx.metrics.register_requests
        self._apply(result.events)
        code = result.status
        if isinstance(result.decision, SipRedirect):
            self.ctx.metrics.redirects.inc()
        if code == 200 and isinstance(result.decision, Served) and result.aor:
            aor, mode = result.aor, result.decision.mode
            result.response.headers.add(MODE_HEADER, mode.value)
            previous = self.modes.get(aor)
            if self.registrar.lookup(aor):
                self.modes[aor] = mode
                self._came_back(aor, now)
            if previous is not self.modes.get(aor):
                self.watcher.mode_changed(aor)
            metrics.labels("ok").inc()
        elif 300 <= code < 400:
            metrics.labels("redirect").inc()
            if result.aor and self.registrar.lookup(result.aor):
                # A registered user sent elsewhere (the answer to a nudge or a
                # refresh): its bindings here are over. The flow stays open
                # so the 301 reaches the client, which leaves it.
                for b in self.registrar.lookup(result.aor):
                    self.unbind(b)
        elif code >= 400:
            metrics.labels("refused" if code < 500 else "error").inc()
        else:
            metrics.labels("ok").inc()
        if self._expiry is not None:
            self._expiry.poke()
        return result.response

    def _came_back(self, aor: str, now: float) -> None:
        rr = self.reregistration
        if rr is None or aor not in rr.users or aor in rr.done:
            return
        took = now - rr.started_at
        rr.done[aor] = took
        self.ctx.metrics.reregister_seconds.observe(took)
        if rr.complete and not rr.logged:
            rr.logged = True
            s = rr.summary(now)
            log.info(
                "all %d users registered again after %s: p50 %.2fs p95 %.2fs max %.2fs",
                s["users"], rr.reason, s["p50"], s["p95"], s["max"],
            )

    def _apply(self, events: Iterable[RegistrarEvent]) -> None:
        touched: set[str] = set()
        for ev in events:
            b = ev.binding
            if isinstance(ev, BindingAdded):
                self._index(b)
            elif isinstance(ev, BindingRefreshed):
                if ev.previous.source != b.source:
                    self._unindex(ev.previous)
                    self._index(b)
            elif isinstance(ev, BindingRemoved | BindingExpired):
                self._unindex(b)
            touched.add(b.aor)
        for aor in touched:
            if not self.registrar.lookup(aor) and aor in self.modes:
                del self.modes[aor]
                self.watcher.signed_out(aor)

    def _index(self, b: Binding) -> None:
        if isinstance(b.source, Flow) and b.source.reliable:
            self._flow_bindings.setdefault(b.source, set()).add((b.aor, b.key))

    def _unindex(self, b: Binding) -> None:
        if isinstance(b.source, Flow):
            keys = self._flow_bindings.get(b.source)
            if keys is not None:
                keys.discard((b.aor, b.key))
                if not keys:
                    del self._flow_bindings[b.source]

    def next_deadline(self) -> float | None:
        return self.registrar.next_deadline()

    def handle_timer(self, now: float) -> object:
        self._apply(self.registrar.expire(now))
        return None

    def unbind(self, binding: Binding) -> None:
        """Remove one binding as if its UA had unregistered (no policy asked):
        the same events as an Expires 0 REGISTER, without building and
        answering one (a failback's rush closes thousands of flows at once)."""
        removed = self.registrar.remove(binding.aor, binding.key)
        if removed is not None:
            self._apply([removed])

    def unbind_aor(self, aor: str) -> set[Flow]:
        flows: set[Flow] = set()
        for b in self.registrar.lookup(aor):
            if isinstance(b.source, Flow):
                flows.add(b.source)
            self.unbind(b)
        return flows

    def flow_closed(self, flow: Flow) -> None:
        # RFC 5626: a registration is reachable only through its flow; once
        # the flow is gone, so is the binding (and the user's presence).
        keys = self._flow_bindings.pop(flow, set())
        for aor, key in keys:
            for b in self.registrar.lookup(aor):
                if b.key == key and b.source == flow:
                    self.unbind(b)
        self.watcher.flow_closed(flow)

    def close_flows(self, flows: Iterable[Flow], reason: str) -> int:
        n = 0
        for flow in flows:
            if flow.reliable:
                self.ctx.close_flow(flow)
                self.ctx.metrics.flows_closed.labels(reason).inc()
                n += 1
        return n

    # -- registering again ----------------------------------------------------------------
    def reevaluate(self, reason: str) -> dict[str, object]:
        """After a pool failover event or a partner change: every registered
        user whose mode or pool changed must register again, to learn its
        new mode (200 with the new ``X-Sipdrill-Mode``) or its pool (301).

        First a nudge: a NOTIFY with ``Event: x-sipdrill-reregister`` on the
        flow, which the lab's clients answer with an immediate REGISTER
        refresh. A client that has not registered again after
        ``nudge_grace`` seconds (or that the NOTIFY cannot reach) loses its
        binding and its flow: every SIP client treats that as a flow failure
        and signs in again, after its RFC 5626 backoff. Users expected back
        here are timed (:class:`Reregistration`, ``/status``, a histogram).
        """
        now = self.ctx.now()
        back_here: set[str] = set()
        moved_away: list[str] = []
        for aor, mode in list(self.modes.items()):
            decision = self.ctx.decide(aor)
            if isinstance(decision, Serve):
                if decision.mode is not mode:
                    back_here.add(aor)
            else:
                moved_away.append(aor)
        affected = [*back_here, *moved_away]
        if back_here:
            self.reregistration = Reregistration(reason, now, self.ctx.wall(), back_here)
        grace = self.ctx.settings.nudge_grace
        closed = 0
        if grace > 0:
            for aor in affected:
                # No deadline until the nudge is sent: they go out paced.
                self._nudged[aor] = (float("inf"), reason)
                self._nudge_queue.append((aor, reason))
            if affected and self._nudge_task is None:
                self._nudge_task = self.ctx.spawn(self._nudge_pacer(), name="nudges")
        else:
            closed = self.force_reregister(affected, reason)
        self.watcher.decisions_changed()
        summary: dict[str, object] = {
            "reason": reason,
            "mode_changed": len(back_here),
            "redirected": len(moved_away),
            "nudged": len(affected) if grace > 0 else 0,
            "flows_closed": closed,
        }
        if affected:
            log.info(
                "%s: %d users change mode here, %d go to another pool; %s",
                reason, len(back_here), len(moved_away),
                f"nudged (flows closed after {grace:g}s without a REGISTER)" if grace > 0
                else f"{closed} flows closed",
            )
        return summary

    def force_reregister(self, aors: Iterable[str], reason: str) -> int:
        """Unbind ``aors`` and close their flows; the number of flows closed."""
        flows: set[Flow] = set()
        for aor in aors:
            self._nudged.pop(aor, None)
            self._nudge_inflight.discard(aor)
            flows |= self.unbind_aor(aor)
        return self.close_flows(flows, reason.split(" ", 1)[0])

    async def _nudge_pacer(self) -> None:
        """Send queued nudges at most ``nudge_rate`` per second and with at
        most ``nudge_window`` users nudged but not yet registered again: ten
        thousand NOTIFYs (and the REGISTERs they bring back) at once would
        stall both ends, and a grace period would run out in the queue."""
        settings = self.ctx.settings
        tick = 0.05
        per_tick = max(1, int(settings.nudge_rate * tick))
        try:
            while self._nudge_queue:
                room = settings.nudge_window - len(self._nudge_inflight)
                for _ in range(min(per_tick, room, len(self._nudge_queue))):
                    aor, reason = self._nudge_queue.popleft()
                    if aor in self._nudged:  # not registered again meanwhile
                        self._nudge(aor, reason)
                await asyncio.sleep(tick)
        finally:
            self._nudge_task = None

    def _nudge(self, aor: str, reason: str) -> None:
        settings = self.ctx.settings
        now = self.ctx.now()
        sent = False
        for b in self.registrar.lookup(aor):
            if isinstance(b.source, Flow) and self.ctx.is_open(b.source):
                self.ctx.spawn(self._send_nudge(b, b.source, reason), name="nudge")
                sent = True
        if sent:
            self._nudged[aor] = (now + settings.nudge_grace + settings.forward_timeout, reason)
            self._nudge_inflight.add(aor)
        else:
            self.force_reregister([aor], reason)

    async def _send_nudge(self, b: Binding, flow: Flow, reason: str) -> None:
        fqdn = self.ctx.fqdn
        req = new_request(
            self.ctx, "NOTIFY", b.contact.uri, flow,
            from_=f"<sip:{fqdn}>;tag={secrets.token_hex(4)}", to=f"<{b.aor}>",
            call_id=f"nudge-{secrets.token_hex(8)}@{fqdn}", cseq=1,
            headers=[("Event", NUDGE_EVENT), ("Subscription-State", "terminated;reason=" +
                      reason.split(" ", 1)[0])],
        )
        try:
            response = await self.ctx.send(req, flow)
        except RequestFailed as exc:
            log.info("nudge to %s failed (%s): closing its flow", b.aor, exc)
            self.force_reregister([b.aor], reason)
            return
        if b.aor not in self._nudged:
            return
        if response.code >= 300:
            self.force_reregister([b.aor], reason)
        else:
            # The client is there and heard us: its REGISTER is due within
            # the grace period from now.
            self._nudged[b.aor] = (self.ctx.now() + self.ctx.settings.nudge_grace, reason)

    def nudges_due(self, now: float) -> None:
        """Users nudged whose grace period is over lose their bindings and flows."""
        due = [aor for aor, (deadline, _) in self._nudged.items() if deadline <= now]
        by_reason: dict[str, list[str]] = {}
        for aor in due:
            by_reason.setdefault(self._nudged[aor][1], []).append(aor)
        for reason, aors in by_reason.items():
            n = self.force_reregister(aors, reason)
            log.info("%s: %d users did not register again when nudged; %d flows closed",
                     reason, len(aors), n)


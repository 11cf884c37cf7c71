"""The asyncio adapter: thousands of sans-IO endpoints, one connection each.

:class:`ClientRunner` gives each endpoint a flow of its own: a
:class:`~sipdrill.clients.flow.StreamFlow` (one TLS connection, verified
against the lab CA, or TCP), or for UDP a flow of one shared
:class:`~sipdrill.sip.transport.SipTransport`. It owns one
:class:`~sipdrill.clients.resolver.Resolver` (the lab DNS server, a shared TTL
cache) and one timer heap for every endpoint's deadlines. It turns the
endpoints' actions into I/O and the I/O back into inputs, and hands every
event to the :class:`~sipdrill.clients.metrics.EventLog` and the metrics.

Failure containment: an endpoint's bad luck (a refused connection, a
malformed answer, a redirect to a host that does not exist) is its own
state machine's business; if the endpoint itself raises, the runner records
an :class:`~sipdrill.clients.events.EndpointFault`, closes its flow,
replaces it with a fresh one and signs that one in after a pause. Nothing an
endpoint does stops the process.

Ramp-up: :meth:`ClientRunner.start` signs endpoints in at ``ramp`` per
second, so 10,000 of them do not all connect in the same millisecond.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import functools
import gc
import heapq
import logging
import random
import ssl
import time
import traceback
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from sipmessage import Request, Response

from sipdrill.clients.dnscache import DnsAnswer, DnsStatus, TtlCache
from sipdrill.clients.endpoint import (
    ClientProfile,
    Close,
    Connect,
    Endpoint,
    Output,
    Ping,
    Resolve,
    Schedule,
    Send,
    Target,
    UserSpec,
)
from sipdrill.clients.events import ClientEvent, EndpointFault, Failure, Mode
from sipdrill.clients.flow import StreamFlow
from sipdrill.clients.metrics import ClientMetrics, EventLog
from sipdrill.clients.resolver import Resolver
from sipdrill.sip.transport import (
    Addr,
    Flow,
    Kind,
    Received,
    SipTransport,
    TransportError,
    TransportLimits,
)

__all__ = [
    "ClientRunner",
    "LoopClock",
    "RunnerConfig",
    "classify_connect_error",
]

log = logging.getLogger("sipdrill.clients.runner")

#: gen0 every 20,000 net allocations (a pause of a few ms), full collections rare.
GC_THRESHOLDS = (20_000, 20, 100)
#: Trim the C heap once no connect is in progress after at least this many.
TRIM_AFTER_CONNECTS = 1000


def trim_heap() -> bool:
    """Give free pages of the C heap back to the system (glibc's ``malloc_trim``).

    False where there is no glibc. Takes a few ms for a 300 MB heap."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim is False:
        return False
    _malloc_trim(0)
    return True


_malloc_trim: Any = None


class UdpFlow:
    """An endpoint's flow on the shared UDP socket, with a :class:`StreamFlow`'s
    owner-side surface (``open``, ``send``, ``ping``, ``close``, ``index``), so
    the runner treats every flow alike."""

    __slots__ = ("flow", "index", "transport")

    def __init__(self, transport: SipTransport, flow: Flow, index: int) -> None:
        self.transport = transport
        self.flow = flow
        self.index = index

    @property
    def open(self) -> bool:
        return self.transport.is_open(self.flow)

    def send(self, data: bytes) -> bool:
        return self.transport.send(self.flow, data)

    def ping(self) -> bool:
        return self.transport.ping(self.flow)

    def close(self) -> None:
        self.transport.close_flow(self.flow)


class LoopClock:
    """The event loop's clock for timers, the system clock for event timestamps."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def monotonic(self) -> float:
        return self._loop.time()

    def wall(self) -> float:
        return time.time()


@dataclass
class RunnerConfig:
    profile: ClientProfile
    users: Sequence[UserSpec]
    #: The lab DNS server(s): (host, port). Needed unless the profile has static targets.
    nameservers: Sequence[tuple[str, int]] = ()
    #: Verifies the pools' certificates (the lab CA); needed for TLS.
    ssl_context: ssl.SSLContext | None = None
    #: Source address for DNS queries and SIP flows (a 127.x address in the local runtime).
    bind: str | None = None
    #: Sign-ins per second at start (0: all at once).
    ramp: float = 100.0
    seed: int | None = None
    #: At most this many connects (TCP + TLS handshake) in progress; 0: no limit.
    #: One process plays thousands of clients on one core: without a bound, a
    #: storm of 10,000 simultaneous handshakes convoys in the simulator's own
    #: event loop until every one of them hits the 5 s connect timeout, a
    #: failure no real client (with a CPU of its own) would see.
    connect_concurrency: int = 256
    #: A connect gives its slot back after this many seconds even if it is still
    #: in progress (it goes on, with its own timeouts, outside the limit). The
    #: limit is for this process's CPU, and a connect still going after this is
    #: waiting on the network: a silent pool (a stopped process, a cut site)
    #: answers no SYN or ClientHello, and with slots held until the 5 s timeouts
    #: 256 slots let through 51 connects a second, so a simulated storm queued in
    #: the simulator instead of on the wire.
    connect_slot_hold: float = 1.0
    #: One DNS cache for all endpoints (a caching resolver), or one each.
    shared_dns_cache: bool = True
    dns_timeout: float = 2.0
    dns_lifetime: float = 5.0
    negative_ttl: float = 60.0
    #: Seconds before a faulty endpoint's replacement signs in (jittered).
    fault_pause: float = 30.0
    #: Raise the cyclic GC's thresholds while the runner is open (process-wide):
    #: with 10,000 endpoints the default ones spend most of a failover storm's
    #: CPU re-scanning a million long-lived objects. The CLI turns it on.
    tune_gc: bool = False
    transport_limits: TransportLimits | None = None


def classify_connect_error(exc: BaseException) -> Failure:
    cause = exc.__cause__ or exc
    if isinstance(cause, ssl.SSLError | ssl.CertificateError):
        return Failure.TLS
    if isinstance(cause, ConnectionRefusedError):
        return Failure.REFUSED
    if isinstance(cause, TimeoutError):
        return Failure.CONNECT_TIMEOUT
    if isinstance(cause, ConnectionError):
        return Failure.RESET
    text = str(exc).lower()
    if "certificate" in text or "ssl" in text:
        return Failure.TLS
    if "refused" in text:
        return Failure.REFUSED
    if "timeout" in text or "timed out" in text:
        return Failure.CONNECT_TIMEOUT
    return Failure.UNREACHABLE


@dataclass(slots=True)
class _Connect:
    """A stream connect in progress; ``hold`` is its slot-hold timer while it holds a slot."""

    index: int
    conn: int
    endpoint: Endpoint
    hold: asyncio.TimerHandle | None


class ClientRunner:
    """Runs ``config.users`` as endpoints. Use inside a running loop::

    runner = ClientRunner(config)
    await runner.open()
    runner.start()
    ...
    await runner.close()
    """

    def __init__(
        self,
        config: RunnerConfig,
        *,
        events: EventLog | None = None,
    ) -> None:
        self.config = config
        self.events = events if events is not None else EventLog()
        self.metrics = ClientMetrics(self._mode_counts)
        self.rng = random.Random(config.seed)
        self.endpoints: list[Endpoint] = []
        self.started_at: float | None = None
        self.running = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._clock: LoopClock | None = None
        self._transport: SipTransport | None = None
        self._resolver: Resolver | None = None
        self._cache: TtlCache | None = None
        # Per endpoint index: its current flow and the endpoint's id for it.
        self._flow: list[StreamFlow | UdpFlow | None] = []
        self._fconn: list[int] = []
        #: Stream flows' counters: received, parse_errors, framing_errors, tls_errors...
        self.stats: Counter[str] = Counter()
        # (mode, registrar pool, home pool) per endpoint, and how many share each.
        self._key: list[tuple[Mode, str, str]] = []
        self._tally: Counter[tuple[Mode, str, str]] = Counter()
        # counts() as last built, and the tally's version it was built from.
        self._tally_version = 0
        self._counts: tuple[int, dict[str, Any]] | None = None
        self._by_user: dict[str, int] = {}
        # Timer heap of (deadline, index); _deadline[index] says which entry is live.
        self._deadline: list[float | None] = []
        self._heap: list[tuple[float, int]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ramp_task: asyncio.Task[None] | None = None
        self._flusher: asyncio.Task[None] | None = None
        # Free connect slots (None: no limit), the connects waiting for one as
        # (index, conn, target, endpoint), and the stream connects in progress.
        self._slots: int | None = None
        self._slot_queue: collections.deque[tuple[int, int, Target, Endpoint]] = collections.deque()
        self._connects: dict[StreamFlow, _Connect] = {}
        self.faults = 0
        # Connects in progress, and connects since the heap was last trimmed.
        self._connecting = 0
        self._connects_since_trim = 0
        self.trims = 0
        self._gc_thresholds: tuple[int, int, int] | None = None
        # TLS resumption (see _open_stream): per server (name, port), its bit
        # and the last session it gave; per endpoint, the bits of the servers
        # it has had a session with.
        self._tls_servers: dict[tuple[str, int], int] = {}
        self._tls_sessions: dict[int, ssl.SSLSession] = {}
        self._tls_known: list[int] = []

    # ------------------------------------------------------------------ lifecycle

    @property
    def transport(self) -> SipTransport:
        if self._transport is None:
            raise RuntimeError("ClientRunner.open() has not been called")
        return self._transport

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._clock = LoopClock(loop)
        cfg = self.config
        # UDP only: stream flows are StreamFlows of their own.
        self._transport = SipTransport(self._on_message, limits=cfg.transport_limits)
        if cfg.bind and cfg.profile.transport is Kind.UDP:
            await self._transport.listen(Kind.UDP, cfg.bind, 0)
        self._cache = TtlCache(max_entries=10_000) if cfg.shared_dns_cache else None
        if cfg.nameservers:
            self._resolver = Resolver(
                cfg.nameservers,
                cache=self._cache,
                timeout=cfg.dns_timeout,
                lifetime=cfg.dns_lifetime,
                negative_ttl=cfg.negative_ttl,
                source=cfg.bind,
                clock=loop.time,
            )
        if cfg.connect_concurrency > 0:
            self._slots = cfg.connect_concurrency
        # Round-robin DNS as if each pool's clients asked in turn, from a
        # seeded start: every front end of a pool gets its share of clients,
        # and the same ones in every run of a seeded drill.
        turns: Counter[str] = Counter()
        first = cfg.seed or 0
        self.endpoints = []
        for u in cfg.users:
            self.endpoints.append(self._new_endpoint(u, first + turns[u.home_pool]))
            turns[u.home_pool] += 1
        n = len(self.endpoints)
        self._flow = [None] * n
        self._fconn = [0] * n
        self._deadline = [None] * n
        self._tls_known = [0] * n
        self._by_user = {u.user_part: i for i, u in enumerate(cfg.users)}
        self._key = [(Mode.SIGNED_OUT, "", u.home_pool or "") for u in cfg.users]
        self._tally = Counter(self._key)
        self._tally_version += 1
        self._flusher = loop.create_task(self._flush_events())
        if cfg.tune_gc and self._gc_thresholds is None:
            self._gc_thresholds = gc.get_threshold()
            gc.set_threshold(*GC_THRESHOLDS)

    def _new_endpoint(self, user: UserSpec, dns_turn: int | None = None) -> Endpoint:
        assert self._clock is not None
        return Endpoint(
            user, self.config.profile, self._clock, self.rng, cache=self._cache, dns_turn=dns_turn
        )

    def start(self) -> None:
        """Sign every signed-out endpoint in, at the configured ramp rate."""
        if self._loop is None:
            raise RuntimeError("ClientRunner.open() has not been called")
        if self._ramp_task is not None and not self._ramp_task.done():
            return
        self.running = True
        self.started_at = time.time()
        self._ramp_task = self._loop.create_task(self._ramp())

    async def stop(self) -> None:
        """Sign every endpoint out (REGISTER Expires 0 where registered); keep them."""
        self.running = False
        if self._ramp_task is not None:
            self._ramp_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ramp_task
            self._ramp_task = None
        for index, ep in enumerate(self.endpoints):
            if ep.mode is not Mode.SIGNED_OUT:
                self._call(index, Endpoint.sign_out)
        await asyncio.sleep(0)

    async def close(self) -> None:
        await self.stop()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._resolver is not None:
            await self._resolver.close()
        self._slot_queue.clear()
        connects, self._connects = self._connects, {}
        for flow, pending in connects.items():
            if pending.hold is not None:
                pending.hold.cancel()
            flow.cancel()
        self._connecting -= len(connects)
        streams = [f for f in self._flow if isinstance(f, StreamFlow)]
        self._flow = [None] * len(self._flow)
        self._fconn = [0] * len(self._fconn)
        for flow in streams:
            self._close(flow)
        if self._transport is not None:
            await self._transport.close()
        # A flow with unsent bytes closes once they are written.
        deadline = time.monotonic() + 2.0
        while not all(f.closed for f in streams) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)  # (no future per flow, on purpose)
        for flow in streams:
            flow.abort()
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        self.events.flush()
        if self._gc_thresholds is not None:
            gc.set_threshold(*self._gc_thresholds)
            self._gc_thresholds = None

    async def __aenter__(self) -> ClientRunner:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _ramp(self) -> None:
        assert self._loop is not None
        rate = self.config.ramp
        start = self._loop.time()
        for index in range(len(self.endpoints)):
            if rate > 0:
                delay = start + index / rate - self._loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                elif index % 64 == 0:
                    await asyncio.sleep(0)  # let I/O in between
            elif index % 64 == 0:
                await asyncio.sleep(0)
            if self.endpoints[index].mode is Mode.SIGNED_OUT:
                self._call(index, Endpoint.sign_in)

    async def _flush_events(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                self.events.flush()
            except (OSError, ValueError):
                log.exception("cannot write events")
            # After a burst of connects (sign-in, a failover storm) the C heap holds
            # the freed handshake temporaries of hundreds of concurrent handshakes
            # between long-lived allocations: give those pages back once it is over.
            if self._connecting == 0 and self._connects_since_trim >= TRIM_AFTER_CONNECTS:
                self._connects_since_trim = 0
                if trim_heap():
                    self.trims += 1

    # ------------------------------------------------------------------ counts

    def _mode_counts(self) -> list[tuple[str, str, int]]:
        counts: Counter[tuple[str, str]] = Counter()
        for (mode, pool, _home), n in self._tally.items():
            counts[(mode.value, pool)] += n
        return [(mode, pool, n) for (mode, pool), n in sorted(counts.items()) if n]

    def counts(self) -> dict[str, Any]:
        """Endpoints by mode, by registrar pool and mode, and by home pool and mode.

        Kept up to date as endpoints change, so asking is cheap even for 10,000;
        asking again before any endpoint changed returns the same dict (treat it
        as read-only): a drill polls this many times a second."""
        cached = self._counts
        if cached is not None and cached[0] == self._tally_version:
            return cached[1]
        counts = self._build_counts()
        self._counts = (self._tally_version, counts)
        return counts

    def _build_counts(self) -> dict[str, Any]:
        by_mode: Counter[str] = Counter()
        by_pool: dict[str, Counter[str]] = {}
        by_home: dict[str, Counter[str]] = {}
        for (mode, pool, home), n in self._tally.items():
            if not n:
                continue
            by_mode[mode.value] += n
            if pool:
                by_pool.setdefault(pool, Counter())[mode.value] += n
            by_home.setdefault(home, Counter())[mode.value] += n
        return {
            "total": len(self.endpoints),
            "by_mode": {m.value: by_mode.get(m.value, 0) for m in Mode},
            "by_pool": {p: dict(c) for p, c in sorted(by_pool.items())},
            "by_home_pool": {p: dict(c) for p, c in sorted(by_home.items())},
            # (home pool, serving pool, mode): what a drill waits on ("pool1's
            # users in resiliency mode on pool2") cannot be read from the margins.
            "by": [
                {"home_pool": home, "pool": pool or None, "mode": mode.value, "count": n}
                for (mode, pool, home), n in sorted(
                    self._tally.items(), key=lambda kv: (kv[0][2], kv[0][1], kv[0][0].value)
                )
                if n
            ],
        }

    def _recount(self, index: int) -> None:
        ep = self.endpoints[index]
        mode = ep.mode
        key = (mode, (ep.pool or "") if mode.registered else "", ep.user.home_pool or "")
        old = self._key[index]
        if key != old:
            self._key[index] = key
            self._tally[old] -= 1
            self._tally[key] += 1
            self._tally_version += 1

    # ------------------------------------------------------------------ driving endpoints

    def _call(self, index: int, fn: Callable[[Endpoint], list[Output]]) -> None:
        ep = self.endpoints[index]
        try:
            outputs = fn(ep)
        except Exception as exc:
            self._fault(index, exc)
            return
        self._apply(index, outputs)
        self._recount(index)

    def _fault(self, index: int, exc: Exception) -> None:
        log.exception("endpoint %s failed; replacing it", self.endpoints[index].user.uri)
        self.faults += 1
        old = self.endpoints[index]
        assert self._clock is not None
        self.events.append(
            EndpointFault(
                user=old.user.uri,
                wall=self._clock.wall(),
                monotonic=self._clock.monotonic(),
                pool=old.target.host if old.target else None,
                address=old.target.where if old.target else None,
                reason=type(exc).__name__,
                detail=str(exc)[:500],
            )
        )
        self._drop_flow(index)
        self._deadline[index] = None
        fresh = self._new_endpoint(old.user)
        self.endpoints[index] = fresh
        self._recount(index)
        if self.running and self._loop is not None:
            pause = self.config.fault_pause * self.rng.uniform(0.5, 1.0)
            self._loop.call_later(pause, self._resume, index, fresh)

    def _resume(self, index: int, ep: Endpoint) -> None:
        if self.running and self.endpoints[index] is ep and ep.mode is Mode.SIGNED_OUT:
            self._call(index, Endpoint.sign_in)

    def _apply(self, index: int, outputs: list[Output]) -> None:
        for out in outputs:
            if isinstance(out, ClientEvent):
                self._emit(out)
            elif isinstance(out, Send):
                self._send(index, out)
            elif isinstance(out, Schedule):
                self._schedule(index, out.at)
            elif isinstance(out, Ping):
                flow = self._current(index, out.conn)
                if flow is not None and not flow.ping():
                    self._lost(index, out.conn, "ping failed: the flow is closed")
            elif isinstance(out, Resolve):
                self._resolve(index, out)
            elif isinstance(out, Connect):
                self._begin_connect(index, out.conn, out.target)
            elif isinstance(out, Close) and self._fconn[index] == out.conn:
                self._drop_flow(index)

    def _emit(self, event: ClientEvent) -> None:
        try:
            self.events.append(event)
            self.metrics.observe(event)
        except Exception:
            log.exception("event sink failed")

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        assert self._loop is not None
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ timers

    def _schedule(self, index: int, at: float | None) -> None:
        self._deadline[index] = at
        if at is None:
            return
        heapq.heappush(self._heap, (at, index))
        if self._timer_at is None or at < self._timer_at:
            self._arm(at)

    def _arm(self, at: float) -> None:
        assert self._loop is not None
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = self._loop.call_at(at, self._tick)

    def _tick(self) -> None:
        assert self._loop is not None
        self._timer = None
        self._timer_at = None
        now = self._loop.time()
        heap = self._heap
        fired = 0
        while heap and heap[0][0] <= now and fired < 2000:
            at, index = heapq.heappop(heap)
            if self._deadline[index] != at:
                continue  # stale: the endpoint's deadline moved
            self._deadline[index] = None
            fired += 1
            self._call(index, Endpoint.handle_timer)
            if self._deadline[index] is None:
                # The endpoint announces only changes: make sure it is woken again.
                nxt = self.endpoints[index].next_deadline()
                if nxt is not None:
                    self._schedule(index, nxt)
        if heap:
            # Yield after a batch, so a burst of timers does not starve I/O.
            self._arm(heap[0][0] if fired < 2000 else now)

    # ------------------------------------------------------------------ flows

    def _current(self, index: int, conn: int) -> StreamFlow | UdpFlow | None:
        if self._fconn[index] != conn:
            return None
        return self._flow[index]

    def _close(self, flow: StreamFlow | UdpFlow) -> None:
        flow.index = -1  # no callbacks for a flow the endpoint has let go
        flow.close()

    def _drop_flow(self, index: int) -> None:
        flow = self._flow[index]
        self._flow[index] = None
        self._fconn[index] = 0
        if flow is not None:
            self._close(flow)

    def _lost(self, index: int, conn: int, detail: str) -> None:
        if self._fconn[index] == conn:
            self._drop_flow(index)
        self._call(index, lambda ep: ep.flow_closed(conn, Failure.RESET, detail))

    def _send(self, index: int, out: Send) -> None:
        flow = self._current(index, out.conn)
        if flow is None:
            return
        if not flow.send(out.data):
            self._lost(index, out.conn, "send failed: the flow is closed")

    def _resolve(self, index: int, query: Resolve) -> None:
        """Wait for the answer with a callback on the resolver's future (one per name)."""
        assert self._loop is not None
        ep = self.endpoints[index]
        queried = True
        if self._resolver is None:
            answer = DnsAnswer(query.qname, query.rtype, DnsStatus.ERROR, detail="no nameserver")
            done: asyncio.Future[DnsAnswer] = self._loop.create_future()
            done.set_result(answer)
        else:
            done, queried = self._resolver.lookup_queried(query.qname, query.rtype)
        done.add_done_callback(functools.partial(self._resolved, index, ep, query, queried))

    def _resolved(
        self,
        index: int,
        ep: Endpoint,
        query: Resolve,
        queried: bool,
        done: asyncio.Future[DnsAnswer],
    ) -> None:
        if done.cancelled() or self.endpoints[index] is not ep:
            return  # closing, or the endpoint was replaced
        exc = done.exception()
        answer = (
            DnsAnswer(query.qname, query.rtype, DnsStatus.ERROR, detail=str(exc))
            if exc is not None
            else done.result()
        )
        self._call(index, lambda e: e.dns_result(answer, queried=queried))

    def _begin_connect(self, index: int, conn: int, target: Target) -> None:
        if target.transport is Kind.UDP:
            self._spawn(self._connect_udp(index, conn, target))
            return
        if self._slots is None:
            self._open_stream(index, conn, target, slot=False)
        elif self._slots > 0:
            self._slots -= 1
            self._open_stream(index, conn, target, slot=True)
        else:
            self._slot_queue.append((index, conn, target, self.endpoints[index]))

    def _release_slot(self) -> None:
        """A slot is free: the next connect still wanted takes it (see RunnerConfig)."""
        assert self._slots is not None
        while self._slot_queue:
            index, conn, target, ep = self._slot_queue.popleft()
            if self.endpoints[index] is ep and ep.conn == conn:
                self._open_stream(index, conn, target, slot=True)
                return
        self._slots += 1

    def _slot_held_long_enough(self, flow: StreamFlow) -> None:
        pending = self._connects.get(flow)
        if pending is not None and pending.hold is not None:
            pending.hold = None
            self._release_slot()

    def _open_stream(self, index: int, conn: int, target: Target, *, slot: bool) -> None:
        """Connect a StreamFlow with callbacks: a storm makes ~5 connects per endpoint."""
        assert self._loop is not None and target.address is not None
        ep = self.endpoints[index]
        kind = target.transport
        tls = kind is Kind.TLS
        limits = self.transport.limits
        # A Lync client (SChannel) resumes its TLS session when it reconnects to
        # the server it had it with (its cache is keyed on the target name) and
        # does a full handshake with any other: a failover to the backup pool is
        # a full handshake, a reconnect to the same pool (or a failback) offers
        # the session that pool gave it. The decision is per endpoint (it offers
        # a session only to a server it has had one with); the session offered
        # is the last one that server gave any endpoint of this process. A
        # session per endpoint would cost ~5.4 KB each (CPython hands out a
        # decoded copy of it, the pool's certificate included: 54 MB for
        # 10,000); the server's work is the same either way (a ticket it
        # issued, decrypted and accepted, or refused for a full handshake).
        session = None
        if tls:
            bit = self._tls_servers.get((target.host, target.port), 0)
            if bit and self._tls_known[index] & bit:
                session = self._tls_sessions.get(bit)
        flow = StreamFlow(
            self,
            kind,
            ssl_context=self.config.ssl_context if tls else None,
            server_hostname=target.host if tls else None,
            limits=limits.message,
            max_write_buffer=limits.max_write_buffer,
            index=index,
            session=session,
        )
        hold = (
            self._loop.call_later(self.config.connect_slot_hold, self._slot_held_long_enough, flow)
            if slot
            else None
        )
        self._connects[flow] = _Connect(index, conn, ep, hold)
        self._connecting += 1
        self._connects_since_trim += 1
        flow.connect(
            self._loop,
            target.address,
            target.port,
            self._stream_connected,
            bind=self.config.bind,
            connect_timeout=limits.connect_timeout,
            handshake_timeout=limits.tls_handshake_timeout,
        )

    def _stream_connected(self, flow: StreamFlow, error: TransportError | None) -> None:
        pending = self._connects.pop(flow, None)
        if pending is None:  # closed meanwhile
            return
        self._connecting -= 1
        if pending.hold is not None:
            pending.hold.cancel()
            self._release_slot()
        if error is not None:
            self._connect_failed(pending.index, pending.conn, pending.endpoint, error)
            return
        if flow.kind is Kind.TLS:
            self._tls_handshake_done(pending.index, flow)
        self._adopt(pending.index, pending.conn, pending.endpoint, flow, flow.local)

    def _tls_handshake_done(self, index: int, flow: StreamFlow) -> None:
        """Count the handshake as resumed or full; keep the session for the next connect."""
        reused = flow.session_reused
        self.stats["tls_resumed" if reused else "tls_full"] += 1
        host = flow.server_hostname
        self.metrics.tls_handshake(host, reused)
        key = (host, flow.remote[1])
        bit = self._tls_servers.get(key)
        if bit is None:
            bit = self._tls_servers[key] = 1 << len(self._tls_servers)
        self._tls_known[index] |= bit
        if not reused:  # a new session (and ticket): the one to offer from now on
            session = flow.session
            if session is not None:
                self._tls_sessions[bit] = session

    def _connect_failed(self, index: int, conn: int, ep: Endpoint, exc: BaseException) -> None:
        failure = classify_connect_error(exc)
        detail = str(exc)[:300]
        _drop_traceback(exc)
        if self.endpoints[index] is ep:
            self._call(index, lambda e: e.connect_failed(conn, failure, detail))

    def _adopt(
        self, index: int, conn: int, ep: Endpoint, flow: StreamFlow | UdpFlow, local: Addr
    ) -> None:
        """A flow is open: it is the endpoint's, unless the endpoint has moved on."""
        if self.endpoints[index] is not ep or ep.conn != conn or not flow.open:
            if flow.open:
                self._close(flow)
            elif self.endpoints[index] is ep and ep.conn == conn:
                self._call(index, lambda e: e.connect_failed(conn, Failure.RESET, "closed at once"))
            return
        self._drop_flow(index)
        self._flow[index] = flow
        self._fconn[index] = conn
        self._call(index, lambda e: e.connected(conn, local))

    async def _connect_udp(self, index: int, conn: int, target: Target) -> None:
        assert target.address is not None
        ep = self.endpoints[index]
        self._connecting += 1
        try:
            flow = await self.transport.open_flow(Kind.UDP, target.address, target.port)
        except asyncio.CancelledError:
            raise
        except (TransportError, OSError, ValueError) as exc:
            self._connect_failed(index, conn, ep, exc)
            return
        finally:
            self._connecting -= 1
        bind = self.config.bind
        host = flow.local[0]
        if host in ("0.0.0.0", "::", ""):
            host = bind or ("127.0.0.1" if target.address.startswith("127.") else host)
        self._adopt(index, conn, ep, UdpFlow(self.transport, flow, index), (host, flow.local[1]))

    # ------------------------------------------------------------------ transport callbacks

    def _on_message(self, rx: Received) -> None:
        """A message on the UDP socket: many endpoints share it."""
        index = self._by_aor(rx.message)
        if index is None:
            return
        conn = self._fconn[index]
        if not conn:
            return
        message = rx.message
        self._call(index, lambda ep: ep.receive(conn, message))

    def _by_aor(self, message: Request | Response) -> int | None:
        """UDP: many endpoints share one socket; responses carry our From, requests our user."""
        try:
            if isinstance(message, Response):
                user = message.from_address.uri.user  # parsed once, with the message
            else:
                user = message.uri.user
        except (ValueError, KeyError):
            return None
        return self._by_user.get(user or "")

    # ------------------------------------------------------------------ StreamFlow callbacks

    def _owner(self, flow: StreamFlow) -> int | None:
        index = flow.index
        if 0 <= index < len(self._flow) and self._flow[index] is flow:
            return index
        return None

    def flow_message(self, flow: StreamFlow, message: Request | Response) -> None:
        index = self._owner(flow)
        if index is None:
            return
        conn = self._fconn[index]
        self._call(index, lambda ep: ep.receive(conn, message))

    def flow_pong(self, flow: StreamFlow) -> None:
        index = self._owner(flow)
        if index is not None:
            conn = self._fconn[index]
            self._call(index, lambda ep: ep.pong(conn))

    def flow_closed(self, flow: StreamFlow) -> None:
        index = self._owner(flow)
        if index is None:
            return
        conn = self._fconn[index]
        self._flow[index] = None
        self._fconn[index] = 0
        self._call(index, lambda ep: ep.flow_closed(conn, Failure.RESET, "closed by the peer"))


def _drop_traceback(exc: BaseException) -> None:
    """Break the cycles a failed connect leaves (exception -> traceback -> frames ->
    the future that holds the exception, in SipTransport.open_flow).

    Without this, every refused connection is garbage that only the cyclic
    GC frees (with its socket): in a failover storm of 10,000 endpoints that
    was most of the simulator's CPU.
    """
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if e.__traceback__ is not None:
            traceback.clear_frames(e.__traceback__)
            e.__traceback__ = None
        stack += [e.__cause__, e.__context__]

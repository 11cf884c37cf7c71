"""The Front End pool process: ``sipdrill serve pool``.

One :class:`PoolService` per front end of a pool, listening on that front
end's address (its loopback stand-in with ``--loopback``; ``--front-end``,
the first by default): SIP on TLS 5061 and
TCP/UDP 5060 (:mod:`.sip_side`), and the HTTP control API with Prometheus
``/metrics`` on ``pool.control_port`` (:mod:`.api`), both in one asyncio
loop. In-process (tests)::

    async with PoolService(topology, PoolSettings(pool=P1, state_dir=..., ca_dir=...,
                                                  loopback=True, token="t")) as pool:
        pool.control_url, pool.sip_address

State that must survive a restart lives in ``--state-dir``: the user store
(``store.db``, SQLite WAL, seeded from the topology for the users homed here;
a write is acknowledged only after its commit) and ``pool-state.json``
(:mod:`.state_file`: the failover state of every pairing as this pool saw it,
users moved by Move-CsUser, and clean-ups still owed to a pool that was
down). Registrations are not kept: clients register again after a restart,
as with Lync.

This module wires the process together and answers for its directory (where
a user is homed, what the registrar decides for them) and its users' data.
The rest is in parts beside it: :mod:`.settings`, :mod:`.cms_replica` (the
CMS replica), :mod:`.moves` (Move-CsUser), :mod:`.replication` (the Backup
Service's feed), :mod:`.failover_events` (pool failover and failback),
:mod:`.import_export` (Export/Import-CsUserData).

Enterprise pools with several front ends: every front end is such a
process, serving every user of the pool (Lync 2013's routing groups, three
replicas per user, simplified away) over the pool's one state directory,
its Back End: one SQLite store that every front end opens, the failover
state file and the CMS replica. Each front end asks its siblings' control
APIs whether they are up and keeps the pool's quorum (:mod:`.quorum`): below
it, it stops its SIP service (the pool is down, as Lync's "Local Pool
Manager has been disconnected from Pool Manager") and starts it again when
enough siblings are back. Only the first front end runs the scheduled
user-data export.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import logging
import ssl
import time
from typing import Any

import httpx
from fastapi import APIRouter, FastAPI

from sipdrill import addresses
from sipdrill.control.server import AppServer, bind_tcp
from sipdrill.errors import OperationError
from sipdrill.pool.api import create_pool_app
from sipdrill.pool.bulk_moves import BulkMoves
from sipdrill.pool.cms_replica import CmsReplica
from sipdrill.pool.conference import conference_uri
from sipdrill.pool.import_export import UserDataExports
from sipdrill.pool.metrics import PoolMetrics
from sipdrill.pool.moves import UserMoves
from sipdrill.pool.policy import (
    Feature,
    Redirect,
    RegistrarDecision,
    Serve,
    ServiceMode,
    backups_from_topology,
    check_feature,
    registrar_decision,
)
from sipdrill.pool.quorum import FrontEndQuorum, QuorumLost, QuorumRegained
from sipdrill.pool.settings import PoolSettings
from sipdrill.pool.sip_side import PoolSip
from sipdrill.pool.state import (
    FailoverState,
    PartnerMonitor,
    PartnerState,
    PoolFailoverStates,
)
from sipdrill.pool.state_file import PoolStateFile
from sipdrill.pool.store import UserStore
from sipdrill.sip.fdlimit import FD_HEADROOM, raise_fd_limit
from sipdrill.sip.tls import ServiceCert, client_context, ensure_server_cert, server_context
from sipdrill.topology import FrontEnd, Pool, Topology

__all__ = ["PoolService", "PoolSettings"]

log = logging.getLogger("sipdrill.pool")

STORE_FILE = "store.db"


class PoolService:
    """One pool process: its user store, state file, CMS replica, SIP side,
    user moves and control API."""

    def __init__(self, topology: Topology, settings: PoolSettings) -> None:
        self.topology = topology
        self.settings = settings
        try:
            self.pool: Pool = topology.pool(settings.pool)
        except KeyError:
            raise OperationError(
                "unknown-pool",
                f"pool {settings.pool!r} is not in topology {topology.name!r}; pools: "
                + ", ".join(p.fqdn for p in topology.pools),
                404,
            ) from None
        self.fqdn = self.pool.fqdn
        try:
            self.front_end: FrontEnd = addresses.front_end(topology, self.pool, settings.front_end)
        except KeyError:
            raise OperationError(
                "unknown-front-end",
                f"front end {settings.front_end!r} is not in pool {self.fqdn}; front ends: "
                + ", ".join(fe.fqdn for fe in self.pool.front_ends),
                404,
            ) from None
        #: This front end's place in the pool (0: the first).
        self.front_end_index = self.pool.front_ends.index(self.front_end)
        self.partner: str | None = self.pool.backup
        self.backups = backups_from_topology(topology)
        self.pool_names = frozenset(p.fqdn for p in topology.pools)
        self.address = addresses.host(topology, self.front_end.address, loopback=settings.loopback)
        token = settings.token.get_secret_value() if settings.token else None
        if token is None and not ipaddress.ip_address(self.address).is_loopback:
            raise OperationError(
                "no-token", f"the control API on {self.address} needs a token "
                "(SIPDRILL_CONTROL_TOKEN or --token)", 400,
            )
        self.token = token
        self._set_heartbeat(topology.timers.failover_detection_interval)
        self.metrics = PoolMetrics()
        self.failover = PoolFailoverStates.from_topology(topology)
        self.monitor: PartnerMonitor | None = None
        self._topo_home: dict[str, str] = {}
        self._topo_uri: dict[str, str] = {}
        for u in topology.all_users():
            self._topo_home[u.uri.lower()] = u.home_pool
            self._topo_uri[u.uri.lower()] = u.uri
        self.state_file = PoolStateFile(settings.state_dir, self.fqdn, self.failover)
        self.cms = CmsReplica(topology, self.fqdn, token=token, loopback=settings.loopback)
        self.user_moves = UserMoves(
            self, self.state_file, self.cms, token=token, loopback=settings.loopback,
            retry_interval=settings.pending_retry_interval,
        )
        self.bulk_moves = BulkMoves(self.user_moves)
        self.user_data_exports = UserDataExports(
            self, settings.state_dir, token=token, loopback=settings.loopback,
            interval=lambda: self.cms.timers().user_data_export_interval,
        )
        self.started_at = time.time()
        #: This front end's view of the pool's quorum (pools of several front ends).
        self.quorum: FrontEndQuorum | None = None
        self._quorum_task: asyncio.Task[None] | None = None
        self._state_mtime: int | None = None
        self._store: UserStore | None = None
        self.sip = PoolSip(self)
        self.server_ssl: ssl.SSLContext | None = None
        self.server_cert: ServiceCert | None = None
        self.client_ssl: ssl.SSLContext | None = None
        self.sip_addresses: list[tuple[str, tuple[str, int]]] = []
        self.control_address: tuple[str, int] | None = None
        self._control_server: AppServer | None = None
        #: The control API (FastAPI) once started: what the server serves, for in-process use.
        self.control_app: FastAPI | None = None

    def _set_heartbeat(self, detection: float) -> None:
        settings = self.settings
        self.heartbeat_interval = settings.heartbeat_interval or min(5.0, detection / 4)
        self.heartbeat_timeout = settings.heartbeat_timeout or min(
            detection / 2, max(2 * self.heartbeat_interval, 1.0)
        )

    @property
    def control_url(self) -> str:
        host, port = self.control_address or (self.address, self.pool.control_port)
        return f"http://{host}:{port}"

    @property
    def store(self) -> UserStore:
        if self._store is None:
            raise RuntimeError("the pool is not started")
        return self._store

    # -- directory and decisions ------------------------------------------------------------
    def home_of(self, aor: str) -> str | None:
        """The user's home pool: the CMS's user homing (Move-CsUser records
        it there, and every pool holds a replica), else a move this pool
        took part in, else the topology, else the store (a user only a move
        created)."""
        key = aor.lower()
        home = self.cms.home_of(key) or self.state_file.moves.get(key) or self.topology_home(key)
        if home is not None:
            return home
        if self._store is None:
            return None
        rec = self._store.get_user(self.store_uri(key))
        return rec.home_pool if rec else None

    def topology_home(self, aor: str) -> str | None:
        """The home pool the topology gives ``aor`` (before any move)."""
        return self._topo_home.get(aor.lower())

    def topology_users(self) -> list[str]:
        return list(self._topo_home)

    def store_uri(self, aor: str) -> str:
        """The URI as the store spells it (topology files may use capitals)."""
        return self._topo_uri.get(aor.lower(), aor)

    def reevaluate(self, reason: str) -> dict[str, object]:
        """Registered users whose mode or pool changed must register again."""
        return self.sip.registrations.reevaluate(reason)

    def decide(self, aor: str) -> RegistrarDecision:
        home = self.home_of(aor)
        monitor = self.monitor
        return registrar_decision(
            user_home=home,
            this_pool=self.fqdn,
            backups=self.backups,
            partner_state=monitor.state if monitor is not None else None,
            failover_state=self.failover.state(home) if home else FailoverState.ACTIVE,
        )

    def served_mode(self, aor: str) -> ServiceMode:
        """The mode this pool serves ``aor`` in, or a refusal (409) naming
        where the user is served instead."""
        decision = self.decide(aor)
        if isinstance(decision, Serve):
            return decision.mode
        if isinstance(decision, Redirect):
            where = ", ".join(t.pool for t in decision.targets)
            raise OperationError(
                "not-served-here", f"{aor} is not served by {self.fqdn}; try {where}", 409
            )
        raise OperationError("unknown-user", f"{aor}: {decision.reason}", 404)

    def _require_full(self, aor: str, feature: Feature) -> None:
        refusal = check_feature(feature, self.served_mode(aor))
        if refusal is not None:
            self.metrics.refusals.labels(feature.value).inc()
            raise OperationError("resiliency-mode", refusal.reason, 409)

    # -- lifecycle ----------------------------------------------------------------------
    async def __aenter__(self) -> PoolService:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _check_fd_limit(self, limit: int) -> int:
        """Warn when this front end may have to hold more client connections
        than it can open (one each): its share of its pool's users and, as a
        backup registrar, of its partner's. Past the limit accept() fails
        with EMFILE and clients time out, which looks like an overloaded pool."""
        by_pool = self.topology.users_by_pool()
        users = by_pool.get(self.fqdn, 0) + by_pool.get(self.pool.backup or "", 0)
        need = -(-users // max(1, len(self.pool.front_ends))) + FD_HEADROOM
        if need > limit:
            log.warning(
                "pool %s: the open-file limit (%d) is below the ~%d connections this front "
                "end may hold (its share of %d users, its own and its backup partner's): "
                "connections past it are refused (EMFILE). Raise the limit (ulimit -n; in "
                "a container, the engine's LimitNOFILE or Compose `ulimits`) or spread "
                "the users over more front ends",
                self.fqdn, limit, need, users,
            )  # fmt: skip
        return need

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self.close()
            raise

    async def _start(self) -> None:
        settings = self.settings
        self._check_fd_limit(raise_fd_limit())
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        self._store = await asyncio.to_thread(
            UserStore, settings.state_dir / STORE_FILE, self.fqdn
        )
        if not self._store.read_only:
            created = await asyncio.to_thread(self._store.seed_from_topology, self.topology)
            if created:
                log.info("seeded %d users homed on %s", created, self.fqdn)
        await asyncio.to_thread(self.state_file.load)
        fe_names = [fe.fqdn for fe in self.pool.front_ends]
        cert_name = f"pool-{self.fqdn.split('.', 1)[0]}"
        if len(self.pool.front_ends) > 1:
            cert_name += f"-{self.front_end.fqdn.split('.', 1)[0]}"  # each its own address
        cert = await asyncio.to_thread(
            ensure_server_cert,
            settings.ca_dir,
            cert_name,
            dns_names=[self.fqdn, *fe_names],
            ip_addresses=[self.address],
        )
        # Mutual TLS between pools, as Lync's: the pool's certificate (it names
        # the pool) is also its client certificate, presented to the pools it
        # connects to; clients may present none. A certificate from another
        # CA fails the handshake.
        self.server_cert = cert
        self.server_ssl = server_context(
            cert, client_ca=cert.ca_path, client_cert_required=False
        )
        self.client_ssl = client_context(cert.ca_path, cert=cert)
        loop = asyncio.get_running_loop()
        app_router = self.cms.open(settings.state_dir)
        self._new_monitor(loop.time())
        self.metrics.bind_gauges(
            registrations=lambda mode: self.sip.registrations.counts()[mode],
            bindings=lambda: len(self.sip.registrations.registrar),
            conferences=lambda: len(self.sip.focus.conferences.active),
            read_only=lambda: self.store.read_only,
            partner_state=lambda: self.monitor.state.value if self.monitor else None,
            partner_states=tuple(s.value for s in PartnerState),
        )
        bound = await self.sip.start()
        self.sip_addresses = [(kind.value, addr) for kind, addr in bound]
        self.user_moves.start()
        await self._start_control(app_router)
        if self.front_end_index == 0:
            self.user_data_exports.start()  # once per pool, not once per front end
        if len(self.pool.front_ends) > 1:
            self.quorum = FrontEndQuorum(
                len(self.pool.front_ends), self.front_end_index,
                down_after=settings.front_end_down_after, now=loop.time(),
            )
            self._state_mtime = await asyncio.to_thread(self._state_file_mtime)
            self._quorum_task = loop.create_task(self._keep_quorum(), name="pool-quorum")
        log.info(
            "pool %s (front end %s): sip %s, control %s, partner %s (detection %gs, "
            "failback %gs, heartbeat every %gs)",
            self.fqdn,
            self.front_end.fqdn,
            ", ".join(f"{k}:{h}:{p}" for k, (h, p) in self.sip_addresses),
            self.control_url,
            self.partner or "none",
            self.monitor.failover_detection_interval if self.monitor else 0,
            self.monitor.failback_interval if self.monitor else 0,
            self.heartbeat_interval,
        )

    def _new_monitor(self, now: float) -> None:
        """The partner's monitor, as at start: on a restart after quorum loss
        too (its old heartbeats are no news of the partner)."""
        if self.partner is None:
            return
        timers = self.cms.timers()
        self._set_heartbeat(timers.failover_detection_interval)
        self.monitor = PartnerMonitor(
            self.partner,
            failover_detection_interval=timers.failover_detection_interval,
            failback_interval=timers.failback_interval,
            now=now,
        )

    # -- the pool's front ends ------------------------------------------------------------
    def _siblings(self) -> list[tuple[int, str]]:
        loopback = self.settings.loopback
        return [
            (i, f"http://{addresses.host(self.topology, fe.address, loopback=loopback)}:"
                f"{self.pool.control_port}/health")
            for i, fe in enumerate(self.pool.front_ends)
            if i != self.front_end_index
        ]

    async def _keep_quorum(self) -> None:
        """Ask every sibling front end if it is up, each probe interval; stop
        the SIP service on quorum loss, start it again when quorum is back.
        A sibling that is up answers its control API: a stopped process, a cut
        network or a crashed one does not (an open port is not enough)."""
        quorum = self.quorum
        assert quorum is not None
        interval = self.settings.front_end_probe_interval
        loop = asyncio.get_running_loop()
        siblings = self._siblings()
        async with httpx.AsyncClient(timeout=interval) as http:

            async def probe(index: int, url: str) -> None:
                try:
                    r = await http.get(url)
                except httpx.HTTPError:
                    return
                if r.status_code == 200:
                    quorum.heard(index, loop.time())

            while True:
                started = loop.time()
                await asyncio.gather(*(probe(i, url) for i, url in siblings))
                for event in quorum.on_timer(loop.time()):
                    if isinstance(event, QuorumLost):
                        log.warning(
                            "pool %s lost its quorum (%s; up: %s): Local Pool Manager has been "
                            "disconnected from Pool Manager; front end %s stops its SIP service",
                            self.fqdn, event.rule.describe(), self._names(event.up),
                            self.front_end.fqdn,
                        )
                        await self._stop_sip()
                    elif isinstance(event, QuorumRegained):
                        log.warning(
                            "pool %s has its quorum again (%s; up: %s): front end %s starts its "
                            "SIP service", self.fqdn, event.rule.describe(),
                            self._names(event.up), self.front_end.fqdn,
                        )
                        await self._start_sip()
                await self._follow_state_file()
                await asyncio.sleep(max(0.0, started + interval - loop.time()))

    def _names(self, up: tuple[int, ...]) -> str:
        return ", ".join(self.pool.front_ends[i].fqdn.split(".", 1)[0] for i in up) or "none"

    async def _stop_sip(self) -> None:
        await self.sip.close()
        self.sip_addresses = []
        self.metrics.quorum_stops.inc()

    async def _start_sip(self) -> None:
        self.sip = PoolSip(self)
        self._new_monitor(asyncio.get_running_loop().time())
        bound = await self.sip.start()
        self.sip_addresses = [(kind.value, addr) for kind, addr in bound]

    @property
    def sip_running(self) -> bool:
        return self.quorum is None or self.quorum.state.value == "serving"

    def _state_file_mtime(self) -> int | None:
        try:
            return self.state_file.path.stat().st_mtime_ns
        except FileNotFoundError:
            return None

    async def _follow_state_file(self) -> None:
        """Another front end of the pool changed the shared failover state
        (a failover event, a move came through its control API): take it."""
        mtime = await asyncio.to_thread(self._state_file_mtime)
        if mtime == self._state_mtime:
            return
        self._state_mtime = mtime
        async with self.state_file.lock:
            await asyncio.to_thread(self.state_file.load)
        if self.sip_running:
            self.reevaluate("pool state changed on another front end")

    async def _start_control(self, cms_router: APIRouter) -> None:
        app = self.control_app = create_pool_app(self, cms_router=cms_router)
        host, port = self.address, self.pool.control_port
        try:
            sock = bind_tcp(host, port)
        except OSError as exc:
            raise OperationError(
                "listen-failed", f"cannot listen on {host}:{port} (control): {exc.strerror}", 500
            ) from None
        self.control_address = (host, sock.getsockname()[1])
        self._control_server = AppServer(app, sock)
        await self._control_server.start(
            lambda: OperationError("listen-failed", "the control API did not start", 500)
        )

    async def close(self) -> None:
        if self._quorum_task is not None:
            self._quorum_task.cancel()
            await asyncio.gather(self._quorum_task, return_exceptions=True)
            self._quorum_task = None
        await self.bulk_moves.close()
        await self.user_data_exports.close()
        if self._control_server is not None:
            await self._control_server.stop()
            self._control_server = None
        await self.sip.close()
        await self.user_moves.close()
        if self._store is not None:
            self._store.close()
            self._store = None

    async def serve_forever(self, stop: asyncio.Event) -> None:
        async with self:
            await stop.wait()

    # -- users ---------------------------------------------------------------------------
    async def user_data(self, aor: str) -> dict[str, Any]:
        data = await asyncio.to_thread(self._user_data, aor)
        key = aor.lower()
        mode = self.sip.registrations.modes.get(key)
        data["registration"] = {
            "mode": mode.value if mode else None,
            "bindings": len(self.sip.registrations.registered(key)),
        }
        return data

    def _user_data(self, aor: str) -> dict[str, Any]:
        uri = self.store_uri(aor)
        rec = self.store.get_user(uri)
        if rec is None:
            raise OperationError("unknown-user", f"{aor} has no account on {self.fqdn}", 404)
        key = aor.lower()
        return {
            "uri": rec.uri,
            "home_pool": rec.home_pool,
            "serving_pool": rec.serving_pool,
            "settings": dict(rec.settings),
            "contacts": self.store.contacts(uri),
            "conferences": [
                {
                    "conf_id": c.conf_id,
                    "subject": c.subject,
                    "uri": conference_uri(key, c.conf_id),
                    "content": base64.b64encode(c.content).decode("ascii"),
                }
                for c in self.store.conferences(uri)
            ],
            "pool": self.fqdn,
            "read_only": self.store.read_only,
        }

    async def add_contact(self, aor: str, contact: str) -> int:
        """Add ``contact`` to ``aor``'s list; the seq, once committed.
        Refused (409) unless this pool serves the user with full service."""
        self._require_full(aor.lower(), Feature.ADD_CONTACT)
        return await asyncio.to_thread(self.store.add_contact, self.store_uri(aor), contact)

    async def schedule_conference(self, aor: str, conf_id: str, subject: str) -> int:
        self._require_full(aor.lower(), Feature.SCHEDULE_MEETING)
        return await asyncio.to_thread(
            self.store.schedule_conference, self.store_uri(aor), conf_id, subject=subject
        )

    async def delete_user(self, aor: str, moved_to: str | None) -> int:
        """The source side of Move-CsUser: drop the account and send the
        user's clients to register again (they then get 301 to the new pool)."""
        key = aor.lower()
        seq = await asyncio.to_thread(self.store.delete_user, self.store_uri(aor))
        if moved_to:
            await self.user_moves.record(key, moved_to.lower())
        self.sip.registrations.force_reregister([key], "moved")
        return seq

    # -- status ---------------------------------------------------------------------------
    def _store_status(self) -> dict[str, Any]:
        counts = self.store.counts()
        return {
            "users": counts.users,
            "homed_users": counts.homed_users,
            "served_users": counts.served_users,
            "contacts": counts.contacts,
            "conferences": counts.conferences,
            "high_water_mark": self.store.high_water_mark(),
            "replicated_from": self.store.replication_positions(),
        }

    async def status(self) -> dict[str, Any]:
        # Store reads in a thread: a big write (a failover re-assigning ten
        # thousand users) holds the store's lock, and must not stall SIP.
        store = await asyncio.to_thread(self._store_status)
        return {
            "pool": self.fqdn,
            "front_end": self.front_end.fqdn,
            "quorum": self.quorum.status(asyncio.get_running_loop().time())
            if self.quorum is not None
            else None,
            "sip_running": self.sip_running,
            "site": self.pool.site,
            "address": self.address,
            "backup_pool": self.partner,
            "read_only": self.store.read_only,
            "cms_role": self.cms.role(),
            "failover": {h: s.value for h, s in self.failover.snapshot().items()},
            "last_failover_event": self.state_file.last_failover_event,
            **self.sip.status(),
            "store": store,
            "moves": len(self.state_file.moves),
            "pending_deletes": len(self.state_file.pending_deletes),
            "user_data_export": self.user_data_exports.status(),
            "uptime": round(time.time() - self.started_at, 3),
        }


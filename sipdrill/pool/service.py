"""The Front End pool process: ``sipdrill serve pool``.

One :class:`PoolService` per pool, listening on the pool's first front-end
address (its loopback stand-in with ``--loopback``): SIP on TLS 5061 and
TCP/UDP 5060 (:mod:`.sip_side`), and the HTTP control API with Prometheus
``/metrics`` on ``pool.control_port`` (:mod:`.api`), both in one asyncio
loop. In-process (tests)::

    async with PoolService(topology, PoolSettings(pool=P1, state_dir=..., ca_dir=...,
                                                  loopback=True, token="t")) as pool:
        pool.control_url, pool.sip_address

State that must survive a restart lives in ``--state-dir``: the user store
(``store.db``, SQLite WAL, seeded from the topology for the users homed here;
a write is acknowledged only after its commit) and ``pool-state.json`` (the
failover state of every pairing as this pool saw it, users moved by
Move-CsUser, and clean-ups still owed to a pool that was down). Registrations
are not kept: clients register again after a restart, as with Lync.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import logging
import os
import ssl
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from sipdrill import addresses
from sipdrill.control.files import write_atomically
from sipdrill.control.server import AppServer, bind_tcp
from sipdrill.errors import OperationError
from sipdrill.pool.api import create_pool_app
from sipdrill.pool.cms_replica import CmsReplica
from sipdrill.pool.conference import conference_uri
from sipdrill.pool.metrics import PoolMetrics
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
from sipdrill.pool.sip_side import PoolSip
from sipdrill.pool.state import (
    FailoverEvent,
    FailoverState,
    PartnerMonitor,
    PartnerState,
    PoolFailoverStates,
)
from sipdrill.pool.store import Change, ChangeOp, Entity, UserStore
from sipdrill.pool.userdata import MoveResult, export_cs_user_data, import_cs_user_data
from sipdrill.sip.tls import client_context, ensure_server_cert, server_context
from sipdrill.topology import Pool, Topology

log = logging.getLogger("sipdrill.pool")

STATE_FILE = "pool-state.json"
STORE_FILE = "store.db"
STATE_VERSION = 1
#: How long a pool waits for another pool's control API (Move-CsUser).
PEER_HTTP_TIMEOUT = 5.0


class PoolSettings(BaseModel):
    """How one pool process runs; the topology says everything else."""

    model_config = ConfigDict(frozen=True)

    pool: str
    state_dir: Path
    ca_dir: Path
    loopback: bool = False
    token: SecretStr | None = None
    heartbeat_interval: float | None = Field(
        default=None, gt=0, description="Default: min(5 s, detection interval / 4)."
    )
    heartbeat_timeout: float | None = Field(
        default=None, gt=0,
        description="Default: min(detection / 2, max(2 x interval, 1 s)).",
    )
    forward_timeout: float = Field(
        default=8.0, gt=0, description="How long a relayed request may wait for its answer."
    )
    presence_refresh: float = Field(
        default=60.0, gt=0, description="Refresh of back-end presence subscriptions."
    )
    nudge_grace: float = Field(
        default=30.0, ge=0,
        description="How long a client asked to register again (NOTIFY x-sipdrill-reregister) "
        "has before its flow is closed; 0 closes flows at once.",
    )
    nudge_rate: float = Field(
        default=1000.0, gt=0, description="Nudges sent per second after a mass change."
    )
    nudge_window: int = Field(
        default=500, ge=1, description="Users nudged and not yet registered again, at most."
    )
    housekeeping_interval: float = Field(default=1.0, gt=0)
    pending_retry_interval: float = Field(default=5.0, gt=0)
    max_connections: int = Field(default=60_000, ge=16)
    sip_t1: float = Field(default=0.5, gt=0)


def parse_failover_event(name: str) -> FailoverEvent:
    """The contract spells events with underscores, the state table with hyphens."""
    try:
        return FailoverEvent(name.strip().lower().replace("_", "-"))
    except ValueError:
        events = ", ".join(e.value.replace("-", "_") for e in FailoverEvent)
        raise OperationError(
            "bad-event", f"unknown failover event {name!r}; use {events}", 422
        ) from None


class PoolService:
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
        self.partner: str | None = self.pool.backup
        self.backups = backups_from_topology(topology)
        self.pool_names = frozenset(p.fqdn for p in topology.pools)
        self.address = self.address_of(self.pool)
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
        #: Users Move-CsUser re-homed away from the topology's answer.
        self.moves: dict[str, str] = {}
        #: Accounts a moved user left on a pool that was down: deleted when it answers.
        self.pending_deletes: dict[str, dict[str, str]] = {}
        self.last_failover_event: dict[str, Any] | None = None
        self.cms = CmsReplica(topology, self.fqdn, token=token, loopback=settings.loopback)
        self.started_at = time.time()
        self._store: UserStore | None = None
        self._state_lock = asyncio.Lock()
        self._retry_after = 0.0
        self.sip = PoolSip(self)
        self.server_ssl: ssl.SSLContext | None = None
        self.client_ssl: ssl.SSLContext | None = None
        self.http: httpx.AsyncClient | None = None
        self.sip_addresses: list[tuple[str, tuple[str, int]]] = []
        self.control_address: tuple[str, int] | None = None
        self._control_server: AppServer | None = None

    def _set_heartbeat(self, detection: float) -> None:
        settings = self.settings
        self.heartbeat_interval = settings.heartbeat_interval or min(5.0, detection / 4)
        self.heartbeat_timeout = settings.heartbeat_timeout or min(
            detection / 2, max(2 * self.heartbeat_interval, 1.0)
        )

    # -- addresses ----------------------------------------------------------------------
    def address_of(self, pool: Pool) -> str:
        return addresses.pool_host(self.topology, pool, loopback=self.settings.loopback)

    def pool_sip_address(self, fqdn: str) -> tuple[str, int]:
        return addresses.pool_sip_address(self.topology, fqdn, loopback=self.settings.loopback)

    def pool_sip_uri(self, fqdn: str) -> str:
        return f"sip:{fqdn}:{self.topology.pool(fqdn).sip_tls_port};transport=tls"

    def control_url_of(self, fqdn: str) -> str:
        return addresses.pool_control_url(self.topology, fqdn, loopback=self.settings.loopback)

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
        home = self.cms.home_of(key) or self.moves.get(key) or self._topo_home.get(key)
        if home is not None:
            return home
        if self._store is None:
            return None
        rec = self._store.get_user(self.store_uri(key))
        return rec.home_pool if rec else None

    def store_uri(self, aor: str) -> str:
        """The URI as the store spells it (topology files may use capitals)."""
        return self._topo_uri.get(aor.lower(), aor)

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

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self.close()
            raise

    async def _start(self) -> None:
        settings = self.settings
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        self._store = await asyncio.to_thread(
            UserStore, settings.state_dir / STORE_FILE, self.fqdn
        )
        if not self._store.read_only:
            created = await asyncio.to_thread(self._store.seed_from_topology, self.topology)
            if created:
                log.info("seeded %d users homed on %s", created, self.fqdn)
        await asyncio.to_thread(self._load_state)
        fe_names = [fe.fqdn for fe in self.pool.front_ends]
        cert = await asyncio.to_thread(
            ensure_server_cert,
            settings.ca_dir,
            f"pool-{self.fqdn.split('.', 1)[0]}",
            dns_names=[self.fqdn, *fe_names],
            ip_addresses=[self.address],
        )
        self.server_ssl = server_context(cert)
        self.client_ssl = client_context(cert.ca_path)
        loop = asyncio.get_running_loop()
        app_router = self.cms.open(settings.state_dir)
        if self.partner is not None:
            timers = self.cms.timers()
            self._set_heartbeat(timers.failover_detection_interval)
            self.monitor = PartnerMonitor(
                self.partner,
                failover_detection_interval=timers.failover_detection_interval,
                failback_interval=timers.failback_interval,
                now=loop.time(),
            )
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
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self.http = httpx.AsyncClient(timeout=PEER_HTTP_TIMEOUT, headers=headers)
        await self._start_control(app_router)
        log.info(
            "pool %s: sip %s, control %s, partner %s (detection %gs, failback %gs, "
            "heartbeat every %gs)",
            self.fqdn,
            ", ".join(f"{k}:{h}:{p}" for k, (h, p) in self.sip_addresses),
            self.control_url,
            self.partner or "none",
            self.monitor.failover_detection_interval if self.monitor else 0,
            self.monitor.failback_interval if self.monitor else 0,
            self.heartbeat_interval,
        )

    async def _start_control(self, cms_router: APIRouter) -> None:
        app = create_pool_app(self, cms_router=cms_router)
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
        if self._control_server is not None:
            await self._control_server.stop()
            self._control_server = None
        await self.sip.close()
        if self.http is not None:
            await self.http.aclose()
            self.http = None
        if self._store is not None:
            self._store.close()
            self._store = None

    async def serve_forever(self, stop: asyncio.Event) -> None:
        async with self:
            await stop.wait()

    # -- persisted state ----------------------------------------------------------------
    def _load_state(self) -> None:
        path = self.settings.state_dir / STATE_FILE
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            raise OperationError("bad-state", f"{path}: unreadable ({exc})", 500) from None
        if doc.get("version") != STATE_VERSION:
            raise OperationError("bad-state", f"{path}: version {doc.get('version')}", 500)
        states = {home: FailoverState(v) for home, v in doc.get("failover", {}).items()}
        try:
            self.failover.restore(states)
        except ValueError as exc:
            raise OperationError("bad-state", f"{path}: {exc} (topology changed?)", 500) from None
        self.moves = dict(doc.get("moves", {}))
        self.pending_deletes = dict(doc.get("pending_deletes", {}))
        self.last_failover_event = doc.get("last_failover_event")

    async def _save_state(self) -> None:
        doc = {
            "version": STATE_VERSION,
            "pool": self.fqdn,
            "failover": {h: s.value for h, s in self.failover.snapshot().items()},
            "moves": self.moves,
            "pending_deletes": self.pending_deletes,
            "last_failover_event": self.last_failover_event,
        }
        data = (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()
        await asyncio.to_thread(write_atomically, self.settings.state_dir / STATE_FILE, data)

    # -- failover -------------------------------------------------------------------------
    def failover_view(self) -> dict[str, Any]:
        pairs = []
        for a, b in self.topology.pairs():
            for home, backup in ((a.fqdn, b.fqdn), (b.fqdn, a.fqdn)):
                state = self.failover.state(home)
                pairs.append({
                    "home_pool": home,
                    "backup_pool": backup,
                    "state": state.value,
                    "serving_pool": self.failover.serving_pool(home),
                })
        states = {h: s.value for h, s in self.failover.snapshot().items()}
        return {"pool": self.fqdn, "states": states, "pairs": pairs}

    async def failover_event(
        self, home_pool: str, event_name: str, disaster_mode: bool
    ) -> dict[str, Any]:
        event = parse_failover_event(event_name)
        home = home_pool.lower()
        async with self._state_lock:
            new = self.failover.handle(home, event)
            self.last_failover_event = {
                "home_pool": home, "event": event.value, "state": new.value,
                "disaster_mode": disaster_mode, "at": time.time(),
            }
            await self._save_state()
        self.metrics.failover_events.labels(event.value).inc()
        log.warning("failover: %s for %s%s -> %s", event.value, home,
                    " (disaster mode)" if disaster_mode else "", new.value)
        reassigned = 0
        if event in (FailoverEvent.FAILOVER_COMPLETED, FailoverEvent.FAILBACK_COMPLETED):
            serving = self.failover.serving_pool(home)
            if not self.store.read_only:
                try:
                    reassigned = await asyncio.to_thread(
                        self.store.reassign_serving_pool, home, serving
                    )
                except OperationError as exc:
                    log.warning("could not record %s as serving %s: %s", serving, home, exc)
        summary = self.sip.registrations.reevaluate(f"{event.value} {home}")
        return {
            "pool": self.fqdn,
            "home_pool": home,
            "backup_pool": self.failover.backup_of(home),
            "event": event.value.replace("-", "_"),
            "state": new.value,
            "serving_pool": self.failover.serving_pool(home),
            "disaster_mode": disaster_mode,
            "serving_pool_recorded": reassigned,
            "reevaluated": summary,
        }

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
            await self._record_move(key, moved_to.lower())
        self.sip.registrations.force_reregister([key], "moved")
        return seq

    async def _record_move(self, aor: str, pool: str) -> None:
        async with self._state_lock:
            if self._topo_home.get(aor) == pool:
                self.moves.pop(aor, None)
            else:
                self.moves[aor] = pool
            await self._save_state()

    async def _peer(self, method: str, pool: str, path: str, **kw: Any) -> httpx.Response | None:
        """A call to another pool's control API; None when it cannot be reached."""
        assert self.http is not None
        try:
            return await self.http.request(method, self.control_url_of(pool) + path, **kw)
        except httpx.HTTPError as exc:
            log.info("%s %s on %s: %s", method, path, pool, exc)
            return None

    async def move_user(self, user: str, to: str, force: bool) -> dict[str, Any]:
        """Move-CsUser, run by the target pool (the one that is surely up).

        Without ``force`` the source pool must answer: the contact list and
        meetings come along, then the source drops the account. With
        ``force`` the account is re-homed without them, and the result counts
        what was lost (from the source if it answers, else from this pool's
        Backup Service replica, which may lag by a sync interval as the real
        loss would). The target is written first: a crash in between leaves
        the user in two places, and running the move again finishes it.
        """
        target = to.lower()
        if target not in self.pool_names:
            raise OperationError("unknown-pool", f"{to} is not a pool of this lab", 404)
        if target != self.fqdn:
            response = await self._peer(
                "POST", target, "/admin/users/move",
                json={"user": user, "to": target, "force": force},
            )
            if response is None:
                raise OperationError("pool-down", f"the target pool {target} is down", 503)
            _raise_for(response)
            result: dict[str, Any] = response.json()
            return result
        key = user.lower()
        uri = self.store_uri(user)
        local = self.store.get_user(uri)
        # Lync: "if the CMS is unavailable, you lose the ability to conduct
        # moves" (seed 001, docs/sources.md). Checked before anything is written.
        await self.cms.require_master()
        if local is not None and local.home_pool == self.fqdn:
            recorded = self.cms.home_of(key) or self._topo_home.get(key)
            if recorded == self.fqdn and key not in self.pending_deletes:
                raise OperationError("same-pool", f"{user} is already homed on {self.fqdn}", 409)
            # An interrupted move: the account is here, the CMS or the old
            # pool do not know yet. Finish it.
            pending = self.pending_deletes.get(key, {}).get("pool")
            previous = pending or recorded or self.fqdn
            await self._finish_move(key, uri, previous)
            return asdict(MoveResult(uri, previous, self.fqdn, force, 0, 0, 0, 0)) | {
                "source_cleaned": key not in self.pending_deletes, "counted_from": "nothing",
            }
        source = local.home_pool if local is not None else self.home_of(key)
        if source is None or source == self.fqdn:
            raise OperationError("unknown-user", f"no pool has an account for {user}", 404)
        self.store.require_writable()
        response = await self._peer("GET", source, f"/users/{uri}")
        data: dict[str, Any] | None = None
        if response is not None and response.status_code == 200:
            data = response.json()
        elif response is not None and response.status_code not in (404, 503):
            _raise_for(response)
        if not force:
            if response is None:
                raise OperationError(
                    "pool-down",
                    f"the source pool {source} is down; only Move-CsUser -Force can move {user}, "
                    "and their contacts and meetings are then lost",
                    503,
                )
            if data is None:
                raise OperationError(
                    "unknown-user",
                    f"{user}'s home pool {source} has no account for them; use -Force",
                    404,
                )
            if data.get("read_only"):
                raise OperationError(
                    "read-only",
                    f"the user store of {source} is read-only (pool failover); fail the pool "
                    f"back before moving {user}",
                    409,
                )
        if data is not None:
            contacts = list(data["contacts"])
            conferences = [
                (c["conf_id"], c["subject"], base64.b64decode(c["content"]))
                for c in data["conferences"]
            ]
            settings = dict(data["settings"])
        elif local is not None:
            contacts = self.store.contacts(uri)
            conferences = [(c.conf_id, c.subject, c.content) for c in self.store.conferences(uri)]
            settings = dict(local.settings)
        else:
            contacts, conferences, settings = [], [], {}

        def write_target() -> None:
            store = self.store
            with store.batch():
                if store.get_user(uri) is not None:
                    store.delete_user(uri)
                store.upsert_user(uri, home_pool=self.fqdn, settings=settings)
                if not force:
                    store.replace_contacts(uri, contacts)
                    for conf_id, subject, content in conferences:
                        store.schedule_conference(uri, conf_id, subject=subject, content=content)

        await asyncio.to_thread(write_target)
        await self._finish_move(key, uri, source)
        deleted = key not in self.pending_deletes
        n_contacts, n_confs = len(contacts), len(conferences)
        result_obj = MoveResult(
            user=uri,
            source_pool=source,
            target_pool=self.fqdn,
            force=force,
            contacts_moved=0 if force else n_contacts,
            conferences_moved=0 if force else n_confs,
            contacts_lost=n_contacts if force else 0,
            conferences_lost=n_confs if force else 0,
        )
        out = asdict(result_obj)
        out["source_cleaned"] = deleted
        out["counted_from"] = "source" if data is not None else (
            "replica" if local is not None else "nothing"
        )
        log.info("moved %s from %s to %s%s", uri, source, self.fqdn, " (forced)" if force else "")
        return out

    async def _finish_move(self, key: str, uri: str, source: str) -> None:
        """After the target holds the account: the CMS's user homing, this
        pool's own record, the source's stale account (now, or when it
        answers again), and the user's registrations here."""
        home = None if self._topo_home.get(key) == self.fqdn else self.fqdn
        await self.cms.set_home(key, home)
        await self._record_move(key, self.fqdn)
        if source != self.fqdn and not await self._delete_at_source(uri, source):
            async with self._state_lock:
                self.pending_deletes[key] = {"uri": uri, "pool": source, "moved_to": self.fqdn}
                await self._save_state()
        elif key in self.pending_deletes:
            async with self._state_lock:
                self.pending_deletes.pop(key, None)
                await self._save_state()
        # Clients of the user registered here (e.g. in resiliency mode) must
        # register again to get full service from their new home.
        self.sip.registrations.reevaluate(f"move {key}")

    async def _delete_at_source(self, uri: str, source: str) -> bool:
        response = await self._peer(
            "DELETE", source, f"/users/{uri}", params={"moved_to": self.fqdn}
        )
        return response is not None and response.status_code in (200, 404)

    async def retry_pending(self) -> None:
        """Clean-ups owed to pools that were down during a forced move."""
        loop = asyncio.get_running_loop()
        if not self.pending_deletes or loop.time() < self._retry_after:
            return
        self._retry_after = loop.time() + self.settings.pending_retry_interval
        for key, item in list(self.pending_deletes.items()):
            if await self._delete_at_source(item["uri"], item["pool"]):
                log.info("removed %s's stale account from %s", item["uri"], item["pool"])
                async with self._state_lock:
                    self.pending_deletes.pop(key, None)
                    await self._save_state()

    # -- replication ----------------------------------------------------------------------
    async def changes(self, since: int, limit: int) -> dict[str, Any]:
        return await asyncio.to_thread(self._changes, since, limit)

    def _changes(self, since: int, limit: int) -> dict[str, Any]:
        changes = self.store.changes_since(since, limit)
        return {
            "pool": self.fqdn,
            "high_water_mark": self.store.high_water_mark(),
            "read_only": self.store.read_only,
            "changes": [
                {
                    "seq": c.seq,
                    "op": c.op.value,
                    "entity": c.entity.value,
                    "key": c.key,
                    "payload": dict(c.payload),
                    "origin_pool": c.origin_pool,
                    "timestamp": c.timestamp,
                }
                for c in changes
            ],
        }

    async def apply_changes(
        self, source_pool: str, changes: Sequence[Mapping[str, Any]]
    ) -> dict[str, int]:
        try:
            batch = [
                Change(
                    int(c["seq"]), ChangeOp(c["op"]), Entity(c["entity"]), str(c["key"]),
                    dict(c["payload"]), str(c["origin_pool"]), float(c["timestamp"]),
                )
                for c in changes
            ]
        except (KeyError, ValueError, TypeError) as exc:
            raise OperationError("bad-changes", f"not a change feed batch: {exc!r}", 422) from None
        source = source_pool.lower()
        applied = await asyncio.to_thread(self.store.apply_changes, batch, source)
        # A replicated account tells where its user lives now (a move on
        # the partner): remember it so this pool routes and redirects right.
        for ch in batch:
            if ch.entity is Entity.USER and ch.op is ChangeOp.UPSERT:
                uri, home = str(ch.payload["uri"]).lower(), str(ch.payload["home_pool"])
                if self.home_of(uri) != home and home in self.pool_names:
                    await self._record_move(uri, home)
        return {"applied": applied, "last_applied": self.store.last_applied(source)}

    async def set_read_only(self, read_only: bool) -> bool:
        await asyncio.to_thread(self.store.set_read_only, read_only)
        log.warning("user store of %s is now %s", self.fqdn,
                    "read-only" if read_only else "writable")
        return self.store.read_only

    # -- Export/Import-CsUserData ------------------------------------------------------------
    async def export_users(self, fmt: str) -> tuple[bytes, dict[str, Any]]:
        def run() -> tuple[bytes, dict[str, Any]]:
            out_dir = self.settings.state_dir / "exports"
            out_dir.mkdir(exist_ok=True)
            path = out_dir / f"userdata-{int(time.time())}.{fmt}"
            result = export_cs_user_data(self.store, path, fmt="json" if fmt == "json" else "xml")
            summary = {"pool": result.pool, "users": result.users, "contacts": result.contacts}
            return path.read_bytes(), summary

        return await asyncio.to_thread(run)

    async def import_users(self, data: bytes) -> dict[str, Any]:
        def run() -> dict[str, Any]:
            out_dir = self.settings.state_dir / "exports"
            out_dir.mkdir(exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=out_dir, prefix="import-", suffix=".dat")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                result = import_cs_user_data(self.store, tmp)
            finally:
                Path(tmp).unlink(missing_ok=True)
            return {
                "users_restored": result.users_restored,
                "contacts_restored": result.contacts_restored,
                "skipped": list(result.skipped),
            }

        return await asyncio.to_thread(run)

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
            "site": self.pool.site,
            "address": self.address,
            "backup_pool": self.partner,
            "read_only": self.store.read_only,
            "cms_role": self.cms.role(),
            "failover": {h: s.value for h, s in self.failover.snapshot().items()},
            "last_failover_event": self.last_failover_event,
            **self.sip.status(),
            "store": store,
            "moves": len(self.moves),
            "pending_deletes": len(self.pending_deletes),
            "uptime": round(time.time() - self.started_at, 3),
        }


def _raise_for(response: httpx.Response) -> None:
    """Re-raise another pool's refusal as ours (same code and status)."""
    if response.status_code < 400:
        return
    try:
        body = response.json()
        code, message = str(body["code"]), str(body["message"])
    except (ValueError, KeyError, TypeError):
        code, message = "peer-error", response.text[:200]
    raise OperationError(code, message, response.status_code)

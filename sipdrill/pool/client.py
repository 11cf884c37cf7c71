"""HTTP clients of the pool's control API (docs/control-api.md), as the
Backup Service, pool failover, the CMS and other pools consume it.

- :class:`PoolClient`: a Front End pool's ``/replication/*``,
  ``/failover/state``, ``/cms*`` and ``/users/*`` routes.
- :class:`PoolClients`: one client per pool of a topology, at the addresses
  of the lab's address plan (:mod:`sipdrill.addresses`), or at explicit URLs
  (tests).

Errors are those of :mod:`sipdrill.control.http`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import httpx

from sipdrill.addresses import pool_control_url
from sipdrill.control.http import DEFAULT_TIMEOUT, ControlClient
from sipdrill.control.settings import token_from_env
from sipdrill.errors import OperationError
from sipdrill.pool.state import FailoverState
from sipdrill.topology import Topology

#: Event names of ``POST /failover/state`` (the contract spells them with
#: underscores; :class:`~sipdrill.pool.state.FailoverEvent` values use
#: hyphens).
FAILOVER_EVENTS = (
    "failover_started",
    "failover_completed",
    "failback_started",
    "failback_completed",
)


@dataclass(frozen=True)
class ChangesPage:
    """One answer of ``GET /replication/changes``. ``changes`` stay the JSON
    objects the pool sent (they go back out unchanged to the partner)."""

    pool: str
    high_water_mark: int
    read_only: bool
    changes: list[dict[str, Any]]


@dataclass(frozen=True)
class ApplyResult:
    applied: int
    last_applied: int


def parse_failover_states(body: Any) -> dict[str, FailoverState]:
    """``GET /failover/state`` as ``{home pool: state}``. Accepts a mapping
    of pools to state names (or to objects with a ``state``), at the top
    level or under ``states`` / ``pairs``, or a list of
    ``{"home_pool", "state"}`` objects."""
    if isinstance(body, dict):
        for key in ("states", "pairs", "failover"):
            if key in body and isinstance(body[key], dict | list):
                return parse_failover_states(body[key])
        items: list[tuple[Any, Any]] = list(body.items())
    elif isinstance(body, list):
        items = [(e.get("home_pool") or e.get("pool"), e) for e in body if isinstance(e, dict)]
    else:
        return {}
    by_value = {s.value.lower(): s for s in FailoverState}
    by_value.update({s.name.lower(): s for s in FailoverState})
    out: dict[str, FailoverState] = {}
    for pool, value in items:
        if isinstance(value, dict):
            value = value.get("state")
        if isinstance(pool, str) and isinstance(value, str):
            state = by_value.get(value.replace("-", "_").lower()) or by_value.get(value.lower())
            if state is not None:
                out[pool.lower()] = state
    return out


class PoolClient(ControlClient):
    """A Front End pool's control API."""

    def __init__(self, pool_fqdn: str, base_url: str, **kwargs: Any) -> None:
        super().__init__(f"pool {pool_fqdn}", base_url, **kwargs)
        self.pool_fqdn = pool_fqdn.lower()

    async def changes(self, since: int, limit: int) -> ChangesPage:
        body = await self.request(
            "GET", "/replication/changes", params={"since": since, "limit": limit}
        )
        try:
            return ChangesPage(
                str(body.get("pool", self.pool_fqdn)),
                int(body["high_water_mark"]),
                bool(body.get("read_only", False)),
                list(body["changes"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError):
            raise OperationError(
                "bad-answer", f"{self.name}: /replication/changes answered {body!r:.200}", 502
            ) from None

    async def apply(self, source_pool: str, changes: list[dict[str, Any]]) -> ApplyResult:
        body = await self.request(
            "POST", "/replication/apply", json={"source_pool": source_pool, "changes": changes}
        )
        try:
            return ApplyResult(int(body["applied"]), int(body["last_applied"]))
        except (KeyError, TypeError, ValueError):
            raise OperationError(
                "bad-answer", f"{self.name}: /replication/apply answered {body!r:.200}", 502
            ) from None

    async def positions(self) -> dict[str, int]:
        body = await self.request("GET", "/replication/positions")
        if isinstance(body, dict) and isinstance(body.get("positions"), dict):
            body = body["positions"]
        if not isinstance(body, dict):
            raise OperationError(
                "bad-answer", f"{self.name}: /replication/positions answered {body!r:.200}", 502
            )
        return {str(k).lower(): int(v) for k, v in body.items() if isinstance(v, int | float)}

    async def position_of(self, source_pool: str) -> int:
        return (await self.positions()).get(source_pool.lower(), 0)

    async def set_read_only(self, read_only: bool) -> None:
        await self.request("PUT", "/replication/read-only", json={"read_only": read_only})

    async def failover_states(self, time_limit: float | None = None) -> dict[str, FailoverState]:
        body = await self.request("GET", "/failover/state", time_limit=time_limit)
        return parse_failover_states(body)

    async def failover_event(self, home_pool: str, event: str, disaster_mode: bool) -> Any:
        if event not in FAILOVER_EVENTS:
            raise ValueError(f"unknown failover event {event!r}")
        return await self.request(
            "POST",
            "/failover/state",
            json={"home_pool": home_pool, "event": event, "disaster_mode": disaster_mode},
        )

    # --- CMS (the router of sipdrill.cms.store, mounted in the pool) ----

    async def cms(self, time_limit: float | None = None) -> dict[str, Any]:
        body = await self.request("GET", "/cms", time_limit=time_limit)
        return body if isinstance(body, dict) else {}

    async def cms_put_config(self, patch: Mapping[str, Any]) -> dict[str, Any]:
        body = await self.request("PUT", "/cms/config", json=dict(patch))
        return body if isinstance(body, dict) else {}

    async def cms_replicate(self, document: Mapping[str, Any]) -> dict[str, Any]:
        body = await self.request("POST", "/cms/replicate", json={"document": dict(document)})
        return body if isinstance(body, dict) else {}

    async def cms_role(self, **fields: Any) -> dict[str, Any]:
        body = await self.request("POST", "/cms/role", json=fields)
        return body if isinstance(body, dict) else {}

    # --- users (drills and tests) -------------------------------------------

    async def user(self, uri: str) -> dict[str, Any]:
        body = await self.request("GET", f"/users/{uri}")
        return body if isinstance(body, dict) else {}

    async def add_contact(self, uri: str, contact: str) -> int:
        body = await self.request("POST", f"/users/{uri}/contacts", json={"contact": contact})
        return int(body["seq"])


class PoolClients:
    """Clients for every pool of ``topology``.

    ``pool_urls`` override the plan's addresses (tests, odd layouts);
    ``transports`` maps a URL's base to an httpx transport
    (``httpx.ASGITransport`` in unit tests). Use ``async with``.
    """

    def __init__(
        self,
        topology: Topology,
        *,
        token: str | None = None,
        loopback: bool = False,
        pool_urls: Mapping[str, str] | None = None,
        transports: Mapping[str, httpx.AsyncBaseTransport] | None = None,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
    ) -> None:
        self.topology = topology
        token = token_from_env(token)
        transports = dict(transports or {})
        self.pools: dict[str, PoolClient] = {}
        for p in topology.pools:
            url = (pool_urls or {}).get(p.fqdn) or pool_control_url(
                topology, p.fqdn, loopback=loopback
            )
            self.pools[p.fqdn] = PoolClient(
                p.fqdn, url, token=token, transport=transports.get(url), timeout=timeout
            )

    def pool(self, fqdn: str) -> PoolClient:
        try:
            return self.pools[fqdn.lower()]
        except KeyError:
            raise OperationError(
                "unknown-pool", f"{fqdn} is not a pool of topology {self.topology.name}", 404
            ) from None

    def _every_client(self) -> list[ControlClient]:
        """Every client held (closed by :meth:`aclose`)."""
        return list(self.pools.values())

    async def aclose(self) -> None:
        for c in self._every_client():
            await c.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

"""HTTP clients for the control API contract (docs/control-api.md), as the
Backup Service, pool failover and the CMS failover consume it.

- :class:`PoolClient`: a Front End pool's ``/replication/*``,
  ``/failover/state`` and ``/cms*`` routes.
- :class:`BackupClient`: a Backup Service's ``/status`` and ``/sync``.
- :class:`LabClients`: one client per pool and per Backup Service of a
  topology, at the addresses of the lab's address plan
  (:mod:`sipdrill.addresses`), or at explicit URLs (tests).

Errors: a peer that cannot be reached (connection refused, timeout, reset)
raises :class:`Unreachable`; a peer that answers with an error raises
:class:`~sipdrill.errors.OperationError` with the peer's ``code`` and
``message``, so a refusal crosses the wire unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import httpx

from sipdrill.addresses import backup_control_url, pool_control_url
from sipdrill.control.settings import token_from_env
from sipdrill.errors import OperationError
from sipdrill.services.pool_state import FailoverState
from sipdrill.topology import Topology

#: Connect quickly (a silently dropped pool must not stall a failover for
#: long), but give an apply of a large page time to commit.
DEFAULT_TIMEOUT = httpx.Timeout(connect=3.0, read=60.0, write=60.0, pool=5.0)

#: Event names of ``POST /failover/state`` (the contract spells them with
#: underscores; :class:`~sipdrill.services.pool_state.FailoverEvent` values use
#: hyphens).
FAILOVER_EVENTS = (
    "failover_started",
    "failover_completed",
    "failback_started",
    "failback_completed",
)


@dataclass
class Unreachable(OperationError):
    """A peer that did not answer at all (as opposed to one that refused)."""

    url: str = ""


def _error_from(response: httpx.Response, what: str) -> OperationError:
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        if isinstance(body.get("code"), str):
            return OperationError(
                body["code"], str(body.get("message", "")), response.status_code
            )
        detail = body.get("detail")
        if isinstance(detail, dict) and isinstance(detail.get("code"), str):
            return OperationError(
                detail["code"], str(detail.get("message", "")), response.status_code
            )
        if detail is not None:
            return OperationError(f"http-{response.status_code}", f"{what}: {detail}",
                                  response.status_code)
    text = response.text[:200]
    return OperationError(f"http-{response.status_code}", f"{what}: {text}", response.status_code)


class _Http:
    """One peer: an ``httpx.AsyncClient`` with the lab's auth and errors."""

    #: Human name for messages ("pool pool1.lab.local").
    name: str

    def __init__(
        self,
        name: str,
        base_url: str,
        *,
        token: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
    ) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._client = httpx.AsyncClient(
            base_url=self.base_url, headers=headers, transport=transport, timeout=timeout
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        time_limit: float | None = None,
    ) -> Any:
        what = f"{self.name}: {method} {path}"
        kwargs: dict[str, Any] = {}
        if time_limit is not None:
            kwargs["timeout"] = time_limit
        try:
            response = await self._client.request(method, path, json=json, params=params, **kwargs)
        except httpx.TransportError as exc:
            raise Unreachable(
                "unreachable",
                f"{self.name} is unreachable at {self.base_url} ({type(exc).__name__}: {exc})",
                503,
                url=self.base_url,
            ) from None
        if response.status_code >= 400:
            raise _error_from(response, what)
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            return response.text


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


class PoolClient(_Http):
    """A Front End pool's control API."""

    def __init__(self, pool_fqdn: str, base_url: str, **kwargs: Any) -> None:
        super().__init__(f"pool {pool_fqdn}", base_url, **kwargs)
        self.pool_fqdn = pool_fqdn.lower()

    async def health(self, time_limit: float | None = None) -> dict[str, Any]:
        body = await self.request("GET", "/health", time_limit=time_limit)
        return body if isinstance(body, dict) else {}

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

    # --- CMS (the router of sipdrill.services.cms, mounted in the pool) ----

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


class BackupClient(_Http):
    """A Backup Service's control API."""

    def __init__(self, pool_fqdn: str, base_url: str, **kwargs: Any) -> None:
        super().__init__(f"the Backup Service of {pool_fqdn}", base_url, **kwargs)
        self.pool_fqdn = pool_fqdn.lower()

    async def health(self, time_limit: float | None = None) -> dict[str, Any]:
        body = await self.request("GET", "/health", time_limit=time_limit)
        return body if isinstance(body, dict) else {}

    async def status(self, time_limit: float | None = None) -> dict[str, Any]:
        body = await self.request("GET", "/status", time_limit=time_limit)
        return body if isinstance(body, dict) else {}

    async def sync(self, *, final: bool = False) -> dict[str, Any]:
        body = await self.request("POST", "/sync", json={"final": final})
        return body if isinstance(body, dict) else {}


class LabClients:
    """Clients for every pool and Backup Service of ``topology``.

    ``pool_urls`` / ``backup_urls`` override the plan's addresses (tests,
    odd layouts); ``transports`` maps a URL's base to an httpx transport
    (``httpx.ASGITransport`` in unit tests). Use ``async with``.
    """

    def __init__(
        self,
        topology: Topology,
        *,
        token: str | None = None,
        loopback: bool = False,
        pool_urls: Mapping[str, str] | None = None,
        backup_urls: Mapping[str, str] | None = None,
        transports: Mapping[str, httpx.AsyncBaseTransport] | None = None,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
    ) -> None:
        self.topology = topology
        token = token_from_env(token)
        transports = dict(transports or {})
        self.pools: dict[str, PoolClient] = {}
        self.backups: dict[str, BackupClient] = {}
        for p in topology.pools:
            url = (pool_urls or {}).get(p.fqdn) or pool_control_url(
                topology, p.fqdn, loopback=loopback
            )
            self.pools[p.fqdn] = PoolClient(
                p.fqdn, url, token=token, transport=transports.get(url), timeout=timeout
            )
            if p.backup:
                burl = (backup_urls or {}).get(p.fqdn) or backup_control_url(
                    topology, p.fqdn, loopback=loopback
                )
                self.backups[p.fqdn] = BackupClient(
                    p.fqdn, burl, token=token, transport=transports.get(burl), timeout=timeout
                )

    def pool(self, fqdn: str) -> PoolClient:
        try:
            return self.pools[fqdn.lower()]
        except KeyError:
            raise OperationError(
                "unknown-pool", f"{fqdn} is not a pool of topology {self.topology.name}", 404
            ) from None

    def backup(self, fqdn: str) -> BackupClient | None:
        return self.backups.get(fqdn.lower())

    async def aclose(self) -> None:
        for c in [*self.pools.values(), *self.backups.values()]:
            await c.aclose()

    async def __aenter__(self) -> LabClients:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

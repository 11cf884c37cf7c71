"""HTTP clients of the Backup Service's control API, and of the whole lab.

- :class:`BackupClient`: a Backup Service's ``/health``, ``/status`` and ``/sync``.
- :class:`LabClients`: one client per pool and per Backup Service of a
  topology, at the addresses of the lab's address plan
  (:mod:`sipdrill.addresses`), or at explicit URLs (tests).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx

from sipdrill.addresses import backup_control_url
from sipdrill.control.http import DEFAULT_TIMEOUT, ControlClient
from sipdrill.control.settings import token_from_env
from sipdrill.pool.client import PoolClients
from sipdrill.topology import Topology


class BackupClient(ControlClient):
    """A Backup Service's control API."""

    def __init__(self, pool_fqdn: str, base_url: str, **kwargs: Any) -> None:
        super().__init__(f"the Backup Service of {pool_fqdn}", base_url, **kwargs)
        self.pool_fqdn = pool_fqdn.lower()

    async def status(self, time_limit: float | None = None) -> dict[str, Any]:
        body = await self.request("GET", "/status", time_limit=time_limit)
        return body if isinstance(body, dict) else {}

    async def sync(self, *, final: bool = False) -> dict[str, Any]:
        body = await self.request("POST", "/sync", json={"final": final})
        return body if isinstance(body, dict) else {}


class LabClients(PoolClients):
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
        super().__init__(
            topology, token=token, loopback=loopback, pool_urls=pool_urls,
            transports=transports, timeout=timeout,
        )
        token = token_from_env(token)
        transports = dict(transports or {})
        self.backups: dict[str, BackupClient] = {}
        for p in topology.pools:
            if p.backup:
                burl = (backup_urls or {}).get(p.fqdn) or backup_control_url(
                    topology, p.fqdn, loopback=loopback
                )
                self.backups[p.fqdn] = BackupClient(
                    p.fqdn, burl, token=token, transport=transports.get(burl), timeout=timeout
                )

    def backup(self, fqdn: str) -> BackupClient | None:
        return self.backups.get(fqdn.lower())

    def _every_client(self) -> list[ControlClient]:
        return [*self.pools.values(), *self.backups.values()]

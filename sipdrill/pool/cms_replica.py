"""This pool's replica of the Central Management Store, as the pool uses it.

Every pool holds a replica (:class:`~sipdrill.cms.store.CmsStore`, served on
the pool's control API); the pool reads the user homing Move-CsUser records
there, and the timers with the CMS's overrides. A change to the user homing
goes through the active master (:func:`~sipdrill.cms.operations.cms_update`),
which the pool reaches with the clients of every pool's control API.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

from fastapi import APIRouter

from sipdrill.cms.operations import cms_update, cms_views, require_cms
from sipdrill.cms.store import CmsConfigPatch, CmsStore, cms_router
from sipdrill.pool.client import PoolClients
from sipdrill.topology import Timers, Topology


class CmsReplica:
    """The CMS as the pool ``fqdn`` sees it; ``token`` and ``loopback`` reach
    the other pools' control APIs."""

    def __init__(
        self, topology: Topology, fqdn: str, *, token: str | None, loopback: bool
    ) -> None:
        self.topology = topology
        self.fqdn = fqdn
        self._token = token
        self._loopback = loopback
        #: The replica, once opened.
        self.store: CmsStore | None = None
        #: Its user homing, cached per document version.
        self._homing: dict[str, str] = {}
        self._version: tuple[int, int] | None = None

    def open(self, state_dir: Path) -> APIRouter:
        """Open the replica in ``state_dir``/cms; its routes, for the control API."""
        store_dir = state_dir / "cms"
        self.store = CmsStore(store_dir, self.fqdn, self.topology)
        router = cms_router(store_dir, self.fqdn, self.topology, store=self.store)
        self.refresh()
        return router

    def refresh(self) -> None:
        """Pick up the replica's user homing when its document changed
        (replication from the master arrives through the CMS routes)."""
        if self.store is None:
            return
        doc = self.store.state().document
        version = (doc.generation, doc.version)
        if version != self._version:
            self._version = version
            self._homing = {
                uri.lower(): pool.lower() for uri, pool in doc.config.user_homing.items()
            }

    def home_of(self, aor: str) -> str | None:
        """The home pool the CMS records for ``aor`` (Move-CsUser), if any."""
        return self._homing.get(aor.lower())

    def timers(self) -> Timers:
        """The topology's timers with the CMS's overrides."""
        if self.store is not None:
            return self.store.effective_timers()
        return self.topology.timers

    def role(self) -> str | None:
        if self.store is not None:
            role: str = self.store.state().role.value
            return role
        if self.topology.cms.active == self.fqdn:
            return "active"
        if self.topology.cms_standby == self.fqdn:
            return "standby"
        return None

    def _clients(self) -> PoolClients:
        """Clients of every pool's control API (the CMS replicas)."""
        return PoolClients(self.topology, token=self._token, loopback=self._loopback)

    async def require_master(self) -> list[str]:
        """Refuse (``cms-unavailable``) when no master can take changes; the
        pools that did not answer."""
        async with self._clients() as clients:
            views = await cms_views(self.topology, clients)
            silent = [p for p, v in views.items() if not v.reachable]
            await require_cms(self.topology, clients, silent)
        return silent

    def homed_users(self) -> list[str]:
        """The users the CMS records a home for (Move-CsUser's), lower case."""
        return list(self._homing)

    async def set_home(self, aor: str, home: str | None) -> None:
        """Record ``aor``'s home pool through the master (None: the topology's)."""
        await self.set_homes({aor: home})

    async def set_homes(
        self, homes: dict[str, str | None], *, skip: Collection[str] = ()
    ) -> None:
        """Record several users' home pools in one change of the CMS (``skip``:
        pools known not to answer, not waited for)."""
        async with self._clients() as clients:
            await cms_update(self.topology, clients, CmsConfigPatch(user_homing=homes), skip)
        self.refresh()

"""Move-CsUser between pools, as the target pool runs it (:meth:`UserMoves.move`).

The target writes the account first, then records the user's new home in
the CMS and in its own state, then has the source drop its stale account
(now, or when the source answers again: ``pending_deletes``, retried by the
housekeeping), then sends the user's clients registered here to register
again. A pool that learns of a move another way (the source side's delete,
a replicated account) records it too (:meth:`UserMoves.record`).
"""

from __future__ import annotations

import asyncio
import base64
import logging
from dataclasses import asdict
from typing import Any, Protocol

import httpx

from sipdrill import addresses
from sipdrill.errors import OperationError
from sipdrill.pool.cms_replica import CmsReplica
from sipdrill.pool.state_file import PoolStateFile
from sipdrill.pool.store import UserStore
from sipdrill.pool.userdata import MoveResult

log = logging.getLogger("sipdrill.pool")

#: How long a pool waits for another pool's control API (Move-CsUser).
PEER_HTTP_TIMEOUT = 5.0


class MovingPool(Protocol):
    """What a move uses of the pool that runs it."""

    fqdn: str
    pool_names: frozenset[str]

    @property
    def store(self) -> UserStore: ...

    def store_uri(self, aor: str) -> str: ...

    def home_of(self, aor: str) -> str | None: ...

    def topology_home(self, aor: str) -> str | None: ...

    def topology_users(self) -> list[str]:
        """Every user the topology names (lower case)."""
        ...

    def reevaluate(self, reason: str) -> object:
        """Registered users whose mode or pool changed must register again."""
        ...


class UserMoves:
    """``state`` keeps the moves and the clean-ups owed; ``token`` and
    ``loopback`` reach the other pools' control APIs."""

    def __init__(
        self, pool: MovingPool, state: PoolStateFile, cms: CmsReplica,
        *, token: str | None, loopback: bool, retry_interval: float,
    ) -> None:
        self.pool = pool
        self.fqdn = pool.fqdn
        self.state = state
        self.cms = cms
        self._token = token
        self.loopback = loopback
        self._retry_interval = retry_interval
        self._retry_after = 0.0
        self.http: httpx.AsyncClient | None = None

    def start(self) -> None:
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
        self.http = httpx.AsyncClient(timeout=PEER_HTTP_TIMEOUT, headers=headers)

    async def close(self) -> None:
        if self.http is not None:
            await self.http.aclose()
            self.http = None

    async def record(self, aor: str, pool: str) -> None:
        """``aor`` lives on ``pool`` now (kept only where the topology says otherwise)."""
        async with self.state.lock:
            if self.pool.topology_home(aor) == pool:
                self.state.moves.pop(aor, None)
            else:
                self.state.moves[aor] = pool
            await self.state.save()

    async def _peer(self, method: str, pool: str, path: str, **kw: Any) -> httpx.Response | None:
        """A call to another pool's control API; None when it cannot be reached."""
        assert self.http is not None
        url = addresses.pool_control_url(self.cms.topology, pool, loopback=self.loopback)
        try:
            return await self.http.request(method, url + path, **kw)
        except httpx.HTTPError as exc:
            log.info("%s %s on %s: %s", method, path, pool, exc)
            return None

    async def move(self, user: str, to: str, force: bool) -> dict[str, Any]:
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
        if target not in self.pool.pool_names:
            raise OperationError(
                "unknown-pool",
                f"the target pool is not a pool of this lab "
                f"(pools: {', '.join(sorted(self.pool.pool_names))})",
                404,
            )
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
        store = self.pool.store
        uri = self.pool.store_uri(user)
        local = store.get_user(uri)
        # Lync: "if the CMS is unavailable, you lose the ability to conduct
        # moves" (seed 001, docs/sources.md). Checked before anything is written.
        await self.cms.require_master()
        if local is not None and local.home_pool == self.fqdn:
            recorded = self.cms.home_of(key) or self.pool.topology_home(key)
            if recorded == self.fqdn and key not in self.state.pending_deletes:
                raise OperationError("same-pool", f"{user} is already homed on {self.fqdn}", 409)
            # An interrupted move: the account is here, the CMS or the old
            # pool do not know yet. Finish it.
            pending = self.state.pending_deletes.get(key, {}).get("pool")
            previous = pending or recorded or self.fqdn
            await self._finish(key, uri, previous)
            return asdict(MoveResult(uri, previous, self.fqdn, force, 0, 0, 0, 0)) | {
                "source_cleaned": key not in self.state.pending_deletes, "counted_from": "nothing",
            }
        source = local.home_pool if local is not None else self.pool.home_of(key)
        if source is None or source == self.fqdn:
            raise OperationError("unknown-user", "no pool has an account for this user", 404)
        store.require_writable()
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
            contacts = store.contacts(uri)
            conferences = [(c.conf_id, c.subject, c.content) for c in store.conferences(uri)]
            settings = dict(local.settings)
        else:
            contacts, conferences, settings = [], [], {}

        def write_target() -> None:
            with store.batch():
                if store.get_user(uri) is not None:
                    store.delete_user(uri)
                store.upsert_user(uri, home_pool=self.fqdn, settings=settings)
                if not force:
                    store.replace_contacts(uri, contacts)
                    for conf_id, subject, content in conferences:
                        store.schedule_conference(uri, conf_id, subject=subject, content=content)

        await asyncio.to_thread(write_target)
        await self._finish(key, uri, source)
        deleted = key not in self.state.pending_deletes
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

    async def _finish(self, key: str, uri: str, source: str) -> None:
        """After the target holds the account: the CMS's user homing, this
        pool's own record, the source's stale account (now, or when it
        answers again), and the user's registrations here."""
        home = None if self.pool.topology_home(key) == self.fqdn else self.fqdn
        await self.cms.set_home(key, home)
        await self.record(key, self.fqdn)
        if source != self.fqdn and not await self._delete_at_source(uri, source):
            async with self.state.lock:
                self.state.pending_deletes[key] = {
                    "uri": uri, "pool": source, "moved_to": self.fqdn,
                }
                await self.state.save()
        elif key in self.state.pending_deletes:
            async with self.state.lock:
                self.state.pending_deletes.pop(key, None)
                await self.state.save()
        # Clients of the user registered here (e.g. in resiliency mode) must
        # register again to get full service from their new home.
        self.pool.reevaluate(f"move {key}")

    async def user_at(self, pool: str, uri: str) -> dict[str, Any] | None:
        """``uri``'s account and data on ``pool`` (None: it has none); raises
        ``pool-down`` when the pool does not answer, or its refusal."""
        response = await self._peer("GET", pool, f"/users/{uri}")
        if response is None:
            raise OperationError("pool-down", f"{pool} did not answer for {uri}", 503)
        if response.status_code == 404:
            return None
        _raise_for(response)
        data: dict[str, Any] = response.json()
        return data

    async def delete_at_source(self, uri: str, source: str) -> bool:
        """Have ``source`` drop ``uri``'s stale account; False if it did not answer."""
        return await self._delete_at_source(uri, source)

    async def _delete_at_source(self, uri: str, source: str) -> bool:
        response = await self._peer(
            "DELETE", source, f"/users/{uri}", params={"moved_to": self.fqdn}
        )
        return response is not None and response.status_code in (200, 404)

    async def retry_pending(self) -> None:
        """Clean-ups owed to pools that were down during a forced move."""
        loop = asyncio.get_running_loop()
        if not self.state.pending_deletes or loop.time() < self._retry_after:
            return
        self._retry_after = loop.time() + self._retry_interval
        for key, item in list(self.state.pending_deletes.items()):
            if await self._delete_at_source(item["uri"], item["pool"]):
                log.info("removed %s's stale account from %s", item["uri"], item["pool"])
                async with self.state.lock:
                    self.state.pending_deletes.pop(key, None)
                    await self.state.save()


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

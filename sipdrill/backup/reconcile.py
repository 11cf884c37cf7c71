"""What the Backup Service tells a pool that missed a failover state change
while it was down, and the pairing and state reads that pool failover and
failback share with it."""

from __future__ import annotations

import asyncio

from sipdrill.cms.operations import cms_views
from sipdrill.errors import OperationError
from sipdrill.pool.client import PoolClient, PoolClients
from sipdrill.pool.state import FailoverState
from sipdrill.topology import Topology


def pair_of(topology: Topology, home_pool: str) -> tuple[str, str]:
    """``(home, backup)``: the pool that homes the users and its paired backup
    pool; refused (404, 409) for an unknown or unpaired pool."""
    home = home_pool.lower()
    try:
        pool = topology.pool(home)
    except KeyError:
        raise OperationError(
            "unknown-pool", f"{home} is not a pool of topology {topology.name}", 404
        ) from None
    if pool.backup is None:
        raise OperationError(
            "no-backup-pool",
            f"pool {home} has no paired backup pool, so its users cannot fail over or back",
            409,
        )
    return home, pool.backup


async def failover_states_or_none(client: PoolClient) -> dict[str, FailoverState] | None:
    """The pool's failover states, or None if it does not answer."""
    try:
        return await client.failover_states(time_limit=5.0)
    except OSError:
        return None
    except OperationError as exc:
        if exc.http_status == 503 or exc.code == "unreachable":
            return None
        raise


async def reconcile_failover_states(
    topology: Topology, clients: PoolClients, home_pool: str
) -> list[str]:
    """Bring a pool that missed a disaster-mode operation up to date.

    After a disaster-mode failback the backup pool, down at the time, comes
    back still serving the home pool's users (FailedOver) while the home pool
    says FailedBack: tell the backup that the users went home. The CMS record
    decides when it exists. (The opposite case, a home pool back from a
    disaster-mode failover, is the Backup Service's fence.) The events sent.
    """
    home, backup = pair_of(topology, home_pool)
    hc, bc = clients.pool(home), clients.pool(backup)
    hs, bs = await asyncio.gather(failover_states_or_none(hc), failover_states_or_none(bc))
    if hs is None or bs is None:
        return []
    if not (
        bs.get(home) is FailoverState.FAILED_OVER and hs.get(home) is FailoverState.FAILED_BACK
    ):
        return []
    views = await cms_views(topology, clients)
    newest = max((v for v in views.values() if v.reachable), key=lambda v: v.order(), default=None)
    raw = ((newest.document or {}).get("config") or {}).get("pool_failover", {}).get(home) if (
        newest is not None
    ) else None
    if raw is not None and raw.get("state") != FailoverState.FAILED_BACK.value:
        return []
    sent = []
    for event in ("failback_started", "failback_completed"):
        await bc.failover_event(home, event, True)
        sent.append(f"{backup}: {event} {home}")
    return sent

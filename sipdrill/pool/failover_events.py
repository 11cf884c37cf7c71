"""The pool's side of pool failover and failback (``/failover/state`` on the
control API): every step of the administrator's command is an event on the
pairing's state table, saved with the pool's state before the pool acts on
it; a completed failover or failback records the serving pool on the home
pool's accounts, and every step sends the users whose mode or pool changed
to register again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Protocol

from sipdrill.errors import OperationError
from sipdrill.pool.metrics import PoolMetrics
from sipdrill.pool.state import FailoverEvent, PoolFailoverStates
from sipdrill.pool.state_file import PoolStateFile
from sipdrill.pool.store import UserStore
from sipdrill.topology import Topology

log = logging.getLogger("sipdrill.pool")


class FailoverPool(Protocol):
    """What a failover event uses of its pool."""

    fqdn: str
    topology: Topology
    failover: PoolFailoverStates
    state_file: PoolStateFile
    metrics: PoolMetrics

    @property
    def store(self) -> UserStore: ...

    def reevaluate(self, reason: str) -> dict[str, object]: ...


def parse_failover_event(name: str) -> FailoverEvent:
    """The contract spells events with underscores, the state table with hyphens."""
    try:
        return FailoverEvent(name.strip().lower().replace("_", "-"))
    except ValueError:
        events = ", ".join(e.value.replace("-", "_") for e in FailoverEvent)
        raise OperationError(
            "bad-event", f"unknown failover event; use {events}", 422
        ) from None


def failover_view(pool: FailoverPool) -> dict[str, Any]:
    """Every pairing, both ways, as this pool sees it."""
    failover = pool.failover
    pairs = []
    for a, b in pool.topology.pairs():
        for home, backup in ((a.fqdn, b.fqdn), (b.fqdn, a.fqdn)):
            state = failover.state(home)
            pairs.append({
                "home_pool": home,
                "backup_pool": backup,
                "state": state.value,
                "serving_pool": failover.serving_pool(home),
            })
    states = {h: s.value for h, s in failover.snapshot().items()}
    return {"pool": pool.fqdn, "states": states, "pairs": pairs}


async def failover_event(
    pool: FailoverPool, home_pool: str, event_name: str, disaster_mode: bool
) -> dict[str, Any]:
    event = parse_failover_event(event_name)
    home = home_pool.lower()
    pools = sorted(p.fqdn for p in pool.topology.pools)
    if home not in pools:
        raise OperationError(
            "unknown-pool", f"home_pool is not a pool of this lab (pools: {', '.join(pools)})", 404
        )
    failover, state_file = pool.failover, pool.state_file
    async with state_file.lock:
        new = failover.handle(home, event)
        state_file.last_failover_event = {
            "home_pool": home, "event": event.value, "state": new.value,
            "disaster_mode": disaster_mode, "at": time.time(),
        }
        await state_file.save()
    pool.metrics.failover_events.labels(event.value).inc()
    log.warning("failover: %s for %s%s -> %s", event.value, home,
                " (disaster mode)" if disaster_mode else "", new.value)
    reassigned = 0
    if event in (FailoverEvent.FAILOVER_COMPLETED, FailoverEvent.FAILBACK_COMPLETED):
        serving = failover.serving_pool(home)
        store = pool.store
        if not store.read_only:
            try:
                reassigned = await asyncio.to_thread(store.reassign_serving_pool, home, serving)
            except OperationError as exc:
                log.warning("could not record %s as serving %s: %s", serving, home, exc)
    summary = pool.reevaluate(f"{event.value} {home}")
    return {
        "pool": pool.fqdn,
        "home_pool": home,
        "backup_pool": failover.backup_of(home),
        "event": event.value.replace("-", "_"),
        "state": new.value,
        "serving_pool": failover.serving_pool(home),
        "disaster_mode": disaster_mode,
        "serving_pool_recorded": reassigned,
        "reevaluated": summary,
    }

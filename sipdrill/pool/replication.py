"""The pool's end of the Backup Service's replication: its change feed read
out a page at a time, a batch of the partner's feed applied here, and the
read-only flag pool failover puts on a failed pool's store
(``/replication/...`` on the control API).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from sipdrill.errors import OperationError
from sipdrill.pool.moves import UserMoves
from sipdrill.pool.store import Change, ChangeOp, Entity, UserStore

log = logging.getLogger("sipdrill.pool")


class ReplicatedPool(Protocol):
    """What replication uses of its pool."""

    fqdn: str
    pool_names: frozenset[str]
    user_moves: UserMoves

    @property
    def store(self) -> UserStore: ...

    def home_of(self, aor: str) -> str | None: ...


def change_json(c: Change) -> dict[str, Any]:
    """One change as the feed sends it."""
    return {
        "seq": c.seq,
        "op": c.op.value,
        "entity": c.entity.value,
        "key": c.key,
        "payload": dict(c.payload),
        "origin_pool": c.origin_pool,
        "timestamp": c.timestamp,
    }


async def changes(pool: ReplicatedPool, since: int, limit: int) -> dict[str, Any]:
    """The changes after ``since`` (at most ``limit``), with the feed's position."""
    store = pool.store

    def page() -> dict[str, Any]:
        changes = store.changes_since(since, limit)
        return {
            "pool": pool.fqdn,
            "high_water_mark": store.high_water_mark(),
            "read_only": store.read_only,
            "changes": [change_json(c) for c in changes],
        }

    return await asyncio.to_thread(page)


async def apply_changes(
    pool: ReplicatedPool, source_pool: str, changes: Sequence[Mapping[str, Any]]
) -> dict[str, int]:
    """Apply a batch of ``source_pool``'s feed (see :meth:`UserStore.apply_changes`)."""
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
    applied = await asyncio.to_thread(pool.store.apply_changes, batch, source)
    # A replicated account tells where its user lives now (a move on
    # the partner): remember it so this pool routes and redirects right.
    for ch in batch:
        if ch.entity is Entity.USER and ch.op is ChangeOp.UPSERT:
            uri, home = str(ch.payload["uri"]).lower(), str(ch.payload["home_pool"])
            if pool.home_of(uri) != home and home in pool.pool_names:
                await pool.user_moves.record(uri, home)
    return {"applied": applied, "last_applied": pool.store.last_applied(source)}


async def set_read_only(pool: ReplicatedPool, read_only: bool) -> bool:
    await asyncio.to_thread(pool.store.set_read_only, read_only)
    log.warning("user store of %s is now %s", pool.fqdn,
                "read-only" if read_only else "writable")
    return pool.store.read_only

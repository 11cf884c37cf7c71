"""The pool's end of the Backup Service's replication: its change feed read
out a page at a time, a batch of the partner's feed applied here, and the
read-only flag pool failover puts on a failed pool's store
(``/replication/...`` on the control API).
"""

from __future__ import annotations

import asyncio
import base64
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


#: What each kind of change carries (the store's rows: :func:`sipdrill.pool.store._params`).
_PAYLOADS: dict[tuple[ChangeOp, Entity], dict[str, type]] = {
    (ChangeOp.UPSERT, Entity.USER): {
        "uri": str, "home_pool": str, "serving_pool": str, "settings": dict,
    },
    (ChangeOp.DELETE, Entity.USER): {"uri": str},
    (ChangeOp.UPSERT, Entity.CONTACT): {"owner": str, "contact": str},
    (ChangeOp.DELETE, Entity.CONTACT): {"owner": str, "contact": str},
    (ChangeOp.UPSERT, Entity.CONFERENCE): {
        "organiser": str, "conf_id": str, "subject": str, "content": str,
    },
    (ChangeOp.DELETE, Entity.CONFERENCE): {"organiser": str, "conf_id": str},
}


def _change(i: int, c: Mapping[str, Any]) -> Change:
    """One change of a batch, checked: a payload the store could not apply
    is refused before anything is (messages say where, not what was sent)."""
    try:
        op, entity = ChangeOp(c["op"]), Entity(c["entity"])
        change = Change(
            int(c["seq"]), op, entity, str(c["key"]), dict(c["payload"]),
            str(c["origin_pool"]), float(c["timestamp"]),
        )
    except KeyError as exc:
        raise OperationError("bad-changes", f"changes[{i}]: no {exc.args[0]}", 422) from None
    except (ValueError, TypeError):
        raise OperationError(
            "bad-changes", f"changes[{i}]: a value of the wrong kind", 422
        ) from None
    fields = _PAYLOADS[(op, entity)]
    for name, kind in fields.items():
        if not isinstance(change.payload.get(name), kind):
            wanted = ", ".join(f"{k} ({v.__name__})" for k, v in fields.items())
            raise OperationError(
                "bad-changes",
                f"changes[{i}].payload: {op.value} {entity.value} needs {wanted}",
                422,
            )
    if entity is Entity.CONFERENCE and op is ChangeOp.UPSERT:
        try:
            base64.b64decode(change.payload["content"], validate=True)
        except ValueError:
            raise OperationError(
                "bad-changes", f"changes[{i}].payload.content: not base64", 422
            ) from None
    return change


async def apply_changes(
    pool: ReplicatedPool, source_pool: str, changes: Sequence[Mapping[str, Any]]
) -> dict[str, int]:
    """Apply a batch of ``source_pool``'s feed (see :meth:`UserStore.apply_changes`)."""
    source = source_pool.lower()
    if source not in pool.pool_names:
        raise OperationError(
            "unknown-pool",
            f"source_pool is not a pool of this lab (pools: {', '.join(sorted(pool.pool_names))})",
            404,
        )
    batch = [_change(i, c) for i, c in enumerate(changes)]
    for i, ch in enumerate(batch):
        if ch.entity is Entity.USER and ch.op is ChangeOp.UPSERT:
            for name in ("home_pool", "serving_pool"):
                if str(ch.payload[name]).lower() not in pool.pool_names:
                    raise OperationError(
                        "bad-changes", f"changes[{i}].payload.{name}: not a pool of this lab", 422
                    )
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

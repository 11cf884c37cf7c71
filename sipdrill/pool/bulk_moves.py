"""Move-CsUser over a filtered Get-CsUser: every user homed on one pool,
moved to this one in one request, paced, with progress (seed 001's "Move all
users to pool..." with Force, the budget DR design's first recovery step).

Run by the target pool (:func:`move_pool_users`), like a single move
(:mod:`.moves`), but with what a thousand single moves would repeat done
once: the CMS master is checked once, the source pool is probed once (a
forced move whose source is down does not wait for it user by user), the
user homing goes to the CMS in one change per batch, and the clients here are
asked to register again once per batch.

All or nothing per user: a user's account is written in one transaction; if
the CMS then refuses the batch's homing, the batch's accounts are put back as
they were and its users are reported failed, and the users after it are not
attempted (the CMS is gone for them too). Running the same move again moves
whoever is still homed on the source.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from sipdrill import addresses
from sipdrill.errors import OperationError
from sipdrill.pool.moves import UserMoves
from sipdrill.pool.store import ConferenceRecord, UserRecord, UserStore

#: Users per second by default: Lync moves users one by one, and each moved
#: user's clients register again.
DEFAULT_RATE = 20.0
#: How long the source pool may take to answer the probe before it counts as down.
SOURCE_PROBE_TIMEOUT = 2.0

Progress = Callable[[dict[str, Any]], None]


@dataclass
class _Previous:
    """A user's account on the target before the move wrote it (to put back)."""

    record: UserRecord | None
    contacts: list[str] = field(default_factory=list)
    conferences: list[ConferenceRecord] = field(default_factory=list)


@dataclass(frozen=True)
class _Written:
    """One user's account written here, not yet homed in the CMS."""

    uri: str
    previous: _Previous
    counted_from: str
    contacts: int
    conferences: int


@dataclass
class _Tally:
    moved: list[str] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)
    contacts_moved: int = 0
    conferences_moved: int = 0
    contacts_lost: int = 0
    conferences_lost: int = 0
    counted_from: dict[str, int] = field(default_factory=dict)
    pending_cleanups: int = 0


def users_homed_on(moves: UserMoves, pool: str) -> list[str]:
    """Get-CsUser -Filter {RegistrarPool -eq pool}: the directory's view (the
    CMS's user homing, else the topology), sorted."""
    candidates = set(moves.pool.topology_users()) | set(moves.cms.homed_users())
    return sorted(k for k in candidates if moves.pool.home_of(k) == pool)


async def _probe(moves: UserMoves, pool: str) -> bool:
    assert moves.http is not None
    url = addresses.pool_control_url(moves.cms.topology, pool, loopback=moves.loopback)
    try:
        r = await moves.http.get(url + "/health", timeout=SOURCE_PROBE_TIMEOUT)
    except httpx.HTTPError:
        return False
    return r.status_code == 200


def _snapshot(store: UserStore, uri: str) -> _Previous:
    rec = store.get_user(uri)
    if rec is None:
        return _Previous(None)
    return _Previous(rec, store.contacts(uri), store.conferences(uri))


def _restore(store: UserStore, uri: str, previous: _Previous) -> None:
    """Put ``uri``'s account on the target back as it was before the move."""
    with store.batch():
        if store.get_user(uri) is not None:
            store.delete_user(uri)
        rec = previous.record
        if rec is None:
            return
        store.upsert_user(uri, home_pool=rec.home_pool, settings=rec.settings)
        store.replace_contacts(uri, previous.contacts)
        for c in previous.conferences:
            store.schedule_conference(uri, c.conf_id, subject=c.subject, content=c.content)


@dataclass(frozen=True)
class MovePlan:
    """A checked bulk move, before its first write."""

    source: str
    users: tuple[str, ...]
    source_up: bool
    force: bool
    rate: float
    #: Pools that did not answer the CMS check: each batch's CMS change does
    #: not wait for them again (a cut pool costs a probe timeout every time).
    silent: tuple[str, ...] = ()


async def plan_move(moves: UserMoves, from_pool: str, *, force: bool, rate: float) -> MovePlan:
    """Check a move of every user homed on ``from_pool`` to this pool: refused
    before any write (``unknown-pool``, ``same-pool``, ``no-users``,
    ``cms-unavailable``, ``read-only``, and ``pool-down`` when the source does
    not answer and ``force`` is not given)."""
    pool, store = moves.pool, moves.pool.store
    source = from_pool.lower()
    if source not in pool.pool_names:
        raise OperationError(
            "unknown-pool",
            "the source pool is not a pool of this lab; pools: "
            + ", ".join(sorted(pool.pool_names)),
            404,
        )
    if source == moves.fqdn:
        raise OperationError("same-pool", f"{source} is the target pool itself", 409)
    if not rate > 0:
        raise OperationError("bad-rate", f"rate {rate} users/s: give a positive rate", 422)
    store.require_writable()
    silent = await moves.cms.require_master()
    users = users_homed_on(moves, source)
    if not users:
        raise OperationError(
            "no-users", f"no user is homed on {source} (moved already?): nothing to move", 404
        )
    source_up = await _probe(moves, source)
    if not force and not source_up:
        raise OperationError(
            "pool-down",
            f"the source pool {source} does not answer; only Move-CsUser -Force can move its "
            f"{len(users)} users, and their contacts and meetings are then lost",
            503,
        )
    return MovePlan(source, tuple(users), source_up, force, rate, tuple(silent))


async def move_pool_users(
    moves: UserMoves,
    from_pool: str,
    *,
    force: bool,
    rate: float = DEFAULT_RATE,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Move every user homed on ``from_pool`` to this pool (``moves.fqdn``):
    :func:`plan_move`, then :func:`run_move`."""
    plan = await plan_move(moves, from_pool, force=force, rate=rate)
    return await run_move(moves, plan, progress)


async def run_move(
    moves: UserMoves, plan: MovePlan, progress: Progress | None = None
) -> dict[str, Any]:
    """Run a checked move; the users moved and those that failed, with why."""
    source, users, source_up, force, rate = (
        plan.source, list(plan.users), plan.source_up, plan.force, plan.rate
    )
    started = time.monotonic()
    tally = _Tally()
    batch_size = max(1, int(rate))
    total = len(users)

    def report(event: str) -> None:
        if progress is not None:
            progress({
                "event": event, "total": total, "moved": len(tally.moved),
                "failed": len(tally.failed), "elapsed": round(time.monotonic() - started, 3),
            })

    report("started")
    for i in range(0, total, batch_size):
        batch_start = time.monotonic()
        batch = users[i : i + batch_size]
        written: dict[str, _Written] = {}
        for key in batch:
            try:
                written[key] = await _write_user(moves, key, source, force, source_up)
            except OperationError as exc:
                tally.failed.append({"user": key, "code": exc.code, "message": exc.message})
                continue
            except Exception as exc:  # one user's failure must not stop the others
                tally.failed.append(
                    {"user": key, "code": "error", "message": f"{type(exc).__name__}: {exc}"}
                )
                continue
        if written and not await _home_batch(moves, written, plan.silent, tally):
            attempted = set(batch)
            tally.failed += [
                {"user": k, "code": "not-attempted",
                 "message": "not attempted: the CMS refused the batch before it"}
                for k in users[i + batch_size :] if k not in attempted
            ]
            break
        if written:
            await _after_homing(moves, written, source, source_up, force, tally)
        report("progress")
        # Pace: a batch a second at ``rate`` users per second.
        left = batch_size / rate - (time.monotonic() - batch_start)
        if left > 0 and i + batch_size < total:
            await asyncio.sleep(left)
    duration = time.monotonic() - started
    report("finished")
    return {
        "operation": "move-all",
        "source_pool": source,
        "target_pool": moves.fqdn,
        "force": force,
        "source_answered": source_up,
        "total": total,
        "moved": len(tally.moved),
        "failed": tally.failed,
        "users": tally.moved,
        "contacts_moved": tally.contacts_moved,
        "conferences_moved": tally.conferences_moved,
        "contacts_lost": tally.contacts_lost,
        "conferences_lost": tally.conferences_lost,
        "counted_from": tally.counted_from,
        "pending_source_cleanups": tally.pending_cleanups,
        "rate": rate,
        "duration": round(duration, 3),
    }


async def _write_user(
    moves: UserMoves, key: str, source: str, force: bool, source_up: bool
) -> _Written:
    """Write one user's account on this pool (one transaction); what was there before."""
    pool, store = moves.pool, moves.pool.store
    uri = pool.store_uri(key)
    previous = await asyncio.to_thread(_snapshot, store, uri)
    local = previous.record
    data: dict[str, Any] | None = None
    if source_up:
        data = await moves.user_at(source, uri)
        if data is None and not force:
            raise OperationError(
                "unknown-user", f"{source} has no account for {uri}; use -Force", 404
            )
    if data is not None:
        contacts = list(data["contacts"])
        conferences = [
            (c["conf_id"], c["subject"], base64.b64decode(c["content"]))
            for c in data["conferences"]
        ]
        settings = dict(data["settings"])
        counted = "source"
    elif local is not None:
        # This pool's Backup Service replica: it may lag by a sync interval,
        # as the real loss would.
        contacts = previous.contacts
        conferences = [(c.conf_id, c.subject, c.content) for c in previous.conferences]
        settings = dict(local.settings)
        counted = "replica"
    else:
        contacts, conferences, settings = [], [], {}
        counted = "nothing"

    def write() -> None:
        with store.batch():
            if store.get_user(uri) is not None:
                store.delete_user(uri)
            store.upsert_user(uri, home_pool=moves.fqdn, settings=settings)
            if not force:
                store.replace_contacts(uri, contacts)
                for conf_id, subject, content in conferences:
                    store.schedule_conference(uri, conf_id, subject=subject, content=content)

    await asyncio.to_thread(write)
    return _Written(uri, previous, counted, len(contacts), len(conferences))


async def _home_batch(
    moves: UserMoves, written: dict[str, _Written], silent: tuple[str, ...], tally: _Tally
) -> bool:
    """Record the batch's users as homed here in the CMS, in one change; on a
    refusal put their accounts back and report them failed."""
    homes = {
        key: None if moves.pool.topology_home(key) == moves.fqdn else moves.fqdn
        for key in written
    }
    try:
        await moves.cms.set_homes(homes, skip=silent)
    except OperationError as exc:
        for key, w in written.items():
            await asyncio.to_thread(_restore, moves.pool.store, w.uri, w.previous)
            tally.failed.append({
                "user": key, "code": exc.code,
                "message": f"{exc.message} (its account here was put back as it was)",
            })
        return False
    return True


async def _after_homing(
    moves: UserMoves,
    written: dict[str, _Written],
    source: str,
    source_up: bool,
    force: bool,
    tally: _Tally,
) -> None:
    """The moves this pool records, the source's stale accounts (now, or when
    it answers again) and the clients registered here."""
    cleaned: set[str] = set()
    if source_up:
        results = await asyncio.gather(
            *(moves.delete_at_source(w.uri, source) for w in written.values())
        )
        cleaned = {key for key, ok in zip(written, results, strict=True) if ok}
    async with moves.state.lock:
        for key, w in written.items():
            if moves.pool.topology_home(key) == moves.fqdn:
                moves.state.moves.pop(key, None)
            else:
                moves.state.moves[key] = moves.fqdn
            if key in cleaned:
                moves.state.pending_deletes.pop(key, None)
            else:
                moves.state.pending_deletes[key] = {
                    "uri": w.uri, "pool": source, "moved_to": moves.fqdn,
                }
                tally.pending_cleanups += 1
        await moves.state.save()
    tally.moved += list(written)
    for w in written.values():
        tally.counted_from[w.counted_from] = tally.counted_from.get(w.counted_from, 0) + 1
        if force:
            tally.contacts_lost += w.contacts
            tally.conferences_lost += w.conferences
        else:
            tally.contacts_moved += w.contacts
            tally.conferences_moved += w.conferences
    moves.pool.reevaluate(f"move of {len(written)} users from {source}")


class BulkMoves:
    """The pool's bulk moves as the control API runs them: one at a time, in a
    task of its own (an administrator who closes the window does not stop a
    move half-way), its progress streamed as lines of JSON."""

    def __init__(self, moves: UserMoves) -> None:
        self.moves = moves
        self.task: asyncio.Task[dict[str, Any]] | None = None
        self.progress: dict[str, Any] | None = None
        self.last: dict[str, Any] | None = None

    async def start(
        self, from_pool: str, to: str, force: bool, rate: float
    ) -> AsyncIterator[bytes]:
        """Check the move (a refusal raises, nothing changed), start it, and
        return its lines: ``progress`` events, then ``result`` (or ``error``)."""
        target = to.lower()
        names = self.moves.pool.pool_names
        if target not in names:
            # Never the name as sent: an error answer echoes nothing of the request.
            raise OperationError(
                "unknown-pool",
                f"the target pool is not a pool of this lab (pools: {', '.join(sorted(names))})",
                404,
            )
        if target != self.moves.fqdn:
            raise OperationError(
                "not-target",
                f"a move to {target} runs on {target}'s control API, not {self.moves.fqdn}'s",
                409,
            )
        if self.task is not None and not self.task.done():
            raise OperationError(
                "busy", f"{self.moves.fqdn} is moving users already: {self.progress}", 409
            )
        plan = await plan_move(self.moves, from_pool, force=force, rate=rate)
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

        def on_progress(event: dict[str, Any]) -> None:
            self.progress = event
            queue.put_nowait(event)

        self.task = asyncio.create_task(run_move(self.moves, plan, on_progress), name="move-all")
        self.task.add_done_callback(self._done)
        return self._lines(self.task, queue)

    def _done(self, task: asyncio.Task[dict[str, Any]]) -> None:
        if not task.cancelled() and task.exception() is None:
            self.last = task.result()

    async def _lines(
        self, task: asyncio.Task[dict[str, Any]], queue: asyncio.Queue[dict[str, Any]]
    ) -> AsyncIterator[bytes]:
        while not (task.done() and queue.empty()):
            getter = asyncio.ensure_future(queue.get())
            await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                yield _line(getter.result())
            else:
                getter.cancel()
        try:
            yield _line({"event": "result", **task.result()})
        except OperationError as exc:
            yield _line({"event": "error", "code": exc.code, "message": exc.message})
        except Exception as exc:
            yield _line({"event": "error", "code": "error", "message": f"{exc!r}"})

    async def close(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    def status(self) -> dict[str, Any]:
        running = self.task is not None and not self.task.done()
        return {"running": running, "progress": self.progress, "last": self.last}


def _line(event: dict[str, Any]) -> bytes:
    return (json.dumps(event, sort_keys=True) + "\n").encode()

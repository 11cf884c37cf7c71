"""Pool failover and failback (Invoke-CsPoolFailOver / Invoke-CsPoolFailBack)
as library functions over the lab's HTTP clients.

Both take ``home_pool``: the pool that homes the users (P1), for failover and
failback alike; its backup pool (P2) is the topology's pairing.

Failover, ``disaster_mode=False`` (P1 answers)::

    checks -> failover_started (P2, P1) -> P1 read-only -> final sync P1->P2
    -> CMS record -> failover_completed (P2, P1)

Nothing acknowledged by P1 is lost: P1 takes no writes once read-only, and
P2 takes over only once it has applied P1's feed up to P1's high-water mark.

Failover, ``disaster_mode=True``: no final sync. P2 takes over from what the
Backup Service had replicated; P1's writes above P2's position are the RPO
loss. They are counted now if P1 answers (its high-water mark minus P2's
position), else when P1 comes back (the position is kept in the CMS record;
:func:`pool_failback` and ``sipdrill admin backup status`` report them). P1's
Backup Service holds them while P1's users are failed over, so they never
overwrite what the users do on P2.

Failback::

    checks -> failback_started (P2, P1) -> sync P2->P1 until P1 has every
    change P2 took -> P1 writable -> CMS record -> failback_completed (P1, P2)

With ``disaster_mode`` the failback proceeds without P2: P1 takes its users
back with what the Backup Service had replicated from P2, and the users'
writes on P2 above P1's position are lost (counted now if P2 answers).

Every check runs before the first change, so a refusal
(:class:`~sipdrill.errors.OperationError`) changes nothing. A run that fails
half-way leaves the pools in FailingOver / FailingBack; running the same
operation again finishes it (the pools accept a repeated ``*_started``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from sipdrill.backup.client import LabClients
from sipdrill.backup.reconcile import failover_states_or_none, pair_of
from sipdrill.backup.service import SyncDirection, run_cycle
from sipdrill.cms.operations import active_master_of, cms_update, cms_views, require_cms
from sipdrill.cms.store import CmsConfigPatch, PoolFailoverRecord
from sipdrill.errors import OperationError
from sipdrill.pool.client import PoolClient
from sipdrill.pool.state import SERVED_BY_BACKUP, FailoverState
from sipdrill.topology import Topology

#: How long a failback waits for P2's changes to reach P1.
FAILBACK_SYNC_TIMEOUT = 3600.0


@dataclass
class OperationReport:
    """What a pool failover or failback did, with timings (seconds)."""

    operation: str  # failover | failback
    home_pool: str
    backup_pool: str
    disaster_mode: bool
    home_reachable: bool
    backup_reachable: bool
    #: The pool that serves the home pool's users afterwards.
    serving_pool: str = ""
    #: Changes shipped by the final sync (failover) or the sync home (failback).
    synced_changes: int = 0
    #: Failover: P2's position in P1's feed when it took over, and P1's
    #: high-water mark then (None when P1 did not answer).
    takeover_position: int | None = None
    home_high_water_mark: int | None = None
    #: Writes acknowledged that the serving pool does not have: the RPO loss
    #: of this operation. None: unknown until the other pool comes back.
    lost_writes: int | None = 0
    #: Failback after a disaster-mode failover: that failover's RPO loss, now
    #: that P1 is back to tell (its writes above the takeover position).
    failover_lost_writes: int | None = None
    notes: list[str] = field(default_factory=list)
    steps: list[tuple[str, float]] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class _Timer:
    def __init__(self, report: OperationReport, clock: Callable[[], float]) -> None:
        self.report = report
        self.clock = clock
        self.start = self.last = clock()

    def step(self, name: str) -> None:
        now = self.clock()
        self.report.steps.append((name, round(now - self.last, 6)))
        self.last = now

    def done(self) -> None:
        self.report.seconds = round(self.clock() - self.start, 6)


async def _hwm(client: PoolClient, since: int = 0) -> int:
    return (await client.changes(since, 1)).high_water_mark


async def _best_effort(coro: Any, report: OperationReport, what: str) -> bool:
    try:
        await coro
        return True
    except (OperationError, OSError) as exc:
        report.notes.append(f"{what}: {exc}")
        return False


async def _sync(
    clients: LabClients,
    source: str,
    target: str,
    *,
    final: bool,
    topology: Topology,
    until: int | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> int:
    """Replicate ``source`` -> ``target`` through ``source``'s Backup
    Service, or directly if it does not answer; until ``target`` has applied
    ``source``'s feed up to ``until`` (default: the high-water mark now).
    The number of changes applied."""
    src, dst = clients.pool(source), clients.pool(target)
    goal = until if until is not None else await _hwm(src)
    service = clients.backup(source)
    applied = 0
    deadline = clock() + FAILBACK_SYNC_TIMEOUT
    while True:
        result: dict[str, Any] | None = None
        if service is not None:
            try:
                result = await service.sync(final=final)
            except OSError:
                result = None
            except OperationError as exc:
                if exc.code not in ("unreachable",) and exc.http_status != 503:
                    raise
                result = None
        if result is None:
            # The service is away (site loss, crash): do its job from here.
            direction = SyncDirection(
                source, target, sync_interval=topology.timers.sync_interval
            )
            try:
                res = await run_cycle(direction, src, dst, final=final, budget=float("inf"))
            except (OperationError, OSError) as exc:
                res = None
                error = str(exc)
            if res is None or res.outcome == "error":
                raise OperationError(
                    "sync-failed",
                    f"replication {source} -> {target} failed: "
                    f"{res.error if res is not None else error}; what was applied stays "
                    "applied: run the same operation again to finish it",
                    503,
                )
            applied += res.applied
        else:
            if result.get("outcome") == "error":
                raise OperationError(
                    "sync-failed",
                    f"replication {source} -> {target} failed: {result.get('error')}",
                    503,
                )
            applied += int(result.get("applied", 0))
        position = await dst.position_of(source)
        if position >= goal:
            return applied
        if clock() > deadline:
            raise OperationError(
                "sync-timeout",
                f"{target} has applied {source}'s feed up to {position}, not {goal}, after "
                f"{FAILBACK_SYNC_TIMEOUT:.0f}s",
                503,
            )


async def pool_failover(
    topology: Topology,
    home_pool: str,
    disaster_mode: bool,
    clients: LabClients,
    *,
    clock: Callable[[], float] = time.monotonic,
    wall_clock: Callable[[], float] = time.time,
) -> OperationReport:
    """Invoke-CsPoolFailOver -PoolFqdn ``home_pool`` [-DisasterMode]."""
    home, backup = pair_of(topology, home_pool)
    hc, bc = clients.pool(home), clients.pool(backup)
    report = OperationReport("failover", home, backup, disaster_mode, False, False)
    timer = _Timer(report, clock)

    # --- checks: nothing changes before all pass ---------------------------
    backup_states, home_states = await asyncio.gather(
        failover_states_or_none(bc), failover_states_or_none(hc)
    )
    if backup_states is None:
        raise OperationError(
            "backup-pool-unreachable",
            f"the backup pool {backup} is unreachable: there is nowhere to fail {home}'s "
            "users over to",
            503,
        )
    report.backup_reachable = True
    report.home_reachable = home_states is not None
    if home_states is None and not disaster_mode:
        raise OperationError(
            "pool-unreachable",
            f"{home} is unreachable, so its last changes cannot be synced; run the failover "
            f"with --disaster-mode (writes on {home} after its last sync are then lost)",
            503,
        )
    views = [backup_states] + ([home_states] if home_states is not None else [])
    for states in views:
        if states.get(backup) in SERVED_BY_BACKUP:
            raise OperationError(
                "failover-order",
                f"the users of {backup} are failed over to {home} "
                f"({states[backup].value}); fail {backup} back before failing {home} over",
                409,
            )
    state = backup_states.get(home, FailoverState.ACTIVE)
    if state in (FailoverState.FAILED_OVER, FailoverState.FAILING_BACK):
        raise OperationError(
            "already-failed-over",
            f"the users of {home} are already served by {backup} ({state.value})",
            409,
        )
    await require_cms(topology, clients)
    timer.step("checks")

    # --- the failover ----------------------------------------------------------
    await bc.failover_event(home, "failover_started", disaster_mode)
    if report.home_reachable:
        await _best_effort(
            hc.failover_event(home, "failover_started", disaster_mode), report,
            f"{home} did not take failover_started",
        )
    timer.step("failover started")
    if report.home_reachable:
        made_read_only = await _best_effort(
            hc.set_read_only(True), report, f"{home} could not be made read-only"
        )
        if not made_read_only and not disaster_mode:
            raise OperationError(
                "pool-unreachable",
                f"{home} stopped answering before it was read-only; run the failover again, "
                "or with --disaster-mode",
                503,
            )
        timer.step("home read-only")
    if not disaster_mode:
        report.synced_changes = await _sync(
            clients, home, backup, final=True, topology=topology, clock=clock
        )
        timer.step("final sync")

    await bc.failover_event(home, "failover_completed", disaster_mode)
    timer.step("backup took over")
    # Read the position after the takeover: a sync cycle in flight when the
    # failover started may still have landed.
    report.takeover_position = await bc.position_of(home)
    if report.home_reachable:
        try:
            report.home_high_water_mark = await _hwm(hc, report.takeover_position)
        except (OperationError, OSError) as exc:
            report.notes.append(f"{home} did not tell its high-water mark: {exc}")
    if report.home_high_water_mark is not None:
        report.lost_writes = max(0, report.home_high_water_mark - report.takeover_position)
    else:
        report.lost_writes = None
        report.notes.append(
            f"{home} is unreachable: the writes it took after its last sync (above position "
            f"{report.takeover_position}) are lost; they are counted when {home} comes back "
            f"(sipdrill admin pool failback, sipdrill admin backup status --pool {home})"
        )
    if report.home_reachable:
        await _best_effort(
            hc.failover_event(home, "failover_completed", disaster_mode), report,
            f"{home} did not take failover_completed",
        )
    record = PoolFailoverRecord(
        backup_pool=backup,
        state=FailoverState.FAILED_OVER.value,
        disaster_mode=disaster_mode,
        takeover_position=report.takeover_position,
        home_high_water_mark=report.home_high_water_mark,
        failed_over_at=wall_clock(),
    )
    await _best_effort(
        cms_update(topology, clients, CmsConfigPatch(pool_failover={home: record})),
        report, "the CMS did not take the failover record",
    )
    timer.step("completed")
    report.serving_pool = backup
    timer.done()
    return report


async def pool_failback(
    topology: Topology,
    home_pool: str,
    disaster_mode: bool,
    clients: LabClients,
    *,
    clock: Callable[[], float] = time.monotonic,
    wall_clock: Callable[[], float] = time.time,
) -> OperationReport:
    """Invoke-CsPoolFailBack -PoolFqdn ``home_pool`` [-DisasterMode]."""
    home, backup = pair_of(topology, home_pool)
    hc, bc = clients.pool(home), clients.pool(backup)
    report = OperationReport("failback", home, backup, disaster_mode, False, False)
    timer = _Timer(report, clock)

    home_states, backup_states = await asyncio.gather(
        failover_states_or_none(hc), failover_states_or_none(bc)
    )
    if home_states is None:
        raise OperationError(
            "pool-unreachable",
            f"{home} is unreachable: it must be up to take its users back",
            503,
        )
    report.home_reachable = True
    report.backup_reachable = backup_states is not None
    if backup_states is None and not disaster_mode:
        raise OperationError(
            "backup-pool-unreachable",
            f"the backup pool {backup} is unreachable, so the changes {home}'s users made on it "
            "cannot come home; run the failback with --disaster-mode (they are then lost)",
            503,
        )
    cms = await require_cms(topology, clients)
    record: PoolFailoverRecord | None = None
    raw = ((cms.document or {}).get("config") or {}).get("pool_failover", {}).get(home)
    if raw is not None:
        record = PoolFailoverRecord.model_validate(raw)
    authority = backup_states if backup_states is not None else home_states
    state = authority.get(home, FailoverState.ACTIVE)
    if (
        state is FailoverState.FAILED_OVER
        and home_states.get(home) is FailoverState.FAILED_BACK
        and (record is None or record.state == FailoverState.FAILED_BACK.value)
    ):
        # Both pools disagree; the CMS says the users went home last.
        raise OperationError(
            "not-failed-over",
            f"{home} was failed back in disaster mode while {backup} was down, and {backup} "
            f"has not caught up yet; its Backup Service tells it on its next cycle "
            f"(sipdrill admin backup sync --pool {backup})",
            409,
        )
    if state not in (FailoverState.FAILED_OVER, FailoverState.FAILING_BACK):
        raise OperationError(
            "not-failed-over",
            f"the users of {home} are not failed over to {backup} ({state.value}); "
            "there is nothing to fail back",
            409,
        )
    timer.step("checks")

    home_state = home_states.get(home, FailoverState.ACTIVE)
    if home_state not in SERVED_BY_BACKUP or home_state is FailoverState.FAILING_OVER:
        # The home pool was down during a disaster-mode failover and never
        # heard of it, or was cut between its start and its end (seen in a
        # chaos run): bring its view up to date first. Its Backup Service
        # (the fence) may be telling it the same thing right now, as the pool
        # comes back: whoever is second finds the pool already moved on.
        for event in ("failover_started", "failover_completed"):
            try:
                await hc.failover_event(home, event, True)
            except OperationError as exc:
                now = (await failover_states_or_none(hc) or {}).get(home)
                if exc.code != "invalid-transition" or now not in SERVED_BY_BACKUP:
                    raise
                if now is not FailoverState.FAILING_OVER:
                    break  # already failed over: nothing left to tell
        report.notes.append(f"{home} had missed its failover (it was down); told it first")
    if report.backup_reachable:
        await bc.failover_event(home, "failback_started", disaster_mode)
    await hc.failover_event(home, "failback_started", disaster_mode)
    timer.step("failback started")

    # The earlier failover's RPO loss, now that the home pool can tell.
    if record is not None and record.takeover_position is not None:
        report.failover_lost_writes = await count_tail(
            hc, record.takeover_position, record.failed_over_at
        )
        if report.failover_lost_writes:
            report.notes.append(
                f"the {'disaster-mode ' if record.disaster_mode else ''}failover of {home} "
                f"lost {report.failover_lost_writes} write(s) {home} took after its last sync "
                f"(above position {record.takeover_position}): they were not on {backup} "
                f"during the failover; they are still on {home}'s disk, so they reappear now "
                f"and replicate to {backup} after this failback"
            )

    if report.backup_reachable:
        goal = await _hwm(bc)
        report.synced_changes = await _sync(
            clients, backup, home, final=False, topology=topology, until=goal, clock=clock
        )
        report.lost_writes = 0
        timer.step(f"sync {backup} -> {home}")
    else:
        position = await hc.position_of(backup)
        report.takeover_position = position
        report.lost_writes = None
        report.notes.append(
            f"{backup} is unreachable: the changes {home}'s users made on it after its last "
            f"sync (above position {position} of {backup}'s feed) are lost; `sipdrill admin "
            f"backup status --pool {backup}` counts them when {backup} is back"
        )
    if report.backup_reachable and disaster_mode:
        # Disaster mode with a reachable backup: nothing is lost after all.
        report.notes.append(f"{backup} answered, so its changes were synced home first")

    await hc.set_read_only(False)
    timer.step("home writable")
    await hc.failover_event(home, "failback_completed", disaster_mode)
    if report.backup_reachable:
        await _best_effort(
            bc.failover_event(home, "failback_completed", disaster_mode), report,
            f"{backup} did not take failback_completed",
        )
    # A fence of the Backup Service that was in flight when the failback
    # started may have made the pool read-only again: the failback wins.
    if (await hc.changes(0, 1)).read_only:
        await hc.set_read_only(False)
        report.notes.append(f"{home} had been made read-only again by its Backup Service; undone")
    timer.step("home took over")
    new_record = (
        record or PoolFailoverRecord(backup_pool=backup, state=FailoverState.FAILED_BACK.value)
    ).model_copy(
        update={
            "state": FailoverState.FAILED_BACK.value,
            "failback_disaster_mode": disaster_mode and not report.backup_reachable,
            "failback_position": await hc.position_of(backup),
            "failed_back_at": wall_clock(),
        }
    )
    await _best_effort(
        cms_update(topology, clients, CmsConfigPatch(pool_failover={home: new_record})),
        report, "the CMS did not take the failback record",
    )
    report.serving_pool = home
    timer.step("completed")
    timer.done()
    return report


# --- counting what a disaster-mode operation lost ---------------------------------


def _user_of(change: dict[str, Any]) -> str | None:
    payload = change.get("payload") or {}
    for key in ("uri", "owner", "organiser"):
        value = payload.get(key)
        if isinstance(value, str):
            return value
    return None


async def count_tail(
    client: PoolClient,
    after: int,
    until: float | None,
    *,
    homed_on: str | None = None,
    topology: Topology | None = None,
) -> int:
    """Changes in ``client``'s feed above ``after`` stamped at or before
    ``until`` (all of them if None); with ``homed_on``, only changes to the
    users homed on that pool (from the topology and the user rows in the
    feed; a user neither names is counted, erring towards reporting a loss).

    The feed keeps every change, so the count is the same before and after
    the tail has been shipped late."""
    homes = {u.uri: u.home_pool for u in topology.all_users()} if topology else {}
    count = 0
    position = after
    while True:
        page = await client.changes(position, 5000)
        if not page.changes:
            return count
        for change in page.changes:
            ts = change.get("timestamp")
            payload = change.get("payload") or {}
            if change.get("entity") == "user" and isinstance(payload.get("home_pool"), str):
                homes[str(payload.get("uri"))] = payload["home_pool"]
            if until is not None and isinstance(ts, int | float) and ts > until:
                continue
            if homed_on is not None:
                user = _user_of(change)
                home = homes.get(user) if user else None
                if home is not None and home != homed_on:
                    continue
            count += 1
        position = int(page.changes[-1]["seq"])


@dataclass
class LossReport:
    """What the last disaster-mode failover and failback of ``home_pool``
    lost, as far as the pools that hold the writes can tell now."""

    home_pool: str
    backup_pool: str
    state: str | None
    #: Writes acknowledged on the home pool after its last sync before a
    #: disaster-mode failover (None: no such failover, or home unreachable).
    failover_lost_writes: int | None = None
    #: Writes the home pool's users made on the backup after its last sync
    #: before a disaster-mode failback (None: none, or backup unreachable).
    failback_lost_writes: int | None = None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


async def count_losses(topology: Topology, home_pool: str, clients: LabClients) -> LossReport:
    """Count the RPO losses recorded in the CMS for ``home_pool``'s pairing,
    from the feeds of the pools that hold the lost writes. Needs a CMS
    replica to answer (any pool's: the record is replicated)."""
    home, backup = pair_of(topology, home_pool)
    views = await cms_views(topology, clients)
    newest = max((v for v in views.values() if v.reachable), key=lambda v: v.order(), default=None)
    raw = None
    if newest is not None:
        raw = ((newest.document or {}).get("config") or {}).get("pool_failover", {}).get(home)
    report = LossReport(home, backup, None)
    if raw is None:
        report.notes.append(
            f"the CMS ({active_master_of(topology, views)}) has no failover record of {home}"
        )
        return report
    record = PoolFailoverRecord.model_validate(raw)
    report.state = record.state
    if record.disaster_mode and record.takeover_position is not None:
        try:
            report.failover_lost_writes = await count_tail(
                clients.pool(home), record.takeover_position, record.failed_over_at
            )
        except (OperationError, OSError) as exc:
            report.notes.append(f"{home} cannot tell what the failover lost yet: {exc}")
    if record.failback_disaster_mode and record.failback_position is not None:
        try:
            report.failback_lost_writes = await count_tail(
                clients.pool(backup), record.failback_position, record.failed_back_at,
                homed_on=home, topology=topology,
            )
        except (OperationError, OSError) as exc:
            report.notes.append(f"{backup} cannot tell what the failback lost yet: {exc}")
    return report

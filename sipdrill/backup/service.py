"""The Backup Service: replicates a pool's user data to its paired pool.

One Backup Service runs per paired pool, next to it. Every sync interval it
reads its pool's change feed (``GET /replication/changes?since=``) from the
position the partner has recorded (``GET /replication/positions``) and applies
it there (``POST /replication/apply``). The feed carries user data (accounts,
settings, contact lists, conference schedules) and conference content.

Why this survives restarts and cuts: the position lives on the partner, in the
same transaction as the data it applied, and applying is idempotent and
refuses gaps (:meth:`~sipdrill.pool.store.UserStore.apply_changes`). A
Backup Service killed between reading and applying, or during an apply, just
reads the position again; it never has to trust its own memory. It keeps its
own view in ``--state-dir`` only to report status across restarts and to
notice a partner that went backwards.

Layers:

- :class:`SyncDirection`: one direction (pool -> partner) as a state machine
  over the export and import states Get-CsBackupServiceStatus reports, driven
  by declarative transition tables; an injected clock; no IO.
- :func:`run_cycle`: one sync of a direction over two injected pool clients
  (:class:`~sipdrill.pool.client.PoolClient` or anything with the
  same methods).
- :class:`BackupService`: the asyncio adapter: the timer loop, ``sync now``,
  persistence, metrics, and the CMS push when its pool hosts the active CMS.
  :mod:`sipdrill.backup.api` puts it behind HTTP.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge

from sipdrill.backup.client import LabClients
from sipdrill.backup.reconcile import reconcile_failover_states
from sipdrill.cms.operations import replicate_cms
from sipdrill.control.files import write_atomically
from sipdrill.control.http import Unreachable
from sipdrill.errors import OperationError
from sipdrill.pool.client import ChangesPage, PoolClient
from sipdrill.pool.state import SERVED_BY_BACKUP, FailoverState, TransitionTable
from sipdrill.topology import Topology

log = logging.getLogger(__name__)

#: Changes per ``GET /replication/changes`` page (and per apply transaction).
DEFAULT_PAGE_SIZE = 5000

#: A backlog is "forming" (NonSteadyState) once the oldest change the partner
#: lacks has waited this many sync intervals: one interval is the normal wait
#: of a change written just after a sync.
NON_STEADY_FACTOR = 2.0

#: How long a status probe waits for a pool.
PROBE_TIMEOUT = 3.0


# --- states and transition tables ----------------------------------------------


class ExportState(Enum):
    """Export status of one direction, as Get-CsBackupServiceStatus names it."""

    NOT_INITIALIZED = "NotInitialized"
    STEADY = "SteadyState"
    NON_STEADY = "NonSteadyState"
    FINAL = "FinalState"
    ERROR = "ErrorState"


class ImportState(Enum):
    NORMAL = "NormalState"
    ERROR = "ErrorState"


class ExportEvent(Enum):
    #: Everything the source had when the cycle started is on the partner.
    CAUGHT_UP = "caught-up"
    #: The cycle ran out of time with changes left: a backlog is forming.
    BACKLOG = "backlog"
    #: No more changes will come: the source is read-only and fully
    #: replicated, or its users are failed over (the export is held).
    FINAL = "final"
    #: The source pool could not be read.
    SOURCE_FAILED = "source-failed"
    #: The partner could not be reached or refused the changes.
    TARGET_FAILED = "target-failed"
    #: Observed between cycles: a change has waited NON_STEADY_FACTOR intervals.
    LAG_EXCEEDED = "lag-exceeded"


class ImportEvent(Enum):
    APPLIED = "applied"
    #: The partner holds everything the source had: a cycle with nothing
    #: left to apply proves the import works as well as one that applied.
    CAUGHT_UP = "caught-up"
    FAILED = "failed"


_E, _X = ExportState, ExportEvent
EXPORT_TRANSITIONS: TransitionTable[ExportState, ExportEvent] = TransitionTable(
    "backup export",
    {
        **{(s, _X.CAUGHT_UP): _E.STEADY for s in _E},
        **{(s, _X.BACKLOG): _E.NON_STEADY for s in _E},
        **{(s, _X.FINAL): _E.FINAL for s in _E},
        **{(s, _X.SOURCE_FAILED): _E.ERROR for s in _E},
        # Nothing can ship while the partner is away: a backlog forms, unless
        # there is nothing left to ship (FinalState) or never was a sync.
        (_E.NOT_INITIALIZED, _X.TARGET_FAILED): _E.ERROR,
        (_E.STEADY, _X.TARGET_FAILED): _E.NON_STEADY,
        (_E.NON_STEADY, _X.TARGET_FAILED): _E.NON_STEADY,
        (_E.FINAL, _X.TARGET_FAILED): _E.FINAL,
        (_E.ERROR, _X.TARGET_FAILED): _E.ERROR,
        # Only a steady export can be found lagging; the others already say so.
        (_E.STEADY, _X.LAG_EXCEEDED): _E.NON_STEADY,
        (_E.NON_STEADY, _X.LAG_EXCEEDED): _E.NON_STEADY,
    },
)

IMPORT_TRANSITIONS: TransitionTable[ImportState, ImportEvent] = TransitionTable(
    "backup import",
    {
        (ImportState.NORMAL, ImportEvent.APPLIED): ImportState.NORMAL,
        (ImportState.NORMAL, ImportEvent.FAILED): ImportState.ERROR,
        (ImportState.ERROR, ImportEvent.APPLIED): ImportState.NORMAL,
        (ImportState.NORMAL, ImportEvent.CAUGHT_UP): ImportState.NORMAL,
        (ImportState.ERROR, ImportEvent.CAUGHT_UP): ImportState.NORMAL,
        (ImportState.ERROR, ImportEvent.FAILED): ImportState.ERROR,
    },
)


# --- one direction -------------------------------------------------------------


@dataclass
class DirectionRecord:
    """What a direction remembers across restarts (``--state-dir``)."""

    source: str
    target: str
    position: int = 0
    high_water_mark: int = 0
    export_state: str = ExportState.NOT_INITIALIZED.value
    import_state: str = ImportState.NORMAL.value
    last_attempt: float | None = None
    last_sync: float | None = None
    last_error: str | None = None
    changes_applied: int = 0
    cycles: int = 0
    held: bool = False
    pending_since: float | None = None
    source_read_only: bool = False

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DirectionRecord:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class DirectionStatus:
    """One row of Get-CsBackupServiceStatus."""

    source: str
    target: str
    export_state: str
    import_state: str
    #: When the direction last caught up (or reached FinalState), wall clock.
    last_sync: float | None
    last_attempt: float | None
    #: Changes the source has that the partner lacks (as last observed).
    backlog: int
    #: Age of the oldest change the partner lacks, seconds (0: none).
    lag: float
    position: int
    high_water_mark: int
    source_read_only: bool
    #: The export is held: the source's users are failed over, so its
    #: remaining changes (the disaster-mode RPO) must not overwrite what they
    #: do on the backup pool.
    held: bool
    last_error: str | None
    changes_applied: int
    sync_interval: float
    observed_only: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SyncResult:
    """What one cycle did."""

    source: str
    target: str
    outcome: str  # caught-up | backlog | final | held | error
    applied: int
    position: int
    high_water_mark: int
    started: float
    duration: float
    export_state: str
    import_state: str
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class SyncDirection:
    """The replication of ``source``'s feed to ``target``: states, position
    and observations. Sans-IO: :func:`run_cycle` feeds it events; ``clock``
    (wall-clock seconds, the same clock that stamps the feed) is injected.
    """

    def __init__(
        self,
        source: str,
        target: str,
        *,
        sync_interval: float,
        clock: Callable[[], float] = time.time,
        record: DirectionRecord | None = None,
    ) -> None:
        self.source = source.lower()
        self.target = target.lower()
        self.sync_interval = sync_interval
        self.clock = clock
        r = record or DirectionRecord(self.source, self.target)
        if (r.source, r.target) != (self.source, self.target):
            raise ValueError(f"record of {r.source}->{r.target}, not {self.source}->{self.target}")
        self.record = r

    # --- states ------------------------------------------------------------

    @property
    def export_state(self) -> ExportState:
        return ExportState(self.record.export_state)

    @property
    def import_state(self) -> ImportState:
        return ImportState(self.record.import_state)

    def _export(self, event: ExportEvent) -> ExportState:
        new = EXPORT_TRANSITIONS.next_state(self.export_state, event)
        self.record.export_state = new.value
        return new

    def _import(self, event: ImportEvent) -> ImportState:
        new = IMPORT_TRANSITIONS.next_state(self.import_state, event)
        self.record.import_state = new.value
        return new

    # --- events (called by run_cycle; tests may call them directly) ----------

    def on_attempt(self, now: float) -> None:
        self.record.last_attempt = now
        self.record.cycles += 1

    def on_observed(
        self,
        *,
        position: int,
        high_water_mark: int,
        read_only: bool,
        oldest_pending: float | None,
    ) -> None:
        """What a read of both pools showed (no state change)."""
        r = self.record
        r.position = position
        r.high_water_mark = max(high_water_mark, position)
        r.source_read_only = read_only
        r.pending_since = oldest_pending if high_water_mark > position else None

    def on_applied(self, applied: int, position: int) -> None:
        r = self.record
        r.changes_applied += applied
        r.position = max(r.position, position)
        r.high_water_mark = max(r.high_water_mark, r.position)
        self._import(ImportEvent.APPLIED)

    def on_caught_up(self, now: float) -> None:
        self.record.held = False
        self.record.last_error = None
        self.record.last_sync = now
        # Without this a healed partner stayed in import ErrorState until a new
        # write came to apply (issue 19): caught up is a working import.
        self._import(ImportEvent.CAUGHT_UP)
        self._export(ExportEvent.CAUGHT_UP)

    def on_backlog(self, oldest_pending: float | None) -> None:
        self.record.held = False
        self.record.last_error = None
        self.record.pending_since = oldest_pending
        self._export(ExportEvent.BACKLOG)

    def on_final(self, now: float, *, held: bool) -> None:
        self.record.held = held
        self.record.last_error = None
        if not held or self.record.position >= self.record.high_water_mark:
            self.record.last_sync = now
        if not held:
            self._import(ImportEvent.CAUGHT_UP)
        self._export(ExportEvent.FINAL)

    def on_source_failed(self, error: str) -> None:
        self.record.last_error = error
        self._export(ExportEvent.SOURCE_FAILED)

    def on_target_failed(self, error: str) -> None:
        self.record.last_error = error
        self._import(ImportEvent.FAILED)
        self._export(ExportEvent.TARGET_FAILED)

    # --- reading ---------------------------------------------------------------

    def backlog(self) -> int:
        return max(0, self.record.high_water_mark - self.record.position)

    def lag(self, now: float) -> float:
        r = self.record
        if self.backlog() == 0 or r.pending_since is None:
            return 0.0
        return max(0.0, now - r.pending_since)

    def evaluate(self, now: float) -> ExportState:
        """Fire LAG_EXCEEDED if a steady export has let a change wait too long."""
        if (
            self.export_state is ExportState.STEADY
            and self.lag(now) > NON_STEADY_FACTOR * self.sync_interval
        ):
            self._export(ExportEvent.LAG_EXCEEDED)
        return self.export_state

    def status(self, now: float | None = None) -> DirectionStatus:
        now = self.clock() if now is None else now
        self.evaluate(now)
        r = self.record
        return DirectionStatus(
            source=self.source,
            target=self.target,
            export_state=r.export_state,
            import_state=r.import_state,
            last_sync=r.last_sync,
            last_attempt=r.last_attempt,
            backlog=self.backlog(),
            lag=round(self.lag(now), 3),
            position=r.position,
            high_water_mark=r.high_water_mark,
            source_read_only=r.source_read_only,
            held=r.held,
            last_error=r.last_error,
            changes_applied=r.changes_applied,
            sync_interval=self.sync_interval,
        )

    def next_deadline(self) -> float:
        """When the next periodic sync is due (wall clock); minus infinity
        when none was ever attempted (due at once, whatever the clock says
        by the time the caller compares)."""
        last = self.record.last_attempt
        return -math.inf if last is None else last + self.sync_interval


# --- one cycle -----------------------------------------------------------------


class ReplicationPeer(Protocol):
    """What a cycle needs of a pool (PoolClient has it; tests may fake it)."""

    pool_fqdn: str

    async def changes(self, since: int, limit: int) -> ChangesPage: ...

    async def apply(self, source_pool: str, changes: list[dict[str, Any]]) -> Any: ...

    async def position_of(self, source_pool: str) -> int: ...

    async def failover_states(
        self, time_limit: float | None = None
    ) -> dict[str, FailoverState]: ...


def _oldest(page: ChangesPage) -> float | None:
    if not page.changes:
        return None
    ts = page.changes[0].get("timestamp")
    return float(ts) if isinstance(ts, int | float) else None


def _describe(exc: Exception) -> str:
    return str(exc) if isinstance(exc, OperationError) else f"{type(exc).__name__}: {exc}"


async def source_failed_over(
    direction: SyncDirection, source: ReplicationPeer, target: ReplicationPeer
) -> bool:
    """Whether either pool says the source's users are served by the target.

    A pool that does not answer (or has no ``/failover/state``) counts as
    saying no: the hold exists to protect live data on a reachable backup.
    """
    for peer in (target, source):
        try:
            states = await peer.failover_states(time_limit=PROBE_TIMEOUT)
        except (OperationError, OSError):
            continue
        if states.get(direction.source) in SERVED_BY_BACKUP:
            return True
    return False


async def run_cycle(
    direction: SyncDirection,
    source: ReplicationPeer,
    target: ReplicationPeer,
    *,
    final: bool = False,
    page_size: int = DEFAULT_PAGE_SIZE,
    budget: float | None = None,
    on_progress: Callable[[SyncDirection], None] | None = None,
) -> SyncResult:
    """Replicate ``source``'s feed to ``target`` from the position ``target``
    recorded, up to the source's high-water mark at the start of the cycle.

    ``final`` is the last sync of a pool failover: the source must be
    read-only; the cycle ships everything (no time budget, no hold) and ends
    in FinalState. Otherwise the cycle stops after ``budget`` seconds (default:
    one sync interval) with NonSteadyState, and ships nothing while the
    source's users are failed over (the export is held: FinalState).

    Never raises for a pool that fails: the direction records the error
    (ErrorState / NonSteadyState); ``final`` raises it, since the caller
    (pool failover) must not go on.
    """
    clock = direction.clock
    started = clock()
    budget = direction.sync_interval if budget is None else budget
    direction.on_attempt(started)
    applied = 0
    outcome = "error"
    error: str | None = None

    def result() -> SyncResult:
        r = direction.record
        return SyncResult(
            direction.source, direction.target, outcome, applied, r.position, r.high_water_mark,
            started, round(clock() - started, 6), r.export_state, r.import_state, error,
        )

    def progress() -> None:
        if on_progress is not None:
            on_progress(direction)

    try:
        try:
            position = await target.position_of(direction.source)
        except (OperationError, OSError) as exc:
            error = _describe(exc)
            direction.on_target_failed(error)
            raise
        if position < direction.record.position:
            log.warning(
                "%s has applied %s's feed up to %d, but this service had seen %d: "
                "the partner's store went back (restored?); resuming from the partner",
                direction.target, direction.source, position, direction.record.position,
            )
            direction.record.position = position
        try:
            page = await source.changes(position, page_size)
        except (OperationError, OSError) as exc:
            error = _describe(exc)
            direction.on_source_failed(error)
            raise
        if page.high_water_mark < position:
            error = (
                f"{direction.source}'s feed ends at {page.high_water_mark} but {direction.target} "
                f"has applied it up to {position}: the source store was replaced; "
                "nothing replicated (re-seed the partner)"
            )
            direction.on_source_failed(error)
            raise OperationError("source-behind", error, 409)
        direction.on_observed(
            position=position,
            high_water_mark=page.high_water_mark,
            read_only=page.read_only,
            oldest_pending=_oldest(page),
        )
        if final and not page.read_only:
            error = (
                f"{direction.source} is not read-only: a final sync is the last one of a pool "
                "failover, after the pool stopped taking writes"
            )
            raise OperationError("not-read-only", error, 409)
        if not final and await source_failed_over(direction, source, target):
            # Ship nothing: these changes are the disaster-mode RPO tail, and
            # the users now write on the partner.
            direction.on_final(clock(), held=True)
            outcome = "held"
            progress()
            return result()

        goal = page.high_water_mark
        while page.changes:
            last_seq = int(page.changes[-1]["seq"])
            try:
                res = await target.apply(direction.source, page.changes)
            except (OperationError, OSError) as exc:
                error = _describe(exc)
                direction.on_target_failed(error)
                raise
            if res.last_applied < last_seq:
                error = (
                    f"{direction.target} answered last_applied {res.last_applied} to a batch "
                    f"ending at {last_seq}"
                )
                direction.on_target_failed(error)
                raise OperationError("apply-short", error, 502)
            applied += res.applied
            direction.on_applied(res.applied, res.last_applied)
            position = res.last_applied
            progress()
            if not final and position >= goal:
                break
            try:
                page = await source.changes(position, page_size)
            except (OperationError, OSError) as exc:
                error = _describe(exc)
                direction.on_source_failed(error)
                raise
            direction.on_observed(
                position=position,
                high_water_mark=page.high_water_mark,
                read_only=page.read_only,
                oldest_pending=_oldest(page),
            )
            if not final and page.changes and clock() - started > budget:
                direction.on_backlog(_oldest(page))
                outcome = "backlog"
                progress()
                return result()
        now = clock()
        if page.read_only and direction.record.position >= direction.record.high_water_mark:
            direction.on_final(now, held=False)
            outcome = "final"
        else:
            direction.on_caught_up(now)
            outcome = "caught-up"
        progress()
        return result()
    except (OperationError, OSError) as exc:
        if error is None:
            error = _describe(exc)
            direction.record.last_error = error
        progress()
        if final:
            raise
        return result()


async def probe(direction: SyncDirection, source: ReplicationPeer, target: ReplicationPeer) -> None:
    """Refresh what the direction knows without shipping anything (for
    status between cycles): positions, backlog, the source's read-only flag,
    and FinalState when the source's users have been failed over since.
    A pool that does not answer leaves the last observation in place."""
    try:
        position = await target.position_of(direction.source)
        page = await source.changes(position, 1)
    except (OperationError, OSError):
        return
    direction.on_observed(
        position=position,
        high_water_mark=page.high_water_mark,
        read_only=page.read_only,
        oldest_pending=_oldest(page),
    )
    if direction.export_state is ExportState.FINAL:
        return
    if await source_failed_over(direction, source, target):
        direction.on_final(direction.clock(), held=True)
    elif page.read_only and position >= page.high_water_mark:
        direction.on_final(direction.clock(), held=False)


# --- persistence ---------------------------------------------------------------


def load_record(path: Path, source: str, target: str) -> DirectionRecord | None:
    """The persisted view, or None (missing, unreadable or another direction's)."""
    try:
        data = json.loads(path.read_text())
        record = DirectionRecord.from_json(data)
        ExportState(record.export_state)
        ImportState(record.import_state)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as exc:
        log.warning("ignoring %s: %s", path, exc)
        return None
    if (record.source, record.target) != (source, target):
        log.warning("ignoring %s: it is the view of %s->%s", path, record.source, record.target)
        return None
    return record


# --- the reverse direction, observed -------------------------------------------


async def observe_direction(
    source: PoolClient,
    target: PoolClient,
    *,
    sync_interval: float,
    now: float,
) -> DirectionStatus:
    """Status of ``source -> target`` from what the two pools show, for the
    direction another Backup Service drives."""
    src, dst = source.pool_fqdn, target.pool_fqdn
    error: str | None = None
    import_state = ImportState.NORMAL
    position = hwm = 0
    read_only = False
    oldest: float | None = None
    export = ExportState.NOT_INITIALIZED
    try:
        position = await target.position_of(src)
    except (OperationError, OSError) as exc:
        error = _describe(exc)
        import_state = ImportState.ERROR
    try:
        page = await source.changes(position, 1)
        hwm, read_only, oldest = page.high_water_mark, page.read_only, _oldest(page)
    except (OperationError, OSError) as exc:
        error = _describe(exc)
        export = ExportState.ERROR
    backlog = max(0, hwm - position)
    lag = max(0.0, now - oldest) if backlog and oldest is not None else 0.0
    if export is not ExportState.ERROR:
        if import_state is ImportState.ERROR:
            export = ExportState.NON_STEADY if backlog else ExportState.STEADY
        elif position == 0 and hwm > 0:
            export = ExportState.NOT_INITIALIZED
        elif read_only and backlog == 0:
            export = ExportState.FINAL
        elif lag > NON_STEADY_FACTOR * sync_interval:
            export = ExportState.NON_STEADY
        else:
            export = ExportState.STEADY
    return DirectionStatus(
        source=src,
        target=dst,
        export_state=export.value,
        import_state=import_state.value,
        last_sync=None,
        last_attempt=None,
        backlog=backlog,
        lag=round(lag, 3),
        position=position,
        high_water_mark=hwm,
        source_read_only=read_only,
        held=False,
        last_error=error,
        changes_applied=0,
        sync_interval=sync_interval,
        observed_only=True,
    )


# --- the service -----------------------------------------------------------------


class BackupMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ("source", "target")
        self.applied = Counter(
            "sipdrill_backup_changes_applied", "Changes applied on the partner", labels,
            registry=self.registry,
        )
        self.cycles = Counter(
            "sipdrill_backup_sync_cycles", "Sync cycles by outcome", (*labels, "outcome"),
            registry=self.registry,
        )
        self.backlog = Gauge(
            "sipdrill_backup_backlog_changes", "Changes the partner lacks", labels,
            registry=self.registry,
        )
        self.lag = Gauge(
            "sipdrill_backup_lag_seconds", "Age of the oldest change the partner lacks", labels,
            registry=self.registry,
        )
        self.last_sync = Gauge(
            "sipdrill_backup_last_sync_timestamp_seconds", "When the direction last caught up",
            labels, registry=self.registry,
        )
        self.export_state = Gauge(
            "sipdrill_backup_export_state", "1 for the current export state", (*labels, "state"),
            registry=self.registry,
        )
        self.cycle_seconds = Gauge(
            "sipdrill_backup_last_cycle_seconds", "Duration of the last sync cycle", labels,
            registry=self.registry,
        )

    def update(self, status: DirectionStatus, result: SyncResult | None = None) -> None:
        key = (status.source, status.target)
        self.backlog.labels(*key).set(status.backlog)
        self.lag.labels(*key).set(status.lag)
        if status.last_sync is not None:
            self.last_sync.labels(*key).set(status.last_sync)
        for state in ExportState:
            self.export_state.labels(*key, state.value).set(
                1 if state.value == status.export_state else 0
            )
        if result is not None:
            self.cycles.labels(*key, result.outcome).inc()
            self.applied.labels(*key).inc(result.applied)
            self.cycle_seconds.labels(*key).set(result.duration)


def _sync_interval_from_cms(cms: Mapping[str, Any]) -> float | None:
    doc = cms.get("document") if isinstance(cms.get("document"), dict) else cms
    config = doc.get("config") if isinstance(doc, dict) else None
    timers = config.get("timers") if isinstance(config, dict) else None
    value = timers.get("sync_interval") if isinstance(timers, dict) else None
    if isinstance(value, int | float) and math.isfinite(value) and 5 <= value <= 3 * 3600:
        return float(value)
    return None


@dataclass
class BackupService:
    """The Backup Service of ``pool`` (replicating to its partner) as one
    asyncio object. ``clients`` reach the pools (and are not closed here)."""

    topology: Topology
    pool: str
    state_dir: Path
    clients: LabClients
    clock: Callable[[], float] = time.time
    page_size: int = DEFAULT_PAGE_SIZE
    sync_interval: float | None = None  # default: the CMS's, else the topology's
    metrics: BackupMetrics = field(default_factory=BackupMetrics)

    def __post_init__(self) -> None:
        self.pool = self.pool.lower()
        partner = self.topology.backup_of(self.pool)
        if partner is None:
            raise OperationError(
                "no-backup-pool",
                f"pool {self.pool} has no backup pool: it has no Backup Service to run",
                409,
            )
        self.partner = partner.fqdn
        self.state_dir = Path(self.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._fixed_interval = self.sync_interval is not None
        interval = self.sync_interval or self.topology.timers.sync_interval
        record = load_record(self._record_path, self.pool, self.partner)
        self.direction = SyncDirection(
            self.pool, self.partner, sync_interval=interval, clock=self.clock, record=record
        )
        self.last_result: SyncResult | None = None
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()

    @property
    def _record_path(self) -> Path:
        return self.state_dir / f"direction-{self.pool}-to-{self.partner}.json"

    def _persist(self, direction: SyncDirection) -> None:
        data = json.dumps(asdict(direction.record), sort_keys=True).encode()
        write_atomically(self._record_path, data, make_parents=True)

    @property
    def source(self) -> PoolClient:
        return self.clients.pool(self.pool)

    @property
    def target(self) -> PoolClient:
        return self.clients.pool(self.partner)

    async def sync(self, *, final: bool = False) -> SyncResult:
        """One cycle now (Invoke-CsBackupServiceSync). Cycles never overlap:
        a call during a cycle waits for it, then runs its own, so every change
        acknowledged before the call is considered."""
        async with self._lock:
            result = await run_cycle(
                self.direction, self.source, self.target, final=final,
                page_size=self.page_size, on_progress=self._persist,
            )
        self.last_result = result
        if result.outcome == "held" and not self.direction.record.source_read_only:
            await self._fence()
        await self.reconcile()
        self.metrics.update(self.direction.status(), result)
        log.info(
            "sync %s->%s: %s, %d applied, position %d/%d in %.3fs%s",
            result.source, result.target, result.outcome, result.applied, result.position,
            result.high_water_mark, result.duration, f" ({result.error})" if result.error else "",
        )
        return result

    async def _fence(self) -> None:
        """The pool is back from a disaster after its users were failed over
        (the partner says FailedOver) but takes writes: make it read-only, so
        nothing is written that could never replicate. Not while the partner
        says FailingBack: the failback itself makes the pool writable."""
        try:
            states = await self.target.failover_states(time_limit=PROBE_TIMEOUT)
            if states.get(self.pool) is not FailoverState.FAILED_OVER:
                return
            await self.source.set_read_only(True)
        except (OperationError, OSError) as exc:
            log.warning("%s is failed over but writable, and could not be fenced: %s",
                        self.pool, exc)
            return
        self.direction.record.source_read_only = True
        self._persist(self.direction)
        log.warning("%s is failed over to %s but was writable: made it read-only",
                    self.pool, self.partner)
        # It was down when its users were failed over: tell it, so that it
        # sends them to the backup pool rather than serving them itself.
        try:
            own = await self.source.failover_states(time_limit=PROBE_TIMEOUT)
            if own.get(self.pool, FailoverState.ACTIVE) not in SERVED_BY_BACKUP:
                await self.source.failover_event(self.pool, "failover_started", True)
                await self.source.failover_event(self.pool, "failover_completed", True)
                log.warning("%s had missed its failover to %s: told it", self.pool, self.partner)
        except (OperationError, OSError) as exc:
            log.warning("could not tell %s about its failover: %s", self.pool, exc)

    async def reconcile(self) -> None:
        """Tell this pool what it missed while it was down (a disaster-mode
        failback of the partner's users)."""
        try:
            for sent in await reconcile_failover_states(self.topology, self.clients, self.partner):
                log.warning("reconciled failover states: %s", sent)
        except (OperationError, OSError) as exc:
            log.debug("reconciling failover states: %s", exc)

    async def refresh_interval(self) -> None:
        """Take SyncInterval from the CMS replica on the pool (global setting)."""
        if self._fixed_interval:
            return
        try:
            cms = await self.source.cms(time_limit=PROBE_TIMEOUT)
        except (OperationError, OSError):
            return
        interval = _sync_interval_from_cms(cms)
        if interval is not None and interval != self.direction.sync_interval:
            log.info("SyncInterval is now %gs (CMS)", interval)
            self.direction.sync_interval = interval

    async def push_cms(self) -> None:
        """If this pool hosts the active CMS, bring every replica up to date."""
        try:
            await replicate_cms(self.topology, self.clients, self.pool)
        except (OperationError, OSError) as exc:
            log.debug("CMS replication from %s: %s", self.pool, exc)

    async def status(self) -> dict[str, Any]:
        """Both directions: this pool's export (driven here) and the
        partner's (observed on the pools)."""
        if not self._lock.locked():
            # Not during a cycle (it knows better); a cycle waits for the probe.
            async with self._lock:
                await probe(self.direction, self.source, self.target)
        now = self.clock()
        mine = self.direction.status(now)
        theirs = await observe_direction(
            self.target, self.source, sync_interval=self.direction.sync_interval, now=now
        )
        self.metrics.update(mine)
        return {
            "pool": self.pool,
            "partner": self.partner,
            "sync_interval": self.direction.sync_interval,
            "directions": [mine.to_json(), theirs.to_json()],
            "last_result": self.last_result.to_json() if self.last_result else None,
        }

    def trigger(self) -> None:
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """The timer loop: a cycle when due (at once on start), until ``stop``."""
        while not stop.is_set():
            # Cleared before the cycle: a trigger that arrives during it
            # still causes the next one.
            self._wake.clear()
            await self.refresh_interval()
            if self.clock() >= self.direction.next_deadline():
                await self.sync()
                await self.push_cms()
            delay = max(0.0, self.direction.next_deadline() - self.clock())
            waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._wake.wait())]
            try:
                await asyncio.wait(waiters, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waiters:
                    w.cancel()
                await asyncio.gather(*waiters, return_exceptions=True)
            if self._wake.is_set():
                # A trigger means "sync now": make the cycle due.
                self.direction.record.last_attempt = None


__all__ = [
    "EXPORT_TRANSITIONS",
    "IMPORT_TRANSITIONS",
    "BackupService",
    "DirectionRecord",
    "DirectionStatus",
    "ExportEvent",
    "ExportState",
    "ImportEvent",
    "ImportState",
    "SyncDirection",
    "SyncResult",
    "Unreachable",
    "observe_direction",
    "run_cycle",
]

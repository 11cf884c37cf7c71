"""A Front End pool's durable user store, with the change feed the Backup
Service replicates from.

One SQLite file per pool, in WAL mode. It holds the users the pool homes (and,
once the Backup Service has run, a replica of its partner's users), their
contact lists and their scheduled conferences.

Guarantees:

- A write method returns only after its transaction has committed, so a
  returned sequence number is an acknowledged, durable write.
- Every change appends one row to ``change_feed`` in the same transaction as
  the change itself, so the feed never misses a change and never lists one
  that was rolled back. Sequence numbers are gap-free (AUTOINCREMENT's
  counter lives in ``sqlite_sequence`` and rolls back with the transaction).
- Local writes and replicated changes go through one function
  (:func:`_apply_ops`), so a replica that applies the feed ends in exactly
  the state of its source.

Concurrency: one connection per store object, serialised by a lock, opened
with ``check_same_thread=False`` so that async callers may use
``asyncio.to_thread(store.method, ...)`` from any worker thread. Two store
objects on the same file work (SQLite locks the file; ``busy_timeout`` waits)
but gain nothing: give each pool process one store.
"""

from __future__ import annotations

import base64
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from sipdrill.errors import OperationError

if TYPE_CHECKING:
    from sipdrill.topology import Topology

SCHEMA_VERSION = 1

#: How long a second connection waits for the write lock before failing.
BUSY_TIMEOUT_MS = 5000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS users (
    uri          TEXT PRIMARY KEY,
    home_pool    TEXT NOT NULL,
    serving_pool TEXT NOT NULL,
    settings     TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS users_by_home ON users (home_pool);
-- A rowid table, not WITHOUT ROWID: rowid keeps each list in the order the
-- user added the contacts, and an upsert keeps the row (and its place).
CREATE TABLE IF NOT EXISTS contacts (
    owner   TEXT NOT NULL,
    contact TEXT NOT NULL,
    PRIMARY KEY (owner, contact)
);
CREATE TABLE IF NOT EXISTS conferences (
    organiser TEXT NOT NULL,
    conf_id   TEXT NOT NULL,
    subject   TEXT NOT NULL,
    content   BLOB NOT NULL,
    PRIMARY KEY (organiser, conf_id)
);
CREATE TABLE IF NOT EXISTS change_feed (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    op          TEXT NOT NULL,
    entity      TEXT NOT NULL,
    key         TEXT NOT NULL,
    payload     TEXT NOT NULL,
    origin_pool TEXT NOT NULL,
    ts          REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS replication (
    source_pool TEXT PRIMARY KEY,
    last_seq    INTEGER NOT NULL
);
"""


class ChangeOp(StrEnum):
    UPSERT = "upsert"
    DELETE = "delete"


class Entity(StrEnum):
    USER = "user"
    CONTACT = "contact"
    CONFERENCE = "conference"


@dataclass(frozen=True)
class Change:
    """One row of a pool's change feed.

    ``payload`` carries every field needed to apply the change (for a delete,
    the identifying fields), so applying never needs ``key``; ``key`` is a
    canonical name of the row (``uri``, ``"owner contact"``, ``"organiser id"``)
    that a replicator may use to coalesce changes to the same row.
    """

    seq: int
    op: ChangeOp
    entity: Entity
    key: str
    payload: Mapping[str, Any]
    origin_pool: str
    timestamp: float


@dataclass(frozen=True)
class UserRecord:
    uri: str
    home_pool: str
    serving_pool: str
    settings: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ConferenceRecord:
    organiser: str
    conf_id: str
    subject: str = ""
    content: bytes = b""


@dataclass(frozen=True)
class StoreSnapshot:
    """The replicated data of a store, for comparisons (replica == source,
    state before == state after a refused operation)."""

    users: Mapping[str, UserRecord]
    contacts: Mapping[str, tuple[str, ...]]
    conferences: Mapping[tuple[str, str], ConferenceRecord]


@dataclass(frozen=True)
class StoreCounts:
    users: int
    homed_users: int
    served_users: int
    contacts: int
    conferences: int


# A change before it has a sequence number: (op, entity, key, payload).
_Op = tuple[ChangeOp, Entity, str, dict[str, Any]]


def _dumps(value: Any) -> str:
    # Canonical JSON: a replica's row is byte-identical to its source's.
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _user_op(uri: str, home_pool: str, serving_pool: str, settings: Mapping[str, Any]) -> _Op:
    payload = {
        "uri": uri,
        "home_pool": home_pool,
        "serving_pool": serving_pool,
        "settings": dict(settings),
    }
    return (ChangeOp.UPSERT, Entity.USER, uri, payload)


def _contact_op(op: ChangeOp, owner: str, contact: str) -> _Op:
    return (op, Entity.CONTACT, f"{owner} {contact}", {"owner": owner, "contact": contact})


def _conference_op(organiser: str, conf_id: str, subject: str, content: bytes) -> _Op:
    payload = {
        "organiser": organiser,
        "conf_id": conf_id,
        "subject": subject,
        "content": base64.b64encode(content).decode("ascii"),
    }
    return (ChangeOp.UPSERT, Entity.CONFERENCE, f"{organiser} {conf_id}", payload)


def _params(op: ChangeOp, entity: Entity, p: Mapping[str, Any]) -> tuple[Any, ...]:
    if entity is Entity.USER:
        if op is ChangeOp.UPSERT:
            return (p["uri"], p["home_pool"], p["serving_pool"], _dumps(p["settings"]))
        return (p["uri"],)
    if entity is Entity.CONTACT:
        return (p["owner"], p["contact"])
    if op is ChangeOp.UPSERT:
        return (p["organiser"], p["conf_id"], p["subject"], base64.b64decode(p["content"]))
    return (p["organiser"], p["conf_id"])


_SQL: dict[tuple[ChangeOp, Entity], tuple[str, ...]] = {
    (ChangeOp.UPSERT, Entity.USER): (
        "INSERT INTO users (uri, home_pool, serving_pool, settings) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (uri) DO UPDATE SET home_pool = excluded.home_pool, "
        "serving_pool = excluded.serving_pool, settings = excluded.settings",
    ),
    # A user's contact list and meetings go with the user: one feed row, so a
    # replica cannot apply the delete of the user and miss the cascade.
    (ChangeOp.DELETE, Entity.USER): (
        "DELETE FROM contacts WHERE owner = ?",
        "DELETE FROM conferences WHERE organiser = ?",
        "DELETE FROM users WHERE uri = ?",
    ),
    (ChangeOp.UPSERT, Entity.CONTACT): (
        "INSERT INTO contacts (owner, contact) VALUES (?, ?) ON CONFLICT DO NOTHING",
    ),
    (ChangeOp.DELETE, Entity.CONTACT): ("DELETE FROM contacts WHERE owner = ? AND contact = ?",),
    (ChangeOp.UPSERT, Entity.CONFERENCE): (
        "INSERT INTO conferences (organiser, conf_id, subject, content) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (organiser, conf_id) DO UPDATE SET subject = excluded.subject, "
        "content = excluded.content",
    ),
    (ChangeOp.DELETE, Entity.CONFERENCE): (
        "DELETE FROM conferences WHERE organiser = ? AND conf_id = ?",
    ),
}


def _apply_ops(
    conn: sqlite3.Connection, ops: Sequence[tuple[ChangeOp, Entity, Mapping[str, Any]]]
) -> None:
    """Apply changes in order; consecutive changes of one kind go through one
    ``executemany`` (replicating a pool's worth of contacts is one run)."""
    i = 0
    while i < len(ops):
        op, entity, _ = ops[i]
        j = i
        while j < len(ops) and ops[j][0] is op and ops[j][1] is entity:
            j += 1
        rows = [_params(op, entity, p) for _, _, p in ops[i:j]]
        for sql in _SQL[(op, entity)]:
            conn.executemany(sql, rows)
        i = j


class UserStore:
    """The user store of the pool ``pool_fqdn``, in the SQLite file ``path``.

    ``clock`` stamps change-feed rows (wall-clock seconds; inject a fake in
    tests). Use as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        path: str | Path,
        pool_fqdn: str,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path) if str(path) != ":memory:" else None
        self.pool_fqdn = pool_fqdn.lower()
        self._clock = clock
        self._lock = threading.RLock()
        self._in_batch = False
        self._conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        try:
            self._open()
        except BaseException:
            self._conn.close()
            raise

    def _open(self) -> None:
        c = self._conn
        mode = c.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if self.path is not None and mode != "wal":
            raise OperationError(
                "store-unavailable", f"{self.path}: cannot use WAL mode (got {mode!r})", 503
            )
        # FULL, not NORMAL: in WAL mode NORMAL skips the fsync of the WAL at
        # commit, so a power loss (not a process crash) can roll back
        # transactions we already acknowledged. An acknowledged contact or
        # meeting must survive the host, because the pool failover RPO is
        # measured against what clients were told was saved; the price is
        # one fsync per commit (use batch() for bulk writes).
        c.execute("PRAGMA synchronous = FULL")
        c.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        self._read_only = False
        with self._transaction():
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    c.execute(statement)
            row = c.execute("SELECT value FROM meta WHERE key = 'pool'").fetchone()
            if row is None:
                c.execute("INSERT INTO meta VALUES ('pool', ?)", (self.pool_fqdn,))
                c.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
                c.execute("INSERT INTO meta VALUES ('read_only', '0')")
            elif row[0] != self.pool_fqdn:
                raise OperationError(
                    "wrong-pool",
                    f"{self.path} is the store of pool {row[0]}, not {self.pool_fqdn}",
                )
            schema = c.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()[0]
            if schema != str(SCHEMA_VERSION):
                # CREATE IF NOT EXISTS would silently keep an older layout.
                raise OperationError(
                    "store-schema",
                    f"{self.path} has store schema {schema}; this sipdrill reads {SCHEMA_VERSION}",
                )
            self._read_only = (
                c.execute("SELECT value FROM meta WHERE key = 'read_only'").fetchone()[0] == "1"
            )

    # --- lifecycle -----------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> UserStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- transactions --------------------------------------------------------

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._in_batch:
                yield self._conn
                return
            # IMMEDIATE takes the write lock now, so a transaction never fails
            # half-way with SQLITE_BUSY when it upgrades from read to write.
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Group writes into one transaction: all of them commit when the
        block ends, or none if it raises. Sequence numbers returned inside the
        block are acknowledged only when the block has exited normally."""
        with self._lock:
            if self._in_batch:
                yield
                return
            self.require_writable()
            with self._transaction():
                self._in_batch = True
                try:
                    yield
                finally:
                    self._in_batch = False

    def require_writable(self) -> None:
        """Raise the read-only refusal if this store takes no local writes;
        lets multi-step operations refuse before their first step."""
        if self._read_only:
            raise OperationError(
                "read-only",
                f"the user store of pool {self.pool_fqdn} is read-only "
                "(its users were failed over); no change was made",
                409,
            )

    def _write(self, ops: Sequence[_Op]) -> int:
        """Apply ``ops`` and log them, in one transaction; the last seq."""
        with self._lock:
            self.require_writable()
            with self._transaction() as c:
                return self._write_locked(c, ops)

    def _write_locked(self, c: sqlite3.Connection, ops: Sequence[_Op]) -> int:
        if not ops:
            return self._high_water_mark_locked()
        _apply_ops(c, [(op, entity, payload) for op, entity, _, payload in ops])
        now = self._clock()
        c.executemany(
            "INSERT INTO change_feed (op, entity, key, payload, origin_pool, ts) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [
                (op.value, entity.value, key, _dumps(p), self.pool_fqdn, now)
                for op, entity, key, p in ops
            ],
        )
        return self._high_water_mark_locked()

    # --- read-only flag ------------------------------------------------------

    @property
    def read_only(self) -> bool:
        return self._read_only

    def set_read_only(self, read_only: bool) -> None:
        """Pool failover makes the failed pool's store read-only, so its
        Backup Service export reaches FinalState. Persisted: a pool that
        restarts after a failover must not start taking writes again.
        Replicated changes (:meth:`apply_changes`) are still accepted, since
        failback brings the backup's changes home before the flag is lifted."""
        with self._lock, self._transaction() as c:
            c.execute(
                "UPDATE meta SET value = ? WHERE key = 'read_only'", ("1" if read_only else "0",)
            )
            self._read_only = read_only

    # --- writes --------------------------------------------------------------

    def _require_user(self, c: sqlite3.Connection, uri: str) -> None:
        if c.execute("SELECT 1 FROM users WHERE uri = ?", (uri,)).fetchone() is None:
            raise OperationError(
                "unknown-user", f"{uri} has no account in the store of {self.pool_fqdn}", 404
            )

    def upsert_user(
        self,
        uri: str,
        *,
        home_pool: str,
        serving_pool: str | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> int:
        """Create or replace a user's account row (not their contacts or
        meetings). ``serving_pool`` defaults to the home pool."""
        return self._write([_user_op(uri, home_pool, serving_pool or home_pool, settings or {})])

    def update_settings(self, uri: str, settings: Mapping[str, Any]) -> int:
        with self._lock:
            self.require_writable()
            with self._transaction() as c:
                self._require_user(c, uri)
                user = self._get_user_locked(c, uri)
                assert user is not None
                op = _user_op(uri, user.home_pool, user.serving_pool, settings)
                return self._write_locked(c, [op])

    def reassign_serving_pool(self, home_pool: str, serving_pool: str) -> int:
        """Record that every user homed on ``home_pool`` is now served by
        ``serving_pool`` (pool failover and failback); the number changed."""
        with self._lock:
            self.require_writable()
            with self._transaction() as c:
                rows = c.execute(
                    "SELECT uri, settings FROM users WHERE home_pool = ? AND serving_pool != ? "
                    "ORDER BY uri",
                    (home_pool, serving_pool),
                ).fetchall()
                ops = [_user_op(uri, home_pool, serving_pool, json.loads(s)) for uri, s in rows]
                self._write_locked(c, ops)
                return len(ops)

    def delete_user(self, uri: str) -> int:
        """Remove a user with their contact list and meetings."""
        with self._lock:
            self.require_writable()
            with self._transaction() as c:
                self._require_user(c, uri)
                return self._write_locked(c, [(ChangeOp.DELETE, Entity.USER, uri, {"uri": uri})])

    def add_contact(self, owner: str, contact: str) -> int:
        with self._lock:
            self.require_writable()
            with self._transaction() as c:
                self._require_user(c, owner)
                return self._write_locked(c, [_contact_op(ChangeOp.UPSERT, owner, contact)])

    def remove_contact(self, owner: str, contact: str) -> int:
        with self._lock:
            self.require_writable()
            with self._transaction() as c:
                self._require_user(c, owner)
                return self._write_locked(c, [_contact_op(ChangeOp.DELETE, owner, contact)])

    def replace_contacts(self, owner: str, contacts: Iterable[str]) -> int:
        """Make ``owner``'s contact list exactly ``contacts`` (in that order
        for new entries); only the differences go to the feed."""
        wanted = list(dict.fromkeys(contacts))
        with self._lock:
            self.require_writable()
            with self._transaction() as c:
                self._require_user(c, owner)
                have = self._contacts_locked(c, owner)
                keep, old = set(wanted), set(have)
                ops = [_contact_op(ChangeOp.DELETE, owner, x) for x in have if x not in keep]
                ops += [_contact_op(ChangeOp.UPSERT, owner, x) for x in wanted if x not in old]
                return self._write_locked(c, ops)

    def schedule_conference(
        self, organiser: str, conf_id: str, *, subject: str = "", content: bytes = b""
    ) -> int:
        """Create or update a scheduled conference; ``content`` is the
        conference content (slides, handouts) the Backup Service replicates."""
        with self._lock:
            self.require_writable()
            with self._transaction() as c:
                self._require_user(c, organiser)
                return self._write_locked(c, [_conference_op(organiser, conf_id, subject, content)])

    def cancel_conference(self, organiser: str, conf_id: str) -> int:
        key = f"{organiser} {conf_id}"
        payload = {"organiser": organiser, "conf_id": conf_id}
        with self._lock:
            self.require_writable()
            with self._transaction() as c:
                row = c.execute(
                    "SELECT 1 FROM conferences WHERE organiser = ? AND conf_id = ?",
                    (organiser, conf_id),
                ).fetchone()
                if row is None:
                    raise OperationError(
                        "unknown-conference", f"{organiser} has no conference {conf_id!r}", 404
                    )
                return self._write_locked(c, [(ChangeOp.DELETE, Entity.CONFERENCE, key, payload)])

    def seed_from_topology(self, topology: Topology, pool_fqdn: str | None = None) -> int:
        """Create the accounts of the users the topology homes on ``pool_fqdn``
        (default: this store's pool) with their contacts and conferences, in
        one transaction; the number of users created.

        Idempotent: a user who already has an account is left alone, so a
        pool that restarts never overwrites what its users changed since.
        """
        pool = (pool_fqdn or self.pool_fqdn).lower()
        with self._lock:
            self.require_writable()
            with self._transaction() as c:
                existing = {r[0] for r in c.execute("SELECT uri FROM users")}
                ops: list[_Op] = []
                created = 0
                for u in topology.all_users():
                    if u.home_pool != pool or u.uri in existing:
                        continue
                    created += 1
                    ops.append(_user_op(u.uri, pool, pool, {}))
                    ops += [_contact_op(ChangeOp.UPSERT, u.uri, x) for x in u.contacts]
                    ops += [_conference_op(u.uri, m.id, m.subject, b"") for m in u.conferences]
                self._write_locked(c, ops)
                return created

    # --- replication ---------------------------------------------------------

    def high_water_mark(self) -> int:
        """The sequence number of the newest change (0 when there is none)."""
        with self._lock:
            return self._high_water_mark_locked()

    def _high_water_mark_locked(self) -> int:
        row = self._conn.execute("SELECT MAX(seq) FROM change_feed").fetchone()
        return int(row[0] or 0)

    def changes_since(self, seq: int, limit: int = 1000) -> list[Change]:
        """Changes with a sequence number above ``seq``, oldest first."""
        if limit < 1:
            raise ValueError("limit must be at least 1")
        with self._lock:
            rows = self._conn.execute(
                "SELECT seq, op, entity, key, payload, origin_pool, ts FROM change_feed "
                "WHERE seq > ? ORDER BY seq LIMIT ?",
                (seq, limit),
            ).fetchall()
        return [
            Change(s, ChangeOp(op), Entity(ent), key, json.loads(p), origin, ts)
            for s, op, ent, key, p, origin, ts in rows
        ]

    def last_applied(self, source_pool: str) -> int:
        """The newest change of ``source_pool``'s feed applied here (0: none)."""
        with self._lock:
            row = self._conn.execute(
                "SELECT last_seq FROM replication WHERE source_pool = ?", (source_pool.lower(),)
            ).fetchone()
        return int(row[0]) if row else 0

    def replication_positions(self) -> dict[str, int]:
        with self._lock:
            rows = self._conn.execute("SELECT source_pool, last_seq FROM replication").fetchall()
        return {pool: int(seq) for pool, seq in rows}

    def apply_changes(self, changes: Iterable[Change], source_pool: str) -> int:
        """Apply a batch of ``source_pool``'s feed; the number of changes
        applied. Idempotent: changes at or below the last applied sequence
        number are skipped, and the position advances in the same transaction
        as the data, so a replayed or overlapping batch is harmless.

        Refuses (``replication-gap``, nothing applied) a batch that does not
        continue exactly where the last one ended: applying past a hole would
        silently lose the missing changes.

        Applied changes are not logged in this store's own feed: pairing is
        1:1, so a change never needs a second hop, and logging it would echo
        it back to its origin.
        """
        source = source_pool.lower()
        if source == self.pool_fqdn:
            raise OperationError("replication-loop", f"pool {source} cannot replicate from itself")
        batch = sorted(changes, key=lambda ch: ch.seq)
        for ch in batch:
            if ch.origin_pool != source:
                raise OperationError(
                    "replication-source",
                    f"change {ch.seq} does not come from {source} (its origin_pool differs)",
                )
        with self._lock, self._transaction() as c:
            row = c.execute(
                "SELECT last_seq FROM replication WHERE source_pool = ?", (source,)
            ).fetchone()
            last = int(row[0]) if row else 0
            todo: list[Change] = []
            expected = last + 1
            for ch in batch:
                if ch.seq < expected:
                    continue  # already applied (replay, or a duplicate in this batch)
                if ch.seq != expected:
                    raise OperationError(
                        "replication-gap",
                        f"from {source}: expected change {expected}, got {ch.seq}; nothing applied",
                    )
                todo.append(ch)
                expected += 1
            if not todo:
                return 0
            _apply_ops(c, [(ch.op, ch.entity, ch.payload) for ch in todo])
            c.execute(
                "INSERT INTO replication (source_pool, last_seq) VALUES (?, ?) "
                "ON CONFLICT (source_pool) DO UPDATE SET last_seq = excluded.last_seq",
                (source, todo[-1].seq),
            )
            return len(todo)

    # --- reads ---------------------------------------------------------------

    def _get_user_locked(self, c: sqlite3.Connection, uri: str) -> UserRecord | None:
        row = c.execute(
            "SELECT uri, home_pool, serving_pool, settings FROM users WHERE uri = ?", (uri,)
        ).fetchone()
        return UserRecord(row[0], row[1], row[2], json.loads(row[3])) if row else None

    def get_user(self, uri: str) -> UserRecord | None:
        with self._lock:
            return self._get_user_locked(self._conn, uri)

    def users(self, *, home_pool: str | None = None) -> list[UserRecord]:
        """Every account in the store (homed here or replicated), by URI."""
        sql = "SELECT uri, home_pool, serving_pool, settings FROM users"
        args: tuple[str, ...] = ()
        if home_pool is not None:
            sql += " WHERE home_pool = ?"
            args = (home_pool.lower(),)
        with self._lock:
            rows = self._conn.execute(sql + " ORDER BY uri", args).fetchall()
        return [UserRecord(u, h, s, json.loads(js)) for u, h, s, js in rows]

    def _contacts_locked(self, c: sqlite3.Connection, owner: str) -> list[str]:
        rows = c.execute(
            "SELECT contact FROM contacts WHERE owner = ? ORDER BY rowid", (owner,)
        ).fetchall()
        return [r[0] for r in rows]

    def contacts(self, owner: str) -> list[str]:
        """``owner``'s contact list, in the order the contacts were added."""
        with self._lock:
            return self._contacts_locked(self._conn, owner)

    def conferences(self, organiser: str) -> list[ConferenceRecord]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT organiser, conf_id, subject, content FROM conferences "
                "WHERE organiser = ? ORDER BY conf_id",
                (organiser,),
            ).fetchall()
        return [ConferenceRecord(o, i, s, bytes(b)) for o, i, s, b in rows]

    def homed_view(
        self, home_pool: str
    ) -> tuple[int, list[UserRecord], dict[str, list[str]], dict[str, list[ConferenceRecord]]]:
        """The users homed on ``home_pool`` with their contact lists and
        meetings, and the high-water mark they are current to, read under one
        lock: an export (dbimpexp) is one point in time, so that a write is
        either in it (its seq at most the mark) or not."""
        pool = home_pool.lower()
        with self._lock:
            c = self._conn
            hwm = self._high_water_mark_locked()
            users = [
                UserRecord(u, h, s, json.loads(js))
                for u, h, s, js in c.execute(
                    "SELECT uri, home_pool, serving_pool, settings FROM users "
                    "WHERE home_pool = ? ORDER BY uri",
                    (pool,),
                )
            ]
            homed = {u.uri for u in users}
            contacts: dict[str, list[str]] = {u: [] for u in homed}
            for owner, contact in c.execute(
                "SELECT owner, contact FROM contacts ORDER BY owner, rowid"
            ):
                if owner in homed:
                    contacts[owner].append(contact)
            meetings: dict[str, list[ConferenceRecord]] = {u: [] for u in homed}
            for o, i, s, b in c.execute(
                "SELECT organiser, conf_id, subject, content FROM conferences "
                "ORDER BY organiser, conf_id"
            ):
                if o in homed:
                    meetings[o].append(ConferenceRecord(o, i, s, bytes(b)))
        return hwm, users, contacts, meetings

    def counts(self) -> StoreCounts:
        with self._lock:
            c = self._conn
            users = c.execute("SELECT COUNT(*) FROM users").fetchone()[0]
            homed = c.execute(
                "SELECT COUNT(*) FROM users WHERE home_pool = ?", (self.pool_fqdn,)
            ).fetchone()[0]
            served = c.execute(
                "SELECT COUNT(*) FROM users WHERE serving_pool = ?", (self.pool_fqdn,)
            ).fetchone()[0]
            contacts = c.execute("SELECT COUNT(*) FROM contacts").fetchone()[0]
            conferences = c.execute("SELECT COUNT(*) FROM conferences").fetchone()[0]
        return StoreCounts(users, homed, served, contacts, conferences)

    def snapshot(self) -> StoreSnapshot:
        with self._lock:
            c = self._conn
            users = {
                u: UserRecord(u, h, s, json.loads(js))
                for u, h, s, js in c.execute(
                    "SELECT uri, home_pool, serving_pool, settings FROM users"
                )
            }
            contacts: dict[str, list[str]] = {}
            for owner, contact in c.execute(
                "SELECT owner, contact FROM contacts ORDER BY owner, rowid"
            ):
                contacts.setdefault(owner, []).append(contact)
            confs = {
                (o, i): ConferenceRecord(o, i, s, bytes(b))
                for o, i, s, b in c.execute(
                    "SELECT organiser, conf_id, subject, content FROM conferences"
                )
            }
        return StoreSnapshot(users, {k: tuple(v) for k, v in contacts.items()}, confs)

"""Export-CsUserData and Import-CsUserData on a running pool, and the budget
DR design's nightly export (seed 001: "backing up the contact lists of your
users daily using dbimpexp.exe ... move these xml files across to your DR
site for safe keeping").

- :func:`export_users` / :func:`import_users`: the control API's export (the
  file's bytes) and import (an uploaded file into the store).
- :class:`UserDataExports`: the pool's scheduled export (topology
  ``user_data_export``, every ``timers.user_data_export_interval``), written
  to ``<state>/exports/nightly`` and copied over the network to the
  ``copy_to`` pool's share; and the share itself, ``<state>/exports/share/<pool>``,
  where this pool keeps the copies other pools send it (a file share in the DR
  site: it keeps what it is sent, checks nothing; the import checks).

A copy that fails (the DR site is down, or the site with the export is cut
off) is owed and retried; a site cut before the copy leaves the DR site with
the previous export, which is what the design restores from. :mod:`.userdata`
writes and reads the format.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, Protocol

import httpx

from sipdrill import addresses
from sipdrill.control.files import write_atomically
from sipdrill.errors import OperationError
from sipdrill.pool.store import UserStore
from sipdrill.pool.userdata import (
    ImportResult,
    export_cs_user_data,
    import_export_data,
)
from sipdrill.topology import Topology, UserDataExport

log = logging.getLogger("sipdrill.pool")

EXPORTS = "exports"
NIGHTLY = "nightly"
SHARE = "share"
#: The name of an export the job writes: the pool's short name and the time in ms.
EXPORT_NAME = re.compile(r"^userdata-[a-z0-9-]+-\d{13}\.(xml|json)$")
#: How often an owed copy is tried again.
COPY_RETRY = 5.0
#: How long a copy may take (the body goes at loopback or LAN speed).
COPY_TIMEOUT = httpx.Timeout(connect=3.0, read=60.0, write=60.0, pool=5.0)


async def export_users(
    store: UserStore, state_dir: Path, fmt: str, *, domain: str = ""
) -> tuple[bytes, dict[str, Any]]:
    """The export (XML, or JSON for ``fmt`` json) and its counts."""

    def run() -> tuple[bytes, dict[str, Any]]:
        out_dir = state_dir / EXPORTS
        out_dir.mkdir(exist_ok=True)
        path = out_dir / f"userdata-{int(time.time())}.{fmt}"
        result = export_cs_user_data(
            store, path, fmt="json" if fmt == "json" else "xml", domain=domain
        )
        summary = {
            "pool": result.pool,
            "users": result.users,
            "contacts": result.contacts,
            "meetings": result.meetings,
            "seq": result.seq,
        }
        return path.read_bytes(), summary

    return await asyncio.to_thread(run)


def import_answer(result: ImportResult, **extra: Any) -> dict[str, Any]:
    """What the control API answers for an import."""
    return {
        "users_restored": result.users_restored,
        "contacts_restored": result.contacts_restored,
        "meetings_restored": result.meetings_restored,
        "skipped": list(result.skipped),
        "reasons": dict(result.reasons),
        "export": result.export.to_json() if result.export else None,
        **extra,
    }


async def import_users(
    store: UserStore,
    data: bytes,
    *,
    name: str = "the uploaded export",
    domain: str | None = None,
    pools: Collection[str] | None = None,
) -> dict[str, Any]:
    """Restore an export's users, contacts and meetings into ``store``: all of
    it or, for a truncated, damaged or foreign file, nothing."""
    result = await asyncio.to_thread(
        import_export_data, store, data, name, domain=domain, pools=pools
    )
    return import_answer(result)


class ExportingPool(Protocol):
    """What the export job and the share use of their pool."""

    fqdn: str
    topology: Topology

    @property
    def store(self) -> UserStore: ...


def _short(pool: str) -> str:
    return pool.split(".", 1)[0]


def _created_of(name: str) -> float:
    return int(name.rsplit("-", 1)[1].split(".", 1)[0]) / 1000


class UserDataExports:
    """The pool's scheduled user-data export and its share of other pools' copies.

    ``clock`` is wall time (the export's ``created`` and the schedule); the
    schedule is kept across restarts by the newest export on disk: a restarted
    pool exports when the interval since that one has passed, and the first
    start of a pool exports at once (there must be a "last night's" export).
    """

    def __init__(
        self,
        pool: ExportingPool,
        state_dir: Path,
        *,
        token: str | None,
        loopback: bool,
        interval: Callable[[], float],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.pool = pool
        self.fqdn = pool.fqdn
        self.topology = pool.topology
        self.config: UserDataExport | None = self.topology.pool(self.fqdn).user_data_export
        self.nightly_dir = state_dir / EXPORTS / NIGHTLY
        self.share_dir = state_dir / EXPORTS / SHARE
        self._token = token
        self._loopback = loopback
        self._interval = interval
        self.clock = clock
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        #: The newest export not yet copied to ``copy_to``, and why.
        self.owed: str | None = None
        self.copy_error: str | None = None
        self._retry_at = 0.0
        self.last: dict[str, Any] | None = None

    # --- the job -------------------------------------------------------------

    def start(self) -> None:
        if self.config is None:
            return
        newest = self._own_exports()
        if newest and self.config.copy_to:
            # Copying again is harmless (same name, replaced whole), and the
            # pool may have stopped before its last copy got through.
            self.owed = newest[-1].name
        self._task = asyncio.create_task(self._loop(), name="user-data-export")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _own_exports(self) -> list[Path]:
        if not self.nightly_dir.is_dir():
            return []
        return sorted(p for p in self.nightly_dir.iterdir() if EXPORT_NAME.match(p.name))

    def due_at(self) -> float:
        """When the next scheduled export is due (wall clock); now if none was made."""
        newest = self._own_exports()
        if not newest:
            return -1.0
        return _created_of(newest[-1].name) + self._interval()

    async def _loop(self) -> None:
        while True:
            now = self.clock()
            try:
                if now >= self.due_at():
                    await self.run(reason="schedule")
                elif self.owed is not None and now >= self._retry_at:
                    async with self._lock:
                        await self._copy_owed()
            except OperationError as exc:  # the export itself failed: try next time round
                log.warning("user-data export of %s: %s", self.fqdn, exc)
            await asyncio.sleep(max(0.2, min(1.0, self.due_at() - self.clock())))

    async def run(self, *, reason: str = "administrator") -> dict[str, Any]:
        """Export now, as the schedule would, and copy it to ``copy_to``."""
        config = self.config or UserDataExport()
        async with self._lock:
            created = self.clock()
            name = f"userdata-{_short(self.fqdn)}-{int(created * 1000):013d}.{config.format}"
            path = self.nightly_dir / name

            def write() -> dict[str, Any]:
                self.nightly_dir.mkdir(parents=True, exist_ok=True)
                result = export_cs_user_data(
                    self.pool.store, path, fmt=config.format,
                    domain=self.topology.domain, created=created,
                )
                for old in self._own_exports()[: -config.keep]:
                    old.unlink(missing_ok=True)
                return {
                    "pool": result.pool, "users": result.users, "contacts": result.contacts,
                    "meetings": result.meetings, "seq": result.seq, "created": result.created,
                }

            header = await asyncio.to_thread(write)
            outcome: dict[str, Any] = {"name": name, "reason": reason, "export": header}
            if config.copy_to:
                self.owed = name
                await self._copy_owed()
                outcome |= {
                    "copy_to": config.copy_to,
                    "copied": self.owed is None,
                    "copy_error": self.copy_error,
                }
            log.info(
                "exported %d users and %d contacts of %s (%s, seq %d)%s", header["users"],
                header["contacts"], self.fqdn, name, header["seq"],
                "" if not config.copy_to else
                f"; copy to {config.copy_to}: {'done' if self.owed is None else 'owed'}",
            )
            self.last = outcome
            return outcome

    async def _copy_owed(self) -> None:
        """Send the owed export to ``copy_to``'s share; on failure it stays owed."""
        assert self.config is not None and self.config.copy_to and self.owed
        name = self.owed
        path = self.nightly_dir / name
        try:
            data = await asyncio.to_thread(path.read_bytes)
        except OSError:  # pruned meanwhile: a newer one is owed instead
            self.owed = None
            return
        target = self.config.copy_to
        url = addresses.pool_control_url(self.topology, target, loopback=self._loopback)
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
        try:
            async with httpx.AsyncClient(timeout=COPY_TIMEOUT, headers=headers) as http:
                r = await http.put(
                    f"{url}/admin/users/share",
                    params={"source_pool": self.fqdn, "name": name},
                    content=data,
                )
            if r.status_code >= 300:
                raise OperationError("copy-refused", f"{target}: HTTP {r.status_code} {r.text}")
        except (httpx.HTTPError, OperationError) as exc:
            self.copy_error = f"{type(exc).__name__}: {exc}"
            self._retry_at = self.clock() + COPY_RETRY
            log.info("copy of %s to %s owed: %s", name, target, self.copy_error)
            return
        if self.owed == name:
            self.owed = None
        self.copy_error = None

    def status(self) -> dict[str, Any] | None:
        if self.config is None:
            return None
        own = self._own_exports()
        return {
            "copy_to": self.config.copy_to,
            "interval": self._interval(),
            "exports": len(own),
            "newest": own[-1].name if own else None,
            "next_due": round(self.due_at(), 3),
            "copy_owed": self.owed,
            "copy_error": self.copy_error,
        }

    # --- the share ----------------------------------------------------------------

    def _share_path(self, source_pool: str, name: str) -> Path:
        source = source_pool.lower()
        if source not in {p.fqdn for p in self.topology.pools} or source == self.fqdn:
            raise OperationError(
                "unknown-pool", "source_pool is not another pool of this lab", 404
            )
        if not EXPORT_NAME.match(name):
            raise OperationError(
                "bad-name",
                "name is not the name of an export (userdata-<pool>-<ms>.xml|json)",
                400,
            )
        return self.share_dir / source / name

    async def receive(self, source_pool: str, name: str, data: bytes) -> dict[str, Any]:
        """Keep a copy another pool sends (replacing one of that name)."""
        path = self._share_path(source_pool, name)
        keep = self._keep_for(source_pool)

        def store() -> None:
            write_atomically(path, data, make_parents=True)
            kept = sorted(p for p in path.parent.iterdir() if EXPORT_NAME.match(p.name))
            for old in kept[:-keep]:
                old.unlink(missing_ok=True)

        await asyncio.to_thread(store)
        return {"source_pool": source_pool.lower(), "name": name, "size": len(data)}

    def _keep_for(self, source_pool: str) -> int:
        try:
            config = self.topology.pool(source_pool).user_data_export
        except KeyError:
            config = None
        return config.keep if config else UserDataExport().keep

    def held(self, source_pool: str | None = None) -> list[dict[str, Any]]:
        """The copies this pool keeps, newest first (from ``source_pool`` only if given)."""
        out: list[dict[str, Any]] = []
        if not self.share_dir.is_dir():
            return out
        for folder in sorted(self.share_dir.iterdir()):
            if source_pool is not None and folder.name != source_pool.lower():
                continue
            for path in folder.iterdir():
                if EXPORT_NAME.match(path.name):
                    out.append({
                        "source_pool": folder.name,
                        "name": path.name,
                        "created": _created_of(path.name),
                        "size": path.stat().st_size,
                    })
        out.sort(key=lambda e: (e["created"], e["name"]), reverse=True)
        return out

    def find(self, name: str | None, source_pool: str | None) -> Path:
        """A copy by name, or the newest (from ``source_pool`` if given)."""
        copies = self.held(source_pool)
        if name not in (None, "latest"):
            copies = [c for c in copies if c["name"] == name]
        if not copies:
            which = f"{name!r}" if name not in (None, "latest") else "no export"
            where = f" from {source_pool}" if source_pool else ""
            raise OperationError(
                "no-export",
                f"{self.fqdn} holds {which}{where}: nothing to restore "
                f"(held: {', '.join(c['name'] for c in self.held()) or 'none'})",
                404,
            )
        newest = copies[0]
        return self.share_dir / str(newest["source_pool"]) / str(newest["name"])

    async def import_held(
        self, name: str | None, source_pool: str | None
    ) -> dict[str, Any]:
        """Import-CsUserData of a copy this pool holds (the newest by default)."""
        path = self.find(name, source_pool)
        data = await asyncio.to_thread(path.read_bytes)
        result = await asyncio.to_thread(
            import_export_data, self.pool.store, data, path.name,
            domain=self.topology.domain, pools=[p.fqdn for p in self.topology.pools],
        )
        return import_answer(result, name=path.name, source_pool=path.parent.name)


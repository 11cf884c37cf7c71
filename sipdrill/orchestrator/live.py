"""The :class:`~sipdrill.orchestrator.engine.LabDriver` for a running lab: it
reads the clients' control APIs, injects faults through the runtime, and runs
administrator operations against the pools, as an administrator would."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
from typing import Any, Literal

import httpx

from sipdrill.errors import OperationError
from sipdrill.orchestrator.drill import AdminStep, FaultStep, WriteStep
from sipdrill.orchestrator.engine import ClientCount
from sipdrill.orchestrator.fault_model import parse_fault_request
from sipdrill.orchestrator.plan import Role, ServiceSpec
from sipdrill.orchestrator.repoint import repoint_changes
from sipdrill.orchestrator.runtime import Runtime
from sipdrill.topology import Topology

#: Events read per request from a clients process.
EVENTS_PAGE = 20_000

#: The clients' mode names (sipdrill.clients.endpoint.Mode) in the drill file's words.
CLIENT_MODES = {
    "FullService": "full",
    "ResiliencyMode": "resiliency",
    "SignedOut": "signed-out",
    "Discovering": "signing-in",
    "SigningIn": "signing-in",
    "BackingOff": "backing-off",
}


class LiveLab:
    def __init__(
        self,
        runtime: Runtime,
        topology: Topology,
        specs: list[ServiceSpec],
        token: str,
        *,
        loopback: bool,
        topology_path: str,
    ) -> None:
        self.runtime = runtime
        self.topology = topology
        self.specs = specs
        self.loopback = loopback
        self.topology_path = topology_path
        self.http = httpx.Client(timeout=10.0, headers={"Authorization": f"Bearer {token}"})
        # The event collector reads from its own thread: httpx clients are not shared.
        self._events_http = httpx.Client(timeout=10.0, headers={"Authorization": f"Bearer {token}"})
        self.written: dict[str, int] = {}
        self._added: dict[str, set[str]] = {}  # contacts the drill added, per user
        self.token = token
        #: Pool failover/failback reports: timings and writes lost (the RPO).
        self.operations: list[dict[str, Any]] = []
        # Chaos writers run one per thread, each with its own client.
        self._local = threading.local()
        self._thread_clients: list[httpx.Client] = []

    def close(self) -> None:
        self.http.close()
        self._events_http.close()
        for client in self._thread_clients:
            client.close()

    # --- clock -------------------------------------------------------------

    def clock(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    # --- clients -------------------------------------------------------------

    def client_counts(self) -> list[ClientCount]:
        out: list[ClientCount] = []
        for spec in self.specs:
            if spec.role is not Role.CLIENTS:
                continue
            try:
                r = self.http.get(f"{spec.control_url}/counts")
                r.raise_for_status()
            except httpx.HTTPError:
                continue  # a clients process that does not answer counts for nothing
            for row in r.json().get("by", []):
                mode = CLIENT_MODES.get(row["mode"], row["mode"])
                out.append(ClientCount(row["home_pool"], mode, row.get("pool"), int(row["count"])))
        return out

    def event_sources(self) -> dict[str, str]:
        return {s.name: s.control_url for s in self.specs if s.role is Role.CLIENTS}

    def fetch_events(self, url: str, after: int) -> tuple[list[str], int, int]:
        """One page of a clients process's events (``GET /events.jsonl``)."""
        r = self._events_http.get(
            f"{url}/events.jsonl", params={"after": after, "limit": EVENTS_PAGE}
        )
        r.raise_for_status()
        lines = r.text.splitlines()
        return lines, int(r.headers["X-First-Seq"]), int(r.headers["X-Latest-Seq"])

    # --- faults -------------------------------------------------------------

    def inject(self, fault: FaultStep) -> str:
        params = fault.model_dump(exclude={"kind", "target", "id"}, exclude_none=True)
        request = parse_fault_request(fault.kind, fault.target, params, self.runtime.kind)
        return self.runtime.apply(request)["id"]

    def undo(self, handle: str) -> None:
        self.runtime.undo(handle)

    def heal_all(self) -> None:
        self.runtime.heal_all()

    # --- data and administration --------------------------------------------

    def _pool_url(self, pool_fqdn: str) -> str:
        for spec in self.specs:
            if spec.role is Role.POOL and spec.pool == pool_fqdn:
                return spec.control_url
        raise OperationError("unknown-pool", f"no pool {pool_fqdn} in this lab", 404)

    def write(self, op: WriteStep) -> dict[str, Any]:
        """Each selected user adds ``op.contacts`` contacts through their home pool.
        Only acknowledged writes count: a refused write is reported, not retried."""
        users = [
            u
            for u in self.topology.all_users()
            if op.users == "*" or u.home_pool == op.users.split(":", 1)[0]
        ]
        everyone = [u.uri for u in self.topology.all_users()]
        acknowledged = refused = 0
        acked_walls: dict[str, list[float]] = {}
        acked_seqs: dict[str, list[int]] = {}
        for user in users:
            # New contacts each time: a second write step adding the same contact
            # again would be acknowledged and change nothing (an RPO miscounted).
            added = self._added.setdefault(user.uri, set())
            known = set(user.contacts) | {user.uri} | added
            extra = [c for c in everyone if c not in known][: op.contacts]
            added.update(extra)
            for contact in extra:
                try:
                    r = self.http.post(
                        f"{self._pool_url(user.home_pool)}/users/{user.uri}/contacts",
                        json={"contact": contact},
                    )
                except httpx.HTTPError:
                    refused += 1
                    continue
                if r.status_code < 300:
                    acknowledged += 1
                    acked_walls.setdefault(user.home_pool, []).append(time.time())
                    acked_seqs.setdefault(user.home_pool, []).append(int(r.json()["seq"]))
                else:
                    refused += 1
        self.written["acknowledged"] = self.written.get("acknowledged", 0) + acknowledged
        self.written["refused"] = self.written.get("refused", 0) + refused
        # acked_walls and acked_seqs: when each write was acknowledged and its seq in
        # its pool's change feed, for the RPO (the engine takes them out of the detail).
        return {
            "acknowledged": acknowledged, "refused": refused,
            "acked_walls": acked_walls, "acked_seqs": acked_seqs,
        }

    def _thread_http(self) -> httpx.Client:
        client: httpx.Client | None = getattr(self._local, "http", None)
        if client is None:
            client = httpx.Client(headers={"Authorization": f"Bearer {self.token}"})
            self._local.http = client
            self._thread_clients.append(client)
        return client

    def add_contact(
        self, pool: str, user: str, contact: str, timeout: float
    ) -> tuple[Literal["ok", "fail", "info"], dict[str, Any]]:
        """One write through ``pool`` (any thread): ``ok`` with the seq the pool
        acknowledged, ``fail`` when it certainly did not happen (refused, or
        never sent), ``info`` when nobody knows (sent, and no answer came)."""
        url = f"{self._pool_url(pool)}/users/{user}/contacts"
        try:
            r = self._thread_http().post(url, json={"contact": contact}, timeout=timeout)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            return "fail", {"error": f"{type(exc).__name__}: {exc}"}
        except httpx.HTTPError as exc:
            return "info", {"error": f"{type(exc).__name__}: {exc}"}
        if r.status_code < 300:
            return "ok", {"seq": int(r.json()["seq"])}
        try:
            code = str(r.json().get("code", ""))
        except ValueError:
            code = ""
        # A pool refuses before it writes (4xx, 503); any other 5xx may have come after.
        outcome: Literal["fail", "info"] = (
            "fail" if r.status_code < 500 or r.status_code == 503 else "info"
        )
        return outcome, {"error": f"HTTP {r.status_code}", "code": code}

    def user_data(self, pool: str, user: str) -> dict[str, Any]:
        """``GET /users/{uri}`` on ``pool``: serving pool, contacts, ..."""
        r = self.http.get(f"{self._pool_url(pool)}/users/{user}")
        if r.status_code >= 300:
            raise OperationError("user-data", f"{pool}: {user}: HTTP {r.status_code}", 503)
        return dict(r.json())

    def leftovers(self) -> list[str]:
        """What the runtime finds of faults still in place (empty: none)."""
        return self.runtime.leftovers()

    def admin(self, op: AdminStep) -> dict[str, Any]:
        """Run an administrator operation exactly as `sipdrill admin ...` does
        (the same library calls over the same control APIs)."""
        if op.op == "dns-repoint":  # the DNS control API alone: no pool clients
            return self._dns_repoint(op.pool or "", op.to or "")
        return asyncio.run(self._admin(op))

    async def _admin(self, op: AdminStep) -> dict[str, Any]:
        from sipdrill.admin import failover
        from sipdrill.backup.client import LabClients
        from sipdrill.cms import operations as cms

        async with LabClients(self.topology, token=self.token, loopback=self.loopback) as lab:
            if op.op == "pool-failover":
                report = await failover.pool_failover(
                    self.topology, op.pool or "", op.disaster_mode, lab
                )
                self.operations.append(report.to_json())
                return report.to_json()
            if op.op == "pool-failback":
                report = await failover.pool_failback(
                    self.topology, op.pool or "", op.disaster_mode, lab
                )
                self.operations.append(report.to_json())
                return report.to_json()
            if op.op == "cms-failover":
                result = await cms.cms_failover(self.topology, op.force, lab)
                return _as_dict(result)
            if op.op == "backup-sync":
                backup = lab.backup(op.pool or "")
                if backup is None:
                    raise OperationError("no-backup", f"{op.pool} has no Backup Service", 409)
                return dict(await backup.sync())
        if op.op == "user-move" and op.from_pool is not None:
            return self._move_all(op)
        if op.op == "user-export":
            return self._pool_op(op.pool or "", "POST", "/admin/users/export-job", _export_ok)
        if op.op == "user-import":
            return self._pool_op(
                op.pool or "", "POST", "/admin/users/import-held", _import_ok,
                json={"source_pool": op.from_pool},
            )
        if op.op == "user-move":
            r = self.http.post(
                f"{self._pool_url(op.to or '')}/admin/users/move",
                json={"user": op.user, "to": op.to, "force": op.force},
            )
            if r.status_code >= 300:
                raise OperationError("user-move", r.text, r.status_code)
            return dict(r.json())
        raise OperationError("not-available", f"{op.op} is not implemented yet", 501)

    def _pool_op(
        self, pool: str, method: str, path: str, check: Any, **kw: Any
    ) -> dict[str, Any]:
        """One request to a pool's control API; ``check`` refuses a result that
        answered 200 but did not do the job (an export not copied...)."""
        try:
            r = self.http.request(method, f"{self._pool_url(pool)}{path}", timeout=120.0, **kw)
        except httpx.HTTPError as exc:
            raise OperationError("pool-down", f"{pool} did not answer: {exc}", 503) from None
        if r.status_code >= 300:
            raise _refused(r)
        result: dict[str, Any] = r.json()
        check(result)
        return result

    def _move_all(self, op: AdminStep) -> dict[str, Any]:
        """Move-CsUser over every user of ``op.from_pool``: one request to the
        target, its progress lines read as they come, the result kept (without
        the list of users moved: the count says it)."""
        from sipdrill.pool.bulk_moves import DEFAULT_RATE

        body = {
            "from_pool": op.from_pool, "to": op.to, "force": op.force,
            "rate": op.rate or DEFAULT_RATE,
        }
        timeout = httpx.Timeout(connect=10.0, read=120.0, write=60.0, pool=10.0)
        result: dict[str, Any] | None = None
        with self.http.stream(
            "POST", f"{self._pool_url(op.to or '')}/admin/users/move-all", json=body,
            timeout=timeout,
        ) as r:
            if r.status_code >= 300:
                r.read()
                raise _refused(r)
            for line in r.iter_lines():
                event = json.loads(line) if line.strip() else {}
                if event.get("event") == "error":
                    raise OperationError(str(event["code"]), str(event["message"]), 502)
                if event.get("event") == "result":
                    result = event
        if result is None:
            raise OperationError("user-move", f"{op.to} ended the move without a result", 502)
        result.pop("event", None)
        result.pop("users", None)
        if result["failed"]:
            raise OperationError(
                "user-move",
                f"{len(result['failed'])} of {result['total']} users were not moved: "
                + "; ".join(f"{f['user']}: {f['message']}" for f in result["failed"][:5]),
                502,
            )
        return result

    def _dns_repoint(self, old: str, new: str) -> dict[str, Any]:
        """Point every DNS view's lookup records from ``old`` to ``new`` in one
        atomic change (one serial bump): the last recovery step of seed 001 (docs/sources.md)."""
        pools = {p.fqdn: p for p in self.topology.pools}
        if old not in pools or new not in pools or old == new:
            raise OperationError(
                "dns-repoint", f"needs two different pools of the topology: {sorted(pools)}", 422
            )
        dns_url = next((s.control_url for s in self.specs if s.role is Role.DNS), None)
        if dns_url is None:
            raise OperationError("no-dns", "this lab runs no DNS server", 409)
        hosts = [fe.fqdn for fe in pools[old].front_ends]
        changes: list[dict[str, Any]] = []
        for view in self._dns_get(f"{dns_url}/zone")["views"]:
            records = self._dns_get(f"{dns_url}/records", view=view)
            changes += repoint_changes(records, old, new, old_hosts=hosts, view=view)
        if not changes:
            raise OperationError("dns-repoint", f"no SRV or address record points to {old}", 409)
        r = self.http.post(f"{dns_url}/changes", json={"changes": changes})
        if r.status_code >= 300:
            raise OperationError("dns-repoint", r.text, r.status_code)
        return {"operation": "dns-repoint", "from": old, "to": new, **r.json(), "changes": changes}

    def _dns_get(self, url: str, **params: str) -> Any:
        r = self.http.get(url, params=params)
        if r.status_code >= 300:
            raise OperationError("dns-repoint", f"{url}: {r.text}", r.status_code)
        return r.json()

    def data_report(self) -> dict[str, Any]:
        report: dict[str, Any] = {"writes": dict(self.written), "operations": self.operations}
        for spec in self.specs:
            if spec.role in (Role.POOL, Role.BACKUP):
                try:
                    r = self.http.get(f"{spec.control_url}/status", timeout=3.0)
                    report[spec.name] = (
                        r.json() if r.status_code == 200 else {"http": r.status_code}
                    )
                except httpx.HTTPError as exc:
                    report[spec.name] = {"unreachable": type(exc).__name__}
        return report


def _refused(r: httpx.Response) -> OperationError:
    try:
        body = r.json()
        return OperationError(str(body["code"]), str(body["message"]), r.status_code)
    except (ValueError, KeyError, TypeError):
        return OperationError("refused", f"HTTP {r.status_code}: {r.text[:300]}", r.status_code)


def _export_ok(result: dict[str, Any]) -> None:
    if result.get("copy_to") and not result.get("copied"):
        raise OperationError(
            "copy-owed",
            f"exported {result['name']}, but its copy to {result['copy_to']} failed: "
            f"{result.get('copy_error')} (the pool retries it)",
            502,
        )


def _import_ok(result: dict[str, Any]) -> None:
    skipped = result.get("skipped") or []
    if skipped:
        reasons = result.get("reasons") or {}
        raise OperationError(
            "not-restored",
            f"{len(skipped)} users of the export were not restored: "
            + "; ".join(f"{u}: {reasons.get(u, '?')}" for u in skipped[:5]),
            502,
        )


def _as_dict(value: Any) -> dict[str, Any]:
    if hasattr(value, "to_json"):
        return dict(value.to_json())
    if hasattr(value, "model_dump"):
        return dict(value.model_dump(mode="json"))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return {"result": str(value)}

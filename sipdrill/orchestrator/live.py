"""The :class:`~sipdrill.orchestrator.engine.LabDriver` for a running lab: it
reads the clients' control APIs, injects faults through the runtime, and runs
administrator operations against the pools, as an administrator would."""

from __future__ import annotations

import importlib
import time
from typing import Any, Protocol

import httpx

from sipdrill.errors import OperationError
from sipdrill.orchestrator.drill import AdminStep, FaultStep, WriteStep
from sipdrill.orchestrator.engine import ClientCount
from sipdrill.orchestrator.plan import Role, ServiceSpec
from sipdrill.topology import Topology

#: The clients' mode names (sipdrill.clients.endpoint.Mode) in the drill file's words.
CLIENT_MODES = {
    "FullService": "full",
    "ResiliencyMode": "resiliency",
    "SignedOut": "signed-out",
    "Discovering": "signing-in",
    "SigningIn": "signing-in",
    "BackingOff": "backing-off",
}


class Runtime(Protocol):
    """What both runtimes (local, docker) offer the drill engine."""

    def inject(self, kind: str, target: str, **params: Any) -> dict[str, Any]: ...
    def undo(self, fault_id: str) -> None: ...
    def heal_all(self) -> None: ...


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
        self.written: dict[str, int] = {}

    def close(self) -> None:
        self.http.close()

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

    # --- faults -------------------------------------------------------------

    def inject(self, fault: FaultStep) -> str:
        params = fault.model_dump(exclude={"kind", "target", "id"}, exclude_none=True)
        return str(self.runtime.inject(fault.kind, fault.target, **params)["id"])

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
        for user in users:
            known = set(user.contacts) | {user.uri}
            extra = [c for c in everyone if c not in known][: op.contacts]
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
                else:
                    refused += 1
        self.written["acknowledged"] = self.written.get("acknowledged", 0) + acknowledged
        self.written["refused"] = self.written.get("refused", 0) + refused
        return {"acknowledged": acknowledged, "refused": refused}

    def admin(self, op: AdminStep) -> dict[str, Any]:
        """Run an administrator operation the way `sipdrill admin ...` does."""
        failover = _optional("sipdrill.services.failover")
        if op.op in ("pool-failover", "pool-failback", "cms-failover", "backup-sync") and (
            failover is None
        ):
            raise OperationError(
                "not-available", f"{op.op} needs sipdrill.services.failover, not in this build", 501
            )
        if op.op == "pool-failover":
            return dict(failover.run_pool_failover(self, op.pool, op.disaster_mode))  # type: ignore[union-attr]
        if op.op == "pool-failback":
            return dict(failover.run_pool_failback(self, op.pool, op.disaster_mode))  # type: ignore[union-attr]
        if op.op == "cms-failover":
            return dict(failover.run_cms_failover(self, op.force))  # type: ignore[union-attr]
        if op.op == "backup-sync":
            return dict(failover.run_backup_sync(self, op.pool))  # type: ignore[union-attr]
        if op.op == "user-move":
            r = self.http.post(
                f"{self._pool_url(op.to or '')}/admin/users/move",
                json={"user": op.user, "to": op.to, "force": op.force},
            )
            if r.status_code >= 300:
                raise OperationError("user-move", r.text, r.status_code)
            return dict(r.json())
        raise OperationError("not-available", f"{op.op} is not implemented yet", 501)

    def data_report(self) -> dict[str, Any]:
        report: dict[str, Any] = {"writes": dict(self.written)}
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


def _optional(module: str) -> Any | None:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError:
        return None

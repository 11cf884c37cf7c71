"""Faults on a docker lab: a request's target (a service, ``clients``, a
replica, or a network: every container whose plan address is on it, as one
fault) becomes containers, the request a fault of
:mod:`sipdrill.orchestrator.faults`, journalled in ``<state dir>/faults.json``
before it takes effect, so that ``sipdrill lab down`` heals what a crashed
orchestrator left before it removes the lab.

Also the container helpers the lab and its faults share (the engine, a
container's service name and health).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
from docker.errors import DockerException, NotFound
from docker.models.containers import Container

from sipdrill.errors import FaultError, OperationError
from sipdrill.orchestrator import labels
from sipdrill.orchestrator.compose import CLIENTS_SERVICE
from sipdrill.orchestrator.docker_runtime import RUNTIME, DockerRuntime, DockerUnavailable
from sipdrill.orchestrator.fault_model import (
    FaultJournal,
    FaultKind,
    FaultRequest,
    pool_target,
    raise_heal_errors,
)
from sipdrill.orchestrator.faults import (
    IPT,
    LAB_FAULT_KINDS,
    TC_NETEM,
    TC_ROOT,
    Crash,
    Cut,
    Degrade,
    Disconnect,
    DnsOutage,
    DockerFault,
    DockerFaultRegistry,
    Partition,
    Pause,
    Restart,
    Stop,
)
from sipdrill.orchestrator.plan import Role, ServiceSpec, pool_targets
from sipdrill.orchestrator.runtime import InjectedFault

Progress = Callable[[str], None]

#: Compose's label with a replica's number (clients-1, clients-2, ...).
COMPOSE_NUMBER = "com.docker.compose.container-number"


@contextlib.contextmanager
def lab_engine() -> Iterator[DockerRuntime]:
    """The Docker engine, or OperationError ``no-docker``."""
    try:
        rt = DockerRuntime.from_env()
    except DockerUnavailable as exc:
        raise OperationError("no-docker", str(exc), 503) from None
    with rt:
        yield rt


def service_of(c: Container) -> str:
    """The lab service name of a container: ``pool1``, or ``clients-2`` for a replica."""
    lab_labels = c.labels
    service = lab_labels.get(labels.SERVICE, c.name)
    if service == CLIENTS_SERVICE:
        return f"{CLIENTS_SERVICE}-{lab_labels.get(COMPOSE_NUMBER, '1')}"
    return str(service)


def container_health(c: Container) -> str:
    state = c.attrs["State"]
    if state["Paused"]:
        return "paused"
    if not state["Running"]:
        return f"{state['Status']} ({state.get('ExitCode')})"
    return str((state.get("Health") or {}).get("Status") or "running")


class DockerLabFaults:
    """The faults of the docker lab ``lab``, journalled at ``journal``;
    ``specs`` gives the lab's plan (for sites and the DNS server)."""

    def __init__(
        self,
        lab: str,
        journal: Path,
        specs: Callable[[], list[ServiceSpec]],
        progress: Progress,
    ) -> None:
        self.lab = lab
        self.journal = journal
        self.specs = specs
        self.progress = progress

    def registry(self, rt: DockerRuntime) -> DockerFaultRegistry:
        """The journal's faults (left by this or a crashed orchestrator)."""
        return DockerFaultRegistry(rt, self.journal, kinds=LAB_FAULT_KINDS)

    def active(self) -> list[dict[str, Any]]:
        """The journal's faults: id, kind and containers of each."""
        try:
            records = FaultJournal(self.journal, RUNTIME).records()
        except FaultError:
            return []
        return [
            {"id": r["id"], "kind": r["kind"], "containers": r["params"].get("containers", [])}
            for r in records
        ]

    def _targets(self, rt: DockerRuntime, target: str, kind: str) -> list[str]:
        """Container names for a service (``pool1``; ``clients`` is every
        replica, ``clients-2`` one), a pool or front end (``pool1/fe2``: its
        container; ``pool1`` of several front ends: all of them, for cut and
        crash, as the local runtime: :func:`~sipdrill.orchestrator.fault_model.pool_target`),
        or for a site or ``core`` (every container whose plan address is on it)."""
        specs = self.specs()
        containers = {service_of(c): c.name for c in rt.lab_containers(self.lab)}
        if target in containers:
            return [containers[target]]
        pool = pool_target(specs, target, kind, RUNTIME)
        if pool is not None:
            missing = [s for s in pool if s not in containers]
            if missing:
                raise FaultError(
                    kind, RUNTIME, f"{target}: lab {self.lab} has no container for {missing[0]}"
                )
            return sorted(containers[s] for s in pool)
        if target == CLIENTS_SERVICE:
            found = [n for s, n in containers.items() if s.startswith(f"{CLIENTS_SERVICE}-")]
        else:
            home = {s.name: s.network for s in specs}
            found = [
                n
                for s, n in containers.items()
                if home.get(s, "core" if s.startswith(f"{CLIENTS_SERVICE}-") else None) == target
            ]
        if not found:
            sites = sorted({s.network for s in specs})
            raise FaultError(
                kind,
                RUNTIME,
                f"unknown target {target!r}; services: {', '.join(sorted(containers))}; "
                f"pools and front ends: {', '.join(pool_targets(specs))}; "
                f"networks (every service on it): {', '.join(sites)}",
            )
        return sorted(found)

    def _make(self, rt: DockerRuntime, request: FaultRequest) -> DockerFault:
        kind = request.kind
        containers = self._targets(rt, request.target, kind)
        if kind is FaultKind.CUT:
            return Cut(rt, containers)
        if kind is FaultKind.DISCONNECT:
            return Disconnect(rt, containers)
        if kind is FaultKind.PARTITION:
            assert request.peer is not None  # parse_fault_request
            return Partition(rt, containers, self._targets(rt, request.peer, kind))
        if kind is FaultKind.DEGRADE:
            return Degrade(
                rt,
                containers,
                delay_ms=request.delay_ms,
                jitter_ms=request.jitter_ms,
                loss_percent=request.loss_percent,
            )
        if kind is FaultKind.CRASH:
            return Crash(rt, containers)
        if kind is FaultKind.PAUSE:
            return Pause(rt, containers)
        if kind in (FaultKind.STOP, FaultKind.RESTART):
            return (Stop if kind is FaultKind.STOP else Restart)(rt, containers, timeout=5)
        assert kind is FaultKind.DNS_OUTAGE  # parse_fault_request knows this runtime's kinds
        dns = [s for s in self.specs() if s.role is Role.DNS]
        if not dns or containers != self._targets(rt, dns[0].name, kind):
            raise FaultError(kind, RUNTIME, f"{request.target} is not the DNS server")
        return DnsOutage(rt, containers, url=dns[0].control_url, mode=request.mode)

    def apply(self, request: FaultRequest) -> InjectedFault:
        """Inject a fault; it is journalled before it takes effect."""
        with lab_engine() as rt:
            registry = self.registry(rt)
            fault = self._make(rt, request)
            registry.inject(fault)
            self.progress(f"fault {fault.describe()} injected ({fault.id})")
            if request.kind is FaultKind.RESTART:
                registry.undo(fault)  # it is over; undo only starts what did not come back
                self._wait_running_healthy(rt, fault.containers)
        return {
            "id": fault.id,
            "kind": request.kind,
            "target": request.target,
            "containers": fault.containers,
        }

    def _wait_running_healthy(self, rt: DockerRuntime, names: Sequence[str]) -> None:
        deadline = time.monotonic() + 90.0
        pending = set(names)
        while pending:
            for name in list(pending):
                c = rt.find(name)
                if c is not None and container_health(c) in ("healthy", "running"):
                    pending.discard(name)
            if pending and time.monotonic() > deadline:
                raise FaultError(
                    FaultKind.RESTART, RUNTIME, f"{', '.join(sorted(pending))} not healthy"
                )
            if pending:
                time.sleep(0.5)

    def undo(self, fault_id: str) -> None:
        """Undo a fault (idempotent: an unknown or healed id does nothing)."""
        with lab_engine() as rt:
            fault = self.registry(rt).heal_one(fault_id)
        if fault is not None:
            self.progress(f"fault {fault.kind} healed ({fault_id})")

    def heal_all(self) -> None:
        """Undo every fault in the journal; raise if any could not be undone."""
        with lab_engine() as rt:
            errors = self.registry(rt).heal() if self.journal.exists() else []
            # Belt and braces: nothing of the lab stays frozen, whatever the journal says.
            for c in rt.lab_containers(self.lab):
                if c.attrs["State"]["Paused"]:
                    with contextlib.suppress(DockerException, NotFound):
                        c.unpause()
        raise_heal_errors(errors, RUNTIME)

    def leftovers(self, token: str) -> list[str]:
        """Faults still in place, whatever the journal says: the journal's, paused,
        stopped or unplugged containers, a fault's iptables chain or qdisc in a
        container's namespace, a DNS server with a fault set."""
        found = [
            f"fault {f['id']} ({f['kind']} on {', '.join(f['containers'])}) still in the journal"
            for f in self.active()
        ]
        with lab_engine() as rt:
            for c in rt.lab_containers(self.lab):
                name = service_of(c)
                state = c.attrs["State"]
                if state["Paused"]:
                    found.append(f"{name}: paused")
                    continue
                if not state["Running"]:
                    found.append(f"{name}: not running ({state['Status']})")
                    continue
                if not c.attrs["NetworkSettings"]["Networks"]:
                    found.append(f"{name}: on no network (disconnected)")
                try:
                    ns = rt.netns(c, fault="probe")
                except FaultError as exc:
                    found.append(f"{name}: its namespace cannot be probed: {exc.message}")
                    continue
                rc, out = rt.run_sh(ns, f"{IPT} -S; tc qdisc show")
                if rc != 0:
                    found.append(f"{name}: probe failed ({rc}): {out.strip()[-200:]}")
                for line in out.splitlines():
                    if line.startswith("-N ") and labels.FAULT_PREFIX in line:
                        found.append(f"{name}: iptables chain {line.split()[1]}")
                    elif line.startswith("qdisc ") and any(
                        f" {handle} " in f"{line} " for handle in (TC_ROOT, TC_NETEM)
                    ):
                        found.append(f"{name}: {line.strip()}")
        dns = [s for s in self.specs() if s.role is Role.DNS]
        for spec in dns:
            try:
                with httpx.Client(timeout=3.0, headers={"Authorization": f"Bearer {token}"}) as h:
                    r = h.get(f"{spec.control_url}/faults")
                faults = r.json() if r.status_code == 200 else {"unreadable": r.status_code}
            except (httpx.HTTPError, ValueError) as exc:
                found.append(f"{spec.name}: its faults cannot be read ({type(exc).__name__})")
                continue
            found += [f"{spec.name}: DNS fault {k}={v}" for k, v in faults.items() if v]
        return found

    def heal_before_removal(self, rt: DockerRuntime) -> None:
        """Heal the journal's faults before the lab's containers go; say what
        could not be undone (the containers go anyway)."""
        if self.journal.exists():
            for e in self.registry(rt).heal():
                self.progress(f"heal {e.fault}: {e.message}")

"""The docker runtime: the lab as containers, behind the same interface as
:class:`~sipdrill.orchestrator.local_runtime.LocalRuntime` (up, down, status,
inject, undo, heal_all, token).

``up`` runs the lab as a Compose project, from the Compose file that
:mod:`sipdrill.orchestrator.compose` generates for the plan (written to the
lab's state directory). Compose rather than the SDK directly: a drill then
runs exactly what ``docker-compose up -d`` on the committed ``compose.yaml``
runs (same networks, health checks, start order gated on health, clients'
user slots), so there is one description of a docker lab, not two that drift.
The SDK is used where Compose has nothing to offer: watching health for
progress lines, status, faults, and removal (by the ``sipdrill.lab`` label,
which also finds what a crashed ``up`` or a hand-started ``docker-compose``
left).

Faults map onto :mod:`sipdrill.orchestrator.faults` (a site target becomes
every container whose plan address is in that site, as one fault), plus
``dns-outage`` through the DNS server's control API. Every fault is journalled
in ``<state dir>/faults.json`` before it takes effect, so ``sipdrill lab down``
heals what a crashed orchestrator left, before it removes the lab.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from docker.errors import DockerException, ImageNotFound, NotFound
from docker.models.containers import Container

from sipdrill.control.files import write_atomically
from sipdrill.errors import FaultError, OperationError
from sipdrill.orchestrator import labels
from sipdrill.orchestrator.compose import (
    CLIENTS_SERVICE,
    ComposeOptions,
    compose_model,
    networks_of,
    render,
)
from sipdrill.orchestrator.docker_runtime import (
    RUNTIME,
    DockerRuntime,
    DockerUnavailable,
    compose_command,
)
from sipdrill.orchestrator.faults import (
    FAULT_KINDS,
    Crash,
    Cut,
    Degrade,
    Disconnect,
    Fault,
    FaultJournal,
    FaultRegistry,
    Partition,
    Pause,
    Restart,
    Stop,
    journal_path,
)
from sipdrill.orchestrator.local_runtime import spec_from_dict
from sipdrill.orchestrator.plan import Role, RuntimeKind, ServiceSpec
from sipdrill.topology import load_topology

Progress = Callable[[str], None]

STATE_FILE = "docker-lab.json"
DEFAULT_IMAGE = "sipdrill:latest"
#: Compose's label with a replica's number (clients-1, clients-2, ...).
COMPOSE_NUMBER = "com.docker.compose.container-number"

#: What each drill fault kind does on this runtime.
DOCKER_FAULTS = {
    "cut": "silent drop on every interface (iptables in, tc out), in the containers' namespaces",
    "disconnect": "docker network disconnect from every network; undo reconnects, same addresses",
    "partition": "the target and `peer` (sites or services) drop each other's every address",
    "degrade": "delay_ms, jitter_ms, loss_percent on the way out (NFQUEUE: no netem here)",
    "crash": "docker kill (SIGKILL); undo starts the container",
    "stop": "docker stop; undo starts it",
    "pause": "docker pause (frozen; the kernel still accepts); undo unpauses",
    "restart": "docker restart, then wait until healthy (nothing to undo)",
    "dns-outage": "the DNS server drops queries (mode drop) or answers SERVFAIL, via its API",
}


def _quiet(_: str) -> None:
    pass


class DnsOutage(Fault):
    """The DNS server drops every query (``mode="drop"``) or answers SERVFAIL,
    through its control API (``PUT/DELETE /faults``). The token is the one
    the container runs with, so the journal holds no secret."""

    kind = "dns-outage"

    def __init__(
        self,
        runtime: DockerRuntime,
        containers: Sequence[str],
        *,
        url: str,
        mode: str = "drop",
        fault_id: str | None = None,
    ) -> None:
        super().__init__(runtime, containers, fault_id=fault_id)
        if mode not in ("drop", "servfail"):
            raise FaultError(self.kind, RUNTIME, f"mode must be drop or servfail, not {mode!r}")
        self.url = url
        self.mode = mode

    def params(self) -> dict[str, Any]:
        return {**super().params(), "url": self.url, "mode": self.mode}

    def describe(self) -> str:
        return f"dns-outage ({self.mode}) on {', '.join(self.containers)}"

    def _call(self, method: str, name: str) -> None:
        c = self.runtime.container(name, fault=self.kind)
        env = dict(e.split("=", 1) for e in c.attrs["Config"].get("Env") or [] if "=" in e)
        token = env.get("SIPDRILL_DNS_TOKEN") or env.get("SIPDRILL_CONTROL_TOKEN", "")
        body = {self.mode: True} if method == "PUT" else None
        with httpx.Client(timeout=5.0, headers={"Authorization": f"Bearer {token}"}) as http:
            try:
                r = http.request(method, f"{self.url}/faults", json=body)
            except httpx.HTTPError as exc:
                raise FaultError(self.kind, RUNTIME, f"{self.url}: {exc!r}") from exc
        if r.status_code >= 300:
            raise FaultError(self.kind, RUNTIME, f"the DNS control API said {r.status_code}")

    def _inject(self) -> None:
        for name in self.containers:
            self._call("PUT", name)

    def _undo(self) -> None:
        for name in self.containers:
            c = self.runtime.find(name)
            if c is None or not c.attrs["State"]["Running"]:
                continue  # gone or stopped: the fault lived in its memory
            self._call("DELETE", name)


#: The fault kinds of a docker lab: faults.py's and dns-outage.
LAB_FAULT_KINDS: dict[str, type[Fault]] = {**FAULT_KINDS, DnsOutage.kind: DnsOutage}


class LabFaultRegistry(FaultRegistry):
    """A :class:`FaultRegistry` whose journal may also hold ``dns-outage``."""

    def __init__(self, runtime: DockerRuntime, journal: Path | str) -> None:
        super().__init__(runtime, None)
        self.journal = FaultJournal(journal)
        for record in self.journal.records():
            cls = LAB_FAULT_KINDS.get(record.get("kind", ""))
            if cls is None:
                raise FaultError(str(record.get("kind")), RUNTIME, "unknown kind in the journal")
            self._adopt(cls.from_record(runtime, record))


@dataclass
class DockerLabState:
    lab: str
    project: str
    token: str
    image: str
    compose_file: str
    runtime: str = RUNTIME
    specs: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> DockerLabState | None:
        try:
            return cls(**json.loads(path.read_text()))
        except FileNotFoundError:
            return None

    def save(self, path: Path) -> None:
        data = json.dumps(asdict(self), indent=2).encode()
        write_atomically(path, data, mode=0o600, make_parents=True)  # it holds the token


def _service_of(c: Container) -> str:
    """The lab service name of a container: ``pool1``, or ``clients-2`` for a replica."""
    lab_labels = c.labels
    service = lab_labels.get(labels.SERVICE, c.name)
    if service == CLIENTS_SERVICE:
        return f"{CLIENTS_SERVICE}-{lab_labels.get(COMPOSE_NUMBER, '1')}"
    return str(service)


def _health(c: Container) -> str:
    state = c.attrs["State"]
    if state["Paused"]:
        return "paused"
    if not state["Running"]:
        return f"{state['Status']} ({state.get('ExitCode')})"
    return str((state.get("Health") or {}).get("Status") or "running")


def _home_address(c: Container, network: str | None) -> str:
    """The address of the container's leg on ``network`` (full name), else
    the leg with a fixed address (its plan address), else any."""
    nets = c.attrs["NetworkSettings"]["Networks"] or {}
    if network and nets.get(network, {}).get("IPAddress"):
        return str(nets[network]["IPAddress"])
    for data in nets.values():
        if (data.get("IPAMConfig") or {}).get("IPv4Address"):
            return str(data["IPAMConfig"]["IPv4Address"])
    return next((str(d["IPAddress"]) for d in nets.values() if d.get("IPAddress")), "")


def _order(specs: Sequence[ServiceSpec]) -> dict[str, int]:
    return {s.name: i for i, s in enumerate(specs)}


class DockerLab:
    """A lab of containers, one Compose project, kept in ``state_dir``."""

    kind = RuntimeKind.DOCKER

    def __init__(
        self,
        lab: str,
        state_dir: Path,
        progress: Progress = _quiet,
        *,
        topology_file: Path | None = None,
        image: str | None = None,
    ) -> None:
        self.lab = lab
        self.state_dir = state_dir
        self.state_path = state_dir / STATE_FILE
        self.journal = journal_path(state_dir)
        self.progress = progress
        self.topology_file = topology_file
        self.image = image or os.environ.get("SIPDRILL_IMAGE", DEFAULT_IMAGE)

    # --- engine and state ----------------------------------------------------

    @contextlib.contextmanager
    def _engine(self) -> Iterator[DockerRuntime]:
        try:
            rt = DockerRuntime.from_env()
        except DockerUnavailable as exc:
            raise OperationError("no-docker", str(exc), 503) from None
        with rt:
            yield rt

    def _state(self) -> DockerLabState:
        state = DockerLabState.load(self.state_path)
        if state is None:
            raise OperationError(
                "lab-not-up", f"no docker lab {self.lab!r} in {self.state_dir}", 404
            )
        return state

    @property
    def project(self) -> str:
        return self.lab

    @property
    def token(self) -> str:
        state = DockerLabState.load(self.state_path)
        if state is not None:
            return state.token
        # A lab started by hand with docker-compose: the token its services run with.
        with self._engine() as rt:
            for c in rt.lab_containers(self.lab):
                env = dict(e.split("=", 1) for e in c.attrs["Config"].get("Env") or [] if "=" in e)
                if env.get("SIPDRILL_CONTROL_TOKEN"):
                    return str(env["SIPDRILL_CONTROL_TOKEN"])
        return self._state().token  # raises lab-not-up

    def _specs(self) -> list[ServiceSpec]:
        state = DockerLabState.load(self.state_path)
        return [spec_from_dict(d) for d in state.specs] if state else []

    # --- lifecycle -----------------------------------------------------------

    def up(self, specs: list[ServiceSpec], timeout: float = 90.0) -> None:
        """Start the lab's Compose project and wait until every container is
        healthy (``timeout``: for each dependency level of the plan)."""
        if self.topology_file is None:
            raise OperationError("no-topology", "the docker runtime needs the topology file", 400)
        topology = load_topology(self.topology_file).topology
        with self._engine() as rt:
            self._preflight(rt, topology_subnets=list(networks_of(topology).values()))
        self.state_dir.mkdir(parents=True, exist_ok=True)
        compose_file = self.state_dir / "compose.yaml"
        state = DockerLabState(
            lab=self.lab,
            project=self.project,
            token=secrets.token_urlsafe(24),
            image=self.image,
            compose_file=str(compose_file),
            specs=[asdict(s) for s in specs],
        )
        options = ComposeOptions(
            lab=self.lab, topology_source=str(self.topology_file.resolve()), port_base=None
        )
        model = compose_model(topology, specs, options)
        compose_file.write_text(
            render(model, header=f"# lab {self.lab}: written by the sipdrill docker runtime\n")
        )
        state.save(self.state_path)
        started = time.monotonic()
        levels = _levels(specs)
        deadline = started + timeout * max(levels, 1)
        seen: dict[str, str] = {}  # service -> the state last reported
        try:
            self._compose_up(state, specs, deadline, started, seen)
            self._wait_healthy(specs, deadline, started, seen)
        except BaseException:
            self.progress("start failed: removing what was started")
            with contextlib.suppress(Exception):
                self.down()
            raise
        self.progress(f"lab {self.lab} healthy after {time.monotonic() - started:.1f} s")

    def _preflight(self, rt: DockerRuntime, topology_subnets: list[ipaddress.IPv4Network]) -> None:
        lab_filter = labels.lab_filter(self.lab)
        if (
            rt.lab_containers(self.lab)
            or rt.client.networks.list(filters=lab_filter)
            or rt.client.volumes.list(filters=lab_filter)
        ):
            raise OperationError(
                "lab-already-up",
                f"docker lab {self.lab!r} already has containers, networks or volumes: "
                f"run `sipdrill lab down {self.lab} --runtime docker` first",
            )
        try:
            rt.client.images.get(self.image)
        except ImageNotFound:
            raise OperationError(
                "no-image", f"no image {self.image}: run `make image` first", 503
            ) from None
        for net in rt.client.networks.list():
            for entry in (net.attrs.get("IPAM") or {}).get("Config") or []:
                try:
                    subnet = ipaddress.ip_network(entry.get("Subnet", ""), strict=False)
                except ValueError:
                    continue
                clash = [s for s in topology_subnets if s.version == 4 and s.overlaps(subnet)]
                if clash:
                    owner = (net.attrs.get("Labels") or {}).get(labels.LAB)
                    hint = (
                        f"run `sipdrill lab down {owner} --runtime docker`"
                        if owner
                        else f"remove it (docker network rm {net.name})"
                    )
                    raise OperationError(
                        "subnet-in-use",
                        f"network {net.name} ({subnet}) overlaps this lab's {clash[0]}: {hint}",
                    )
        if compose_command() is None:
            raise OperationError(
                "no-compose", "neither `docker compose` nor `docker-compose` is installed", 503
            )

    def _compose_up(
        self,
        state: DockerLabState,
        specs: list[ServiceSpec],
        deadline: float,
        started: float,
        seen: dict[str, str],
    ) -> None:
        command = compose_command()
        assert command is not None  # checked by _preflight
        env = {**os.environ, "SIPDRILL_CONTROL_TOKEN": state.token, "SIPDRILL_IMAGE": state.image}
        argv = [*command, "--ansi", "never", "-p", state.project, "-f", state.compose_file]
        self.progress(f"{' '.join(command)} up: project {state.project}, {len(specs)} service(s)")
        log = self.state_dir / "compose-up.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(
                [*argv, "up", "-d"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        try:
            with self._engine() as rt:
                while proc.poll() is None:
                    self._report(rt, seen, started)
                    if time.monotonic() > deadline:
                        raise OperationError(
                            "start-timeout",
                            "docker-compose up did not finish in time:\n" + self._diagnose(rt, log),
                            504,
                        )
                    time.sleep(0.5)
                self._report(rt, seen, started)
                if proc.returncode != 0:
                    raise OperationError(
                        "start-failed",
                        f"docker-compose up failed ({proc.returncode}):\n"
                        + self._diagnose(rt, log),
                        500,
                    )
        finally:
            if proc.poll() is None:
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()

    def _report(self, rt: DockerRuntime, seen: dict[str, str], started: float) -> None:
        """A progress line for each container whose state changed."""
        for c in rt.lab_containers(self.lab):
            name, health = _service_of(c), _health(c)
            if seen.get(name) != health:
                seen[name] = health
                self.progress(f"{name}: {health} ({time.monotonic() - started:.1f} s)")

    def _wait_healthy(
        self, specs: list[ServiceSpec], deadline: float, started: float, seen: dict[str, str]
    ) -> None:
        expected = {s.name for s in specs if s.role is not Role.CLIENTS}
        n_clients = sum(1 for s in specs if s.role is Role.CLIENTS)
        with self._engine() as rt:
            while True:
                self._report(rt, seen, started)
                healthy = {n for n, h in seen.items() if h == "healthy"}
                replicas = {n for n in healthy if n.startswith(f"{CLIENTS_SERVICE}-")}
                if expected <= healthy and len(replicas) >= n_clients:
                    return
                dead = [n for n, h in seen.items() if h.startswith(("exited", "dead", "unhealthy"))]
                if dead or time.monotonic() > deadline:
                    why = f"{', '.join(dead)} failed" if dead else "not healthy in time"
                    raise OperationError(
                        "start-failed" if dead else "start-timeout",
                        f"lab {self.lab}: {why}:\n" + self._diagnose(rt, None),
                        500 if dead else 504,
                    )
                time.sleep(0.5)

    def _diagnose(self, rt: DockerRuntime, log: Path | None) -> str:
        parts = []
        if log is not None:
            with contextlib.suppress(OSError):
                parts.append(_tail(log.read_text(errors="replace"), 12))
        for c in rt.lab_containers(self.lab):
            health = _health(c)
            if health == "healthy":
                continue
            checks = ((c.attrs["State"].get("Health") or {}).get("Log") or [])[-1:]
            last = f" last check: {checks[0].get('Output', '').strip()[:200]}" if checks else ""
            logs = c.logs(tail=10).decode(errors="replace")
            parts.append(f"--- {_service_of(c)} ({c.name}): {health}{last}\n{_tail(logs, 10)}")
        return "\n".join(parts)

    def down(self) -> list[str]:
        """Heal every fault (from the journal), then remove every container,
        network and volume of the lab. Safe to call twice and after a crash."""
        removed: dict[str, list[str]] = {"containers": [], "networks": [], "volumes": []}
        with self._engine() as rt:
            if self.journal.exists():
                errors = LabFaultRegistry(rt, self.journal).heal()
                for e in errors:  # the containers go anyway; say what could not be undone
                    self.progress(f"heal {e.fault}: {e.message}")
            services = {c.name: _service_of(c) for c in rt.lab_containers(self.lab)}
            removed = rt.remove_lab(self.lab)
        self.journal.unlink(missing_ok=True)
        self.state_path.unlink(missing_ok=True)
        if any(removed.values()):
            self.progress(
                f"removed {len(removed['containers'])} container(s), "
                f"{len(removed['networks'])} network(s), {len(removed['volumes'])} volume(s)"
            )
        return [services.get(n, n) for n in removed["containers"]]

    def status(self) -> list[dict[str, Any]]:
        specs = self._specs()
        state = DockerLabState.load(self.state_path)
        project = state.project if state else self.project
        by_name = {s.name: s for s in specs}
        order = _order(specs)
        active = self._active_faults()
        rows = []
        with self._engine() as rt:
            for c in rt.lab_containers(self.lab):
                name = _service_of(c)
                spec = by_name.get(name)
                network = spec.network if spec else ("core" if name.startswith("clients") else None)
                faults = [f"{f['kind']} {f['id']}" for f in active if c.name in f["containers"]]
                rows.append(
                    {
                        "name": name,
                        "role": c.labels.get(labels.ROLE, ""),
                        "address": _home_address(c, f"{project}_{network}" if network else None),
                        "container": c.name,
                        "health": "; ".join([_health(c), *faults]),
                    }
                )
        return sorted(rows, key=lambda r: (order.get(r["name"], len(order)), r["name"]))

    def live_specs(self) -> list[ServiceSpec]:
        """The plan as a drill reaches it: every clients replica at the address
        Docker gave it (the plan's clients addresses are not used)."""
        specs = self._specs()
        out = [s for s in specs if s.role is not Role.CLIENTS]
        template = next((s for s in specs if s.role is Role.CLIENTS), None)
        if template is None:
            return out
        for row in self.status():
            if row["role"] == Role.CLIENTS.value and row["address"]:
                out.append(
                    ServiceSpec(
                        name=row["name"],
                        role=Role.CLIENTS,
                        network=template.network,
                        address=row["address"],
                        args=template.args,
                        control_port=template.control_port,
                    )
                )
        return out

    # --- faults --------------------------------------------------------------

    def _active_faults(self) -> list[dict[str, Any]]:
        try:
            records = FaultJournal(self.journal).records()
        except FaultError:
            return []
        return [
            {"id": r["id"], "kind": r["kind"], "containers": r["params"].get("containers", [])}
            for r in records
        ]

    def _targets(self, rt: DockerRuntime, target: str, kind: str) -> list[str]:
        """Container names for a service (``pool1``; ``clients`` is every
        replica, ``clients-2`` one), or for a site or ``core`` (every
        container whose plan address is on it)."""
        specs = self._specs()
        containers = {_service_of(c): c.name for c in rt.lab_containers(self.lab)}
        if target in containers:
            return [containers[target]]
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
                f"networks (every service on it): {', '.join(sites)}",
            )
        return sorted(found)

    def _make(self, rt: DockerRuntime, kind: str, target: str, params: dict[str, Any]) -> Fault:
        containers = self._targets(rt, target, kind)
        params = dict(params)

        def refuse_extra(allowed: Sequence[str]) -> None:
            extra = sorted(set(params) - set(allowed))
            if extra:
                raise FaultError(kind, RUNTIME, f"unexpected parameters {extra} for {kind}")

        if kind == "cut":
            refuse_extra(())
            return Cut(rt, containers)
        if kind == "disconnect":
            refuse_extra(())
            return Disconnect(rt, containers)
        if kind == "partition":
            refuse_extra(("peer",))
            peer = params.get("peer")
            if not peer:
                raise FaultError(kind, RUNTIME, "a partition needs `peer` (the other site)")
            return Partition(rt, containers, self._targets(rt, str(peer), kind))
        if kind == "degrade":
            refuse_extra(("delay_ms", "jitter_ms", "loss_percent"))
            return Degrade(
                rt,
                containers,
                delay_ms=float(params.get("delay_ms") or 0),
                jitter_ms=float(params.get("jitter_ms") or 0),
                loss_percent=float(params.get("loss_percent") or 0),
            )
        if kind in ("crash", "pause"):
            refuse_extra(())
            return Crash(rt, containers) if kind == "crash" else Pause(rt, containers)
        if kind in ("stop", "restart"):
            refuse_extra(())
            return (Stop if kind == "stop" else Restart)(rt, containers, timeout=5)
        if kind == "dns-outage":
            refuse_extra(("mode",))
            dns = [s for s in self._specs() if s.role is Role.DNS]
            if not dns or containers != self._targets(rt, dns[0].name, kind):
                raise FaultError(kind, RUNTIME, f"{target} is not the DNS server")
            return DnsOutage(
                rt, containers, url=dns[0].control_url, mode=params.get("mode") or "drop"
            )
        raise FaultError(
            kind, RUNTIME, f"not supported; the docker runtime can do: {', '.join(DOCKER_FAULTS)}"
        )

    def inject(self, kind: str, target: str, **params: Any) -> dict[str, Any]:
        """Inject a fault; it is journalled before it takes effect."""
        self._state()
        with self._engine() as rt:
            registry = LabFaultRegistry(rt, self.journal)
            fault = self._make(rt, kind, target, params)
            registry.inject(fault)
            self.progress(f"fault {fault.describe()} injected ({fault.id})")
            if kind == "restart":
                registry.undo(fault)  # it is over; undo only starts what did not come back
                self._wait_running_healthy(rt, fault.containers)
        return {"id": fault.id, "kind": kind, "target": target, "containers": fault.containers}

    def _wait_running_healthy(self, rt: DockerRuntime, names: Sequence[str]) -> None:
        deadline = time.monotonic() + 90.0
        pending = set(names)
        while pending:
            for name in list(pending):
                c = rt.find(name)
                if c is not None and _health(c) in ("healthy", "running"):
                    pending.discard(name)
            if pending and time.monotonic() > deadline:
                raise FaultError("restart", RUNTIME, f"{', '.join(sorted(pending))} not healthy")
            if pending:
                time.sleep(0.5)

    def undo(self, fault_id: str) -> None:
        """Undo a fault (idempotent: an unknown or healed id does nothing)."""
        with self._engine() as rt:
            registry = LabFaultRegistry(rt, self.journal)
            fault = registry.get(fault_id)
            if fault is None or not fault.active:
                return
            registry.undo(fault)
        self.progress(f"fault {fault.kind} healed ({fault_id})")

    def heal_all(self) -> None:
        """Undo every fault in the journal; raise if any could not be undone."""
        with self._engine() as rt:
            errors = LabFaultRegistry(rt, self.journal).heal() if self.journal.exists() else []
            # Belt and braces: nothing of the lab stays frozen, whatever the journal says.
            for c in rt.lab_containers(self.lab):
                if c.attrs["State"]["Paused"]:
                    with contextlib.suppress(DockerException, NotFound):
                        c.unpause()
        if errors:
            raise FaultError("heal", RUNTIME, "; ".join(f"{e.fault}: {e.message}" for e in errors))


def _levels(specs: Sequence[ServiceSpec]) -> int:
    """How many start levels the plan's dependencies make (dns, pools, backups...)."""
    depth: dict[str, int] = {}
    for _ in specs:
        for s in specs:
            depth[s.name] = 1 + max((depth.get(d, 0) for d in s.depends_on), default=0)
    return max(depth.values(), default=0)


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])

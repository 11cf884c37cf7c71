"""The swarm runtime: the lab as a Docker Swarm stack, one implementation of
the :class:`~sipdrill.orchestrator.runtime.Runtime` protocol.

``up`` creates the lab's overlay networks and CA, writes the stack file of
:mod:`sipdrill.orchestrator.swarm_stack` (made from the Compose generator)
into the lab's state directory, runs ``docker stack deploy`` and waits until
every task is running and healthy (Swarm keeps a task ``starting`` until its
health check passes) and every fault agent answers.

Faults go through the fault agents (:mod:`sipdrill.orchestrator.swarm_agent`),
one per node: a request's target becomes services, the services the nodes
their tasks run on, and each node's agent applies its share. The orchestrator
journals each fault (``faults.json``, the fault model's journal) before it
takes effect, and renews the agents' lease while it holds faults; an
orchestrator that dies stops renewing, and the agents heal on their own.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import docker
import httpx
from docker.errors import APIError, DockerException, ImageNotFound, NotFound

from sipdrill.control.files import write_atomically
from sipdrill.errors import FaultError, OperationError
from sipdrill.orchestrator import labels
from sipdrill.orchestrator.compose import CLIENTS_SERVICE, render
from sipdrill.orchestrator.docker_lab_faults import lab_engine
from sipdrill.orchestrator.docker_runtime import DockerRuntime
from sipdrill.orchestrator.fault_model import (
    Fault,
    FaultJournal,
    FaultKind,
    FaultRegistry,
    FaultRequest,
    journal_path,
    parse_fault_request,
    raise_heal_errors,
)
from sipdrill.orchestrator.local_runtime import spec_from_dict
from sipdrill.orchestrator.plan import Role, RuntimeKind, ServiceSpec, with_running_clients
from sipdrill.orchestrator.runtime import InjectedFault
from sipdrill.orchestrator.swarm_agent import ROUTE_PROTO
from sipdrill.orchestrator.swarm_stack import (
    AGENT_SERVICE,
    SITE_LABEL,
    StackOptions,
    overlay_networks,
    placement_warnings,
    refuse_front_ends,
    stack_model,
)
from sipdrill.topology import load_topology

Progress = Callable[[str], None]

RUNTIME = RuntimeKind.SWARM.value
STATE_FILE = "swarm-lab.json"
DEFAULT_IMAGE = "sipdrill:latest"
STACK_LABEL = "com.docker.stack.namespace"
#: How long the agents keep a fault without hearing from the orchestrator.
DEFAULT_LEASE = 30.0
#: How long a call waits for an agent that does not answer (it may be restarting).
AGENT_WAIT = 20.0


def _quiet(_: str) -> None:
    pass


@dataclass
class SwarmLabState:
    lab: str
    token: str
    image: str
    stack_file: str
    agent_port: int
    runtime: str = RUNTIME
    subnets: list[str] = field(default_factory=list)
    specs: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> SwarmLabState | None:
        try:
            return cls(**json.loads(path.read_text()))
        except FileNotFoundError:
            return None

    def save(self, path: Path) -> None:
        data = json.dumps(asdict(self), indent=2).encode()
        write_atomically(path, data, mode=0o600, make_parents=True)  # it holds the token


@contextlib.contextmanager
def swarm_engine() -> Iterator[DockerRuntime]:
    """The engine, which must be a swarm manager (OperationError ``no-swarm``)."""
    with lab_engine() as rt:
        swarm = rt.client.info().get("Swarm") or {}
        if swarm.get("LocalNodeState") != "active" or not swarm.get("ControlAvailable"):
            raise OperationError(
                "no-swarm",
                "this Docker engine is not a swarm manager: run `docker swarm init` "
                "(one node is enough) or run sipdrill on a manager node",
                503,
            )
        yield rt


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return int(s.getsockname()[1])


# --- the agents, as the orchestrator sees them ------------------------------------


class SwarmAgents:
    """The fault agents of lab ``lab`` and the tasks of its services."""

    def __init__(
        self,
        lab: str,
        token: str,
        port: int,
        *,
        lease: float = DEFAULT_LEASE,
        wait: float = AGENT_WAIT,
    ) -> None:
        self.lab = lab
        self.token = token
        self.port = port
        self.lease = lease
        self.wait = wait

    # tasks and nodes (the swarm API: a manager sees every node)

    def nodes(self, rt: DockerRuntime) -> dict[str, dict[str, Any]]:
        me = (rt.client.info().get("Swarm") or {}).get("NodeID", "")
        out = {}
        for node in rt.client.nodes.list():
            a = node.attrs
            addr = (a.get("Status") or {}).get("Addr", "")
            if node.id == me or addr in ("", "0.0.0.0"):
                addr = "127.0.0.1" if node.id == me else addr
            out[node.id] = {
                "id": node.id,
                "hostname": (a.get("Description") or {}).get("Hostname", node.id[:12]),
                "addr": addr,
                "role": (a.get("Spec") or {}).get("Role", ""),
                "availability": (a.get("Spec") or {}).get("Availability", ""),
                "state": (a.get("Status") or {}).get("State", ""),
                "site": ((a.get("Spec") or {}).get("Labels") or {}).get(SITE_LABEL, ""),
            }
        return out

    def tasks(self, rt: DockerRuntime) -> list[dict[str, Any]]:
        """The lab's tasks that should be running: service name (clients-N for
        a replica, the agent's by node), node, state, addresses."""
        rows = []
        for svc in rt.client.services.list(filters={"label": f"{STACK_LABEL}={self.lab}"}):
            name = str(svc.name).removeprefix(f"{self.lab}_")
            spec = svc.attrs["Spec"]
            cspec = spec["TaskTemplate"]["ContainerSpec"]
            role = (cspec.get("Labels") or {}).get(labels.ROLE, "")
            env = dict(e.split("=", 1) for e in cspec.get("Env") or [] if "=" in e)
            for t in svc.tasks(filters={"desired-state": "running"}):
                status = t.get("Status") or {}
                addresses = {
                    str(att["Network"]["Spec"]["Name"]): str(att["Addresses"][0]).split("/")[0]
                    for att in t.get("NetworksAttachments") or []
                    if att.get("Addresses")
                }
                task_name = name
                if name == CLIENTS_SERVICE:
                    task_name = f"{CLIENTS_SERVICE}-{t.get('Slot', 1)}"
                rows.append(
                    {
                        "service": task_name,
                        "role": role,
                        "node": t.get("NodeID", ""),
                        "state": status.get("State", ""),
                        "error": status.get("Err", ""),
                        "container": (status.get("ContainerStatus") or {}).get("ContainerID", ""),
                        "addresses": addresses,
                        "plan_address": env.get("SIPDRILL_PLAN_ADDRESS", ""),
                    }
                )
        return rows

    def locate(self, rt: DockerRuntime, services: Sequence[str]) -> dict[str, list[str]]:
        """node id -> the services (of ``services``) whose task runs there."""
        where: dict[str, list[str]] = {}
        running = {t["service"]: t["node"] for t in self.tasks(rt) if t["state"] == "running"}
        missing = [s for s in services if s not in running]
        if missing:
            raise FaultError(
                "locate", RUNTIME, f"no running task of {', '.join(missing)} in lab {self.lab}"
            )
        for s in services:
            where.setdefault(running[s], []).append(s)
        return where

    def url(self, rt: DockerRuntime, node: str) -> tuple[str, str]:
        nodes = self.nodes(rt)
        if node not in nodes:
            raise FaultError("agent", RUNTIME, f"node {node[:12]} has left the swarm")
        info = nodes[node]
        return f"http://{info['addr']}:{self.port}", str(info["hostname"])

    # the agents' API

    def call(
        self,
        rt: DockerRuntime,
        node: str,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        *,
        fault: str = "agent",
        wait: float | None = None,
    ) -> Any:
        """One call to a node's agent (its JSON answer), tried again while the agent does not
        answer (restarting) for up to ``wait`` seconds; FaultError after."""
        url, host = self.url(rt, node)
        deadline = time.monotonic() + (self.wait if wait is None else wait)
        headers = {"Authorization": f"Bearer {self.token}"}
        last = ""
        while True:
            try:
                # A paused agent accepts and never answers: bounded by the wait too.
                limit = min(30.0, max(5.0, self.wait if wait is None else wait))
                r = httpx.request(method, url + path, json=body, headers=headers, timeout=limit)
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}"
            else:
                if r.status_code < 300:
                    return r.json()
                try:
                    detail = r.json()
                except ValueError:
                    detail = {"message": r.text}
                if r.status_code in (502, 503, 504):
                    last = f"HTTP {r.status_code}"
                else:
                    raise FaultError(
                        fault,
                        RUNTIME,
                        f"the agent on node {host} refused: "
                        f"{detail.get('message') or detail.get('detail') or r.text}",
                    )
            if time.monotonic() > deadline:
                raise FaultError(
                    fault,
                    RUNTIME,
                    f"the fault agent on node {host} ({url}) does not answer ({last}) after "
                    f"{self.wait if wait is None else wait:g} s: is its task running? "
                    f"(`docker service ps {self.lab}_{AGENT_SERVICE}`)",
                )
            time.sleep(0.5)


# --- swarm faults: the orchestrator's side ---------------------------------------


def _peer_id(fault_id: str) -> str:
    """The id of a partition's second side on the agents (8 hex digits)."""
    return f"{int(fault_id, 16) ^ 1:08x}"


class SwarmFault(Fault[SwarmAgents]):
    """A fault on lab services, applied by the agents of their nodes.
    ``state['nodes']``: node id -> [agent fault id, services], written before
    any agent is asked."""

    runtime_name = RUNTIME
    target_noun = "service"
    targets_param = "services"
    inject_failures = (DockerException, httpx.HTTPError, OSError)
    undo_failures = (DockerException, httpx.HTTPError, OSError)
    extra: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        runtime: SwarmAgents,
        services: Sequence[str],
        *,
        fault_id: str | None = None,
        **params: Any,
    ) -> None:
        super().__init__(runtime, services, fault_id=fault_id)
        unknown = set(params) - set(self.extra)
        if unknown:
            raise FaultError(self.kind, RUNTIME, f"unexpected parameters {sorted(unknown)}")
        self.options = dict(params)

    def params(self) -> dict[str, Any]:
        return {**super().params(), **self.options}

    def describe(self) -> str:
        return f"{self.kind} {', '.join(self.targets)} (by the fault agents)"

    def _orders(self, rt: DockerRuntime) -> list[tuple[str, str, dict[str, Any]]]:
        """(node, agent fault id, order) for each node involved."""
        order = {k: v for k, v in self.options.items() if k != "peer_services"}
        return [
            (node, self.id, {"kind": self.kind.value, "services": svcs, **order})
            for node, svcs in self.runtime.locate(rt, self.targets).items()
        ]

    def _inject(self) -> None:
        with lab_engine() as rt:
            orders = self._orders(rt)
            nodes: dict[str, list[Any]] = self.state.setdefault("nodes", {})
            for node, agent_id, order in orders:
                nodes.setdefault(node, []).append([agent_id, order["services"]])
            self.save()
            for node, agent_id, order in orders:
                body = {**order, "lease_seconds": self.runtime.lease}
                self.runtime.call(rt, node, "PUT", f"/faults/{agent_id}", body, fault=self.kind)

    def _undo(self) -> None:
        errors = []
        with lab_engine() as rt:
            for node, entries in list(self.state.get("nodes", {}).items()):
                try:
                    for agent_id, _services in entries:
                        self.runtime.call(
                            rt, node, "DELETE", f"/faults/{agent_id}", fault=self.kind
                        )
                except FaultError as exc:
                    errors.append(
                        f"{exc.message}; it heals this fault itself when it is back or when "
                        "its lease runs out"
                    )
                    continue
                self.state["nodes"].pop(node, None)
                self.save()
        if errors:
            raise FaultError(self.kind, RUNTIME, "; ".join(errors))


class SwarmCut(SwarmFault):
    kind = FaultKind.CUT


class SwarmPause(SwarmFault):
    kind = FaultKind.PAUSE


class SwarmDegrade(SwarmFault):
    kind = FaultKind.DEGRADE
    extra = ("delay_ms", "jitter_ms", "loss_percent")


class SwarmDnsOutage(SwarmFault):
    kind = FaultKind.DNS_OUTAGE
    extra = ("mode", "dns_url")


class SwarmPartition(SwarmFault):
    """Both sides drop each other: every address of every task of each side
    (overlay legs and plan addresses), each side by its nodes' agents."""

    kind = FaultKind.PARTITION
    extra = ("peer_services",)

    def _orders(self, rt: DockerRuntime) -> list[tuple[str, str, dict[str, Any]]]:
        peer = list(self.options["peer_services"])
        tasks = {t["service"]: t for t in self.runtime.tasks(rt) if t["state"] == "running"}

        def cidrs(services: Sequence[str]) -> list[str]:
            found: set[str] = set()
            for s in services:
                t = tasks.get(s)
                if t is None:
                    raise FaultError(self.kind, RUNTIME, f"no running task of {s}")
                found.update(a for a in t["addresses"].values() if a)
                if t["plan_address"]:
                    found.add(t["plan_address"])
            return sorted(f"{a}/32" for a in found)

        a_cidrs, b_cidrs = cidrs(self.targets), cidrs(peer)
        orders = []
        for side, other, agent_id in (
            (self.targets, b_cidrs, self.id),
            (peer, a_cidrs, _peer_id(self.id)),
        ):
            for node, svcs in self.runtime.locate(rt, side).items():
                orders.append(
                    (node, agent_id, {"kind": self.kind.value, "services": svcs, "cidrs": other})
                )
        return orders


SWARM_FAULT_KINDS: dict[str, type[Fault[SwarmAgents]]] = {
    cls.kind: cls for cls in (SwarmCut, SwarmPause, SwarmDegrade, SwarmDnsOutage, SwarmPartition)
}


class SwarmFaultRegistry(FaultRegistry[SwarmAgents]):
    def __init__(self, agents: SwarmAgents, journal: Path) -> None:
        super().__init__(agents, journal, kinds=SWARM_FAULT_KINDS, runtime_name=RUNTIME)


class LeaseRenewer:
    """Renews the agents' lease every third of it while faults are held."""

    def __init__(self, renew: Callable[[], bool], period: float) -> None:
        self.renew = renew
        self.period = period
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        if self.thread is not None and self.thread.is_alive():
            return
        self.stop.clear()
        self.thread = threading.Thread(target=self._run, name="lease", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(self.period):
            try:
                if not self.renew():
                    return
            except Exception:  # a missed renewal is tried again next period
                continue

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=5)


# --- the runtime ----------------------------------------------------------------


class SwarmLab:
    """A lab on Docker Swarm: one stack, kept in ``state_dir``."""

    kind = RuntimeKind.SWARM

    def __init__(
        self,
        lab: str,
        state_dir: Path,
        progress: Progress = _quiet,
        *,
        topology_file: Path | None = None,
        image: str | None = None,
        lease: float | None = None,
        agent_wait: float = AGENT_WAIT,
    ) -> None:
        self.lab = lab
        self.agent_wait = agent_wait
        self.state_dir = state_dir
        self.state_path = state_dir / STATE_FILE
        self.journal = journal_path(state_dir)
        self.progress = progress
        self.topology_file = topology_file
        self.image = image or os.environ.get("SIPDRILL_IMAGE", DEFAULT_IMAGE)
        self.lease = lease or float(os.environ.get("SIPDRILL_SWARM_LEASE", DEFAULT_LEASE))
        self.renewer = LeaseRenewer(self._renew, max(self.lease / 3, 0.5))

    # --- state ---------------------------------------------------------------

    def _state(self) -> SwarmLabState:
        state = SwarmLabState.load(self.state_path)
        if state is None:
            raise OperationError(
                "lab-not-up", f"no swarm lab {self.lab!r} in {self.state_dir}", 404
            )
        return state

    @property
    def token(self) -> str:
        return self._state().token

    def _specs(self) -> list[ServiceSpec]:
        state = SwarmLabState.load(self.state_path)
        return [spec_from_dict(d) for d in state.specs] if state else []

    def agents(self) -> SwarmAgents:
        state = self._state()
        return SwarmAgents(
            self.lab, state.token, state.agent_port, lease=self.lease, wait=self.agent_wait
        )

    # --- lifecycle -----------------------------------------------------------

    def _check_new_lab(self, rt: DockerRuntime, subnets: list[ipaddress.IPv4Network]) -> None:
        lab_filter = labels.lab_filter(self.lab)
        if (
            rt.client.services.list(filters={"label": f"{STACK_LABEL}={self.lab}"})
            or rt.lab_containers(self.lab)
            or rt.client.networks.list(filters=lab_filter)
        ):
            raise OperationError(
                "lab-already-up",
                f"swarm lab {self.lab!r} already has services or networks: run "
                f"`sipdrill lab down {self.lab} --runtime swarm` first",
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
                clash = [s for s in subnets if s.version == 4 and s.overlaps(subnet)]
                if clash:
                    raise OperationError(
                        "subnet-in-use",
                        f"network {net.name} ({subnet}) overlaps this lab's {clash[0]}",
                    )

    def up(self, specs: list[ServiceSpec], timeout: float = 90.0) -> None:
        """Deploy the lab's stack and wait until every task is healthy and
        every node's fault agent answers."""
        if self.topology_file is None:
            raise OperationError("no-topology", "the swarm runtime needs the topology file", 400)
        topology = load_topology(self.topology_file).topology
        refuse_front_ends(topology, self.topology_file)  # before anything is deployed
        started = time.monotonic()
        with swarm_engine() as rt:
            overlays = overlay_networks(topology, self.lab)
            self._check_new_lab(rt, [o.subnet for o in overlays])
            agents = SwarmAgents(self.lab, "", 0)
            nodes = agents.nodes(rt)
            placed, warnings = placement_warnings(
                topology,
                {n: {SITE_LABEL: i["site"]} if i["site"] else {} for n, i in nodes.items()},
            )
            for w in warnings:
                self.progress(f"warning: {w}")
            if len(nodes) > 1:
                self.progress(
                    f"{len(nodes)} nodes: the image {self.image} must be on each "
                    "(`docker save IMAGE | ssh NODE docker load`, docs/runtimes.md)"
                )
            self.state_dir.mkdir(parents=True, exist_ok=True)
            ca_dir = self.state_dir / "ca"
            from sipdrill.sip.tls import CA_CERT, CA_KEY, LabCA

            LabCA.ensure(ca_dir)
            state = SwarmLabState(
                lab=self.lab,
                token=secrets.token_urlsafe(24),
                image=self.image,
                stack_file=str(self.state_dir / "stack.yaml"),
                agent_port=free_port(),
                subnets=[str(o.subnet) for o in overlays],
                specs=[asdict(s) for s in specs],
            )
            options = StackOptions(
                lab=self.lab,
                topology_file=str(self.topology_file.resolve()),
                ca_cert=str((ca_dir / CA_CERT).resolve()),
                ca_key=str((ca_dir / CA_KEY).resolve()),
                placed=placed,
                agent_port=state.agent_port,
            )
            model = stack_model(topology, specs, options)
            Path(state.stack_file).write_text(
                render(model, header=f"# lab {self.lab}: written by the sipdrill swarm runtime\n")
            )
            state.save(self.state_path)
            try:
                for o in overlays:
                    ipam = docker.types.IPAMConfig(
                        pool_configs=[
                            docker.types.IPAMPool(
                                subnet=str(o.subnet),
                                iprange=str(o.ip_range),
                                gateway=str(o.gateway),
                            )
                        ]
                    )
                    rt.client.networks.create(
                        o.name,
                        driver="overlay",
                        attachable=True,
                        ipam=ipam,
                        labels=labels.lab_labels(self.lab),
                        check_duplicate=True,
                    )
                self.progress(f"overlay networks: {', '.join(o.name for o in overlays)}")
                self._deploy(state)
                self._wait_healthy(rt, state, specs, started + timeout * 3, started)
            except BaseException:
                self.progress("start failed: removing what was started")
                with contextlib.suppress(Exception):
                    self.down()
                raise
        self.progress(f"lab {self.lab} healthy after {time.monotonic() - started:.1f} s")

    def _deploy(self, state: SwarmLabState) -> None:
        env = {**os.environ, "SIPDRILL_CONTROL_TOKEN": state.token, "SIPDRILL_IMAGE": state.image}
        argv = [
            "docker",
            "stack",
            "deploy",
            "-c",
            state.stack_file,
            "--resolve-image",
            "never",
            self.lab,
        ]
        self.progress(f"docker stack deploy {self.lab}: {len(state.specs) + 1} service(s)")
        proc = subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=300, check=False
        )
        (self.state_dir / "stack-deploy.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            raise OperationError(
                "start-failed", f"docker stack deploy failed:\n{_tail(proc.stderr, 15)}", 500
            )

    def _wait_healthy(
        self,
        rt: DockerRuntime,
        state: SwarmLabState,
        specs: list[ServiceSpec],
        deadline: float,
        started: float,
    ) -> None:
        agents = SwarmAgents(self.lab, state.token, state.agent_port)
        expected = {s.name for s in specs if s.role is not Role.CLIENTS}
        n_clients = sum(1 for s in specs if s.role is Role.CLIENTS)
        seen: dict[str, str] = {}
        http = httpx.Client(timeout=2.0)
        try:
            while True:
                nodes = agents.nodes(rt)
                ready_nodes = [n for n, i in nodes.items() if i["state"] == "ready"]
                tasks = agents.tasks(rt)
                for t in tasks:
                    key = t["service"] + (
                        f"@{nodes.get(t['node'], {}).get('hostname', '?')}"
                        if t["service"] == AGENT_SERVICE
                        else ""
                    )
                    if seen.get(key) != t["state"]:
                        seen[key] = t["state"]
                        self.progress(f"{key}: {t['state']} ({time.monotonic() - started:.1f} s)")
                running = {t["service"] for t in tasks if t["state"] == "running"}
                replicas = {s for s in running if s.startswith(f"{CLIENTS_SERVICE}-")}
                agents_up = [
                    t for t in tasks if t["service"] == AGENT_SERVICE and t["state"] == "running"
                ]
                if (
                    expected <= running
                    and len(replicas) >= n_clients
                    and len(agents_up) >= len(ready_nodes)
                    and self._reachable(http, specs)
                ):
                    return
                rejected = [t for t in tasks if t["state"] == "rejected"]
                if rejected or time.monotonic() > deadline:
                    why = "; ".join(f"{t['service']}: {t['error']}" for t in rejected)
                    raise OperationError(
                        "start-failed" if rejected else "start-timeout",
                        f"lab {self.lab}: {why or 'not healthy in time'}\n"
                        + self._diagnose(rt, tasks),
                        500 if rejected else 504,
                    )
                time.sleep(1.0)
        finally:
            http.close()

    def _reachable(self, http: httpx.Client, specs: Sequence[ServiceSpec]) -> bool:
        """Every control API answers from here (through the agents' routes)."""
        for s in specs:
            if s.role is Role.CLIENTS:
                continue
            try:
                if http.get(f"{s.control_url}/health").status_code != 200:
                    return False
            except httpx.HTTPError:
                return False
        return True

    def _diagnose(self, rt: DockerRuntime, tasks: list[dict[str, Any]]) -> str:
        parts = []
        for t in tasks:
            if t["state"] != "running":
                parts.append(f"--- {t['service']}: {t['state']} {t['error']}")
                c = rt.find(t["container"]) if t["container"] else None
                if c is not None:
                    parts.append(_tail(c.logs(tail=10).decode(errors="replace"), 10))
        return "\n".join(parts)

    def down(self) -> list[str]:
        """Heal every fault, remove the stack, its networks and volumes."""
        self.renewer.close()
        stopped: list[str] = []
        with lab_engine() as rt:
            state = SwarmLabState.load(self.state_path)
            if state is not None and self.journal.exists():
                for e in SwarmFaultRegistry(self.agents(), self.journal).heal():
                    self.progress(f"heal {e.fault}: {e.message}")
            if state is not None:
                agents = self.agents()
                with contextlib.suppress(FaultError, DockerException):
                    for node in {
                        t["node"] for t in agents.tasks(rt) if t["service"] == AGENT_SERVICE
                    }:
                        with contextlib.suppress(FaultError):
                            agents.call(rt, node, "POST", "/heal", wait=2.0)
            try:
                services = rt.client.services.list(filters={"label": f"{STACK_LABEL}={self.lab}"})
            except APIError:  # not a swarm manager (any more): no stack to remove
                services = []
            stopped = sorted(str(s.name).removeprefix(f"{self.lab}_") for s in services)
            if services:
                subprocess.run(
                    ["docker", "stack", "rm", self.lab],
                    capture_output=True,
                    text=True,
                    timeout=120,
                    check=False,
                )
            deadline = time.monotonic() + 60
            while rt.lab_containers(self.lab) and time.monotonic() < deadline:
                time.sleep(0.5)
            removed = {"networks": [], "volumes": []}  # type: dict[str, list[str]]
            for _ in range(20):  # endpoints leave overlays a moment after their tasks
                try:
                    got = rt.remove_lab(self.lab)
                except APIError:
                    time.sleep(1.0)
                    continue
                for k in ("networks", "volumes"):
                    removed[k] += got[k]
                if not rt.client.networks.list(filters=labels.lab_filter(self.lab)):
                    break
                time.sleep(1.0)
            for kind in ("configs", "secrets"):
                for obj in getattr(rt.client, kind).list(
                    filters={"label": f"{STACK_LABEL}={self.lab}"}
                ):
                    with contextlib.suppress(NotFound, APIError):
                        obj.remove()
        self._drop_routes(state.subnets if state is not None else [])
        for leftover in (STATE_FILE, "stack.yaml", "stack-deploy.log"):
            (self.state_dir / leftover).unlink(missing_ok=True)
        shutil.rmtree(self.state_dir / "ca", ignore_errors=True)
        self.journal.unlink(missing_ok=True)
        if stopped:
            self.progress(
                f"removed stack {self.lab}: {len(stopped)} service(s), "
                f"{len(removed['networks'])} network(s), {len(removed['volumes'])} volume(s)"
            )
        return stopped

    def _drop_routes(self, subnets: Sequence[str]) -> None:
        """Routes to the lab's networks that an agent killed with SIGKILL left
        (on SIGTERM it removes its own)."""
        if os.geteuid() != 0 or not subnets:
            return
        nets = [ipaddress.ip_network(s) for s in subnets]
        proc = subprocess.run(
            ["ip", "-o", "route", "show", "proto", str(ROUTE_PROTO)],
            capture_output=True,
            text=True,
            check=False,
        )
        for line in proc.stdout.splitlines():
            dst = line.split()[0]
            with contextlib.suppress(ValueError):
                if any(ipaddress.ip_network(dst, strict=False).subnet_of(n) for n in nets):  # type: ignore[arg-type]
                    subprocess.run(
                        ["ip", "route", "del", dst, "proto", str(ROUTE_PROTO)],
                        capture_output=True,
                        check=False,
                    )

    # --- status --------------------------------------------------------------

    def nodes(self) -> list[dict[str, Any]]:
        """A row per node: hostname, role, state, its sipdrill.site label, tasks."""
        with swarm_engine() as rt:
            agents = SwarmAgents(self.lab, "", 0)
            nodes = agents.nodes(rt)
            tasks = agents.tasks(rt)
        rows = []
        for node_id, n in nodes.items():
            here = sorted(t["service"] for t in tasks if t["node"] == node_id)
            rows.append(
                {
                    "node": n["hostname"],
                    "role": n["role"],
                    "state": n["state"],
                    "availability": n["availability"],
                    "site label": n["site"] or "-",
                    "tasks": ", ".join(here) or "-",
                }
            )
        return rows

    def status(self) -> list[dict[str, Any]]:
        specs = {s.name: s for s in self._specs()}
        order = {name: i for i, name in enumerate(specs)}
        active = self._active_faults()
        with swarm_engine() as rt:
            agents = SwarmAgents(self.lab, "", 0)
            nodes = agents.nodes(rt)
            tasks = agents.tasks(rt)
        rows = []
        for t in tasks:
            name = t["service"]
            spec = specs.get(name)
            address = spec.address if spec and spec.role is not Role.CLIENTS else ""
            if not address:
                address = next((a for n, a in t["addresses"].items() if n.endswith("_core")), "")
            faults = [f"{f['kind']} {f['id']}" for f in active if name in f["services"]]
            rows.append(
                {
                    "name": name,
                    "role": t["role"],
                    "address": address,
                    "node": nodes.get(t["node"], {}).get("hostname", t["node"][:12]),
                    "container": t["container"][:12],
                    "health": "; ".join([t["state"], *faults]),
                }
            )
        return sorted(rows, key=lambda r: (order.get(r["name"], len(order)), r["name"]))

    def _active_faults(self) -> list[dict[str, Any]]:
        try:
            records = FaultJournal(self.journal, RUNTIME).records()
        except FaultError:
            return []
        return [
            {"id": r["id"], "kind": r["kind"], "services": r["params"].get("services", [])}
            for r in records
        ]

    def live_specs(self, planned: Sequence[ServiceSpec] = ()) -> list[ServiceSpec]:
        """The plan as a drill reaches it: every clients replica at its
        address on the core network (routed by its node's agent)."""
        return with_running_clients(self._specs(), self.status())

    # --- faults --------------------------------------------------------------

    def _targets(self, target: str, kind: str) -> list[str]:
        """Services for a service name (``clients``: every replica) or a
        network (every service whose plan address is on it)."""
        specs = self._specs()
        with swarm_engine() as rt:
            running = sorted(
                {
                    t["service"]
                    for t in SwarmAgents(self.lab, "", 0).tasks(rt)
                    if t["service"] != AGENT_SERVICE
                }
            )
        if target in running:
            return [target]
        replicas = [s for s in running if s.startswith(f"{CLIENTS_SERVICE}-")]
        if target == CLIENTS_SERVICE and replicas:
            return replicas
        home = {s.name: s.network for s in specs if s.role is not Role.CLIENTS}
        found = [s for s in running if home.get(s) == target]
        if target == "core":
            found += replicas
        if not found:
            raise FaultError(
                kind,
                RUNTIME,
                f"unknown target {target!r}; services: {', '.join(running)}; networks "
                f"(every service on it): {', '.join(sorted(set(home.values())))}",
            )
        return sorted(found)

    def inject(self, kind: str, target: str, **params: Any) -> InjectedFault:
        return self.apply(parse_fault_request(kind, target, params, self.kind))

    def apply(self, request: FaultRequest) -> InjectedFault:
        self._state()
        services = self._targets(request.target, request.kind)
        registry = SwarmFaultRegistry(self.agents(), self.journal)
        options: dict[str, Any] = {}
        if request.kind is FaultKind.PARTITION:
            assert request.peer is not None
            options["peer_services"] = self._targets(request.peer, request.kind)
            both = set(services) & set(options["peer_services"])
            if both:
                raise FaultError(request.kind, RUNTIME, f"{', '.join(sorted(both))} on both sides")
        elif request.kind is FaultKind.DEGRADE:
            options.update(
                delay_ms=request.delay_ms,
                jitter_ms=request.jitter_ms,
                loss_percent=request.loss_percent,
            )
        elif request.kind is FaultKind.DNS_OUTAGE:
            dns = [s for s in self._specs() if s.role is Role.DNS]
            if not dns or services != [dns[0].name]:
                raise FaultError(request.kind, RUNTIME, f"{request.target} is not the DNS server")
            options.update(mode=request.mode, dns_url=dns[0].control_url)
        fault = registry.create(request.kind, services, **options)
        registry.inject(fault)
        self.renewer.start()
        self.progress(f"fault {fault.describe()} injected ({fault.id})")
        return {
            "id": fault.id,
            "kind": request.kind,
            "target": request.target,
            "containers": list(services),
        }

    def _renew(self) -> bool:
        """Renew the lease on every node that holds one of our faults; False
        when none is held (the renewer stops)."""
        records = FaultJournal(self.journal, RUNTIME).records()
        nodes = {n for r in records for n in (r.get("state") or {}).get("nodes", {})}
        if not nodes:
            return False
        agents = self.agents()
        with lab_engine() as rt:
            for node in nodes:
                with contextlib.suppress(FaultError):
                    agents.call(rt, node, "POST", "/lease", {"seconds": self.lease}, wait=2.0)
        return True

    def undo(self, fault_id: str) -> None:
        registry = SwarmFaultRegistry(self.agents(), self.journal)
        fault = registry.heal_one(fault_id)
        if not registry.active():
            self.renewer.close()  # nothing held: nothing to renew
        if fault is not None:
            self.progress(f"fault {fault.kind} healed ({fault_id})")

    def leftovers(self) -> list[str]:
        """Faults still in place, whatever the journal says: the journal's,
        what each node's agent finds in its containers, the DNS server's."""
        found = [
            f"fault {f['id']} ({f['kind']} on {', '.join(f['services'])}) still in the journal"
            for f in self._active_faults()
        ]
        agents = self.agents()
        with swarm_engine() as rt:
            nodes = {t["node"] for t in agents.tasks(rt) if t["service"] == AGENT_SERVICE}
            for node in sorted(nodes):
                try:
                    # The probe execs into every lab container of the node: on a
                    # loaded node (two nodes' tasks on two cores) well over 5 s.
                    found += list(agents.call(rt, node, "GET", "/leftovers", wait=30.0))
                except FaultError as exc:
                    found.append(exc.message)
        for spec in (s for s in self._specs() if s.role is Role.DNS):
            headers = {"Authorization": f"Bearer {agents.token}"}
            try:
                r = httpx.get(f"{spec.control_url}/faults", headers=headers, timeout=3.0)
                faults = r.json() if r.status_code == 200 else {"unreadable": r.status_code}
            except (httpx.HTTPError, ValueError) as exc:
                found.append(f"{spec.name}: its faults cannot be read ({type(exc).__name__})")
                continue
            found += [f"{spec.name}: DNS fault {k}={v}" for k, v in faults.items() if v]
        return found

    def heal_all(self) -> None:
        """Undo every fault of the journal; raise if an agent could not."""
        errors = SwarmFaultRegistry(self.agents(), self.journal).heal()
        if not errors:
            self.renewer.close()
        raise_heal_errors(errors, RUNTIME)


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])

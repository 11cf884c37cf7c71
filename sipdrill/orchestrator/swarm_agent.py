"""The fault agent of a swarm lab: one per node (a global service), because
``docker exec`` reaches only the containers of the engine it talks to.

It applies and undoes the docker runtime's own network faults
(:mod:`sipdrill.orchestrator.faults`: the same iptables chains, tc filters and
NFQUEUE delayer) in the containers of its node, through the node's Docker
socket, and journals them in its state volume before they take effect, so an
agent that restarts finds them again.

**Lease.** Every fault is held on a lease that the orchestrator renews
(``POST /lease``); when the lease runs out (the orchestrator crashed, was
killed, lost the network) the agent heals every fault it holds by itself. An
agent that stops (``docker stack rm``, SIGTERM) heals first. An agent that
starts again reads its journal: faults whose lease ran out while it was away
are healed at once, the others stay until their lease ends.

**Routes.** The agent also keeps, in its node's network namespace, a host
route to each lab task of the node (its plan address, or its core address for
a clients replica) via the task's docker_gwbridge address, so the
orchestrator on the node reaches the control APIs as it does on the docker
runtime (the node is not on the overlays).

**Across nodes.** A task claims its plan address itself (Swarm gives none),
and Docker's overlay answers ARP only for the addresses it assigned: a task
on another node cannot resolve a claimed address. Each agent reads the
overlays' gossip (``docker network inspect --verbose``: every task of every
node on the network, its Docker address and its node's address) and, for
each task of *another* node that has a plan address (the stack gives the
agent the plan: ``SIPDRILL_PLAN_ADDRESSES``):

* in every lab container of its node on that task's home network, a route
  ``PLAN/32 via <the task's Docker address>`` (``proto 93``): the frame goes
  to the task's own MAC, which Docker's overlay knows on every node, and the
  task accepts it (the plan address is its own);
* in its node's namespace, a host route to that task (plan address, or core
  address for a clients replica) via the task's node address, so an
  orchestrator on any node reaches every control API; the task's node
  forwards it to the task by that node's own agent's route.

Why routes in the tasks and not neighbour entries in the overlay's own
namespace: that namespace (``/run/docker/netns/1-<id>``) is made after the
agent starts, and a container sees later mounts of a private host mount
only with mount propagation, which hosts (this one) do not give.

Its API (bearer token: the lab's) is thin over :class:`AgentCore`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from docker.errors import DockerException, NotFound
from docker.models.containers import Container
from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from sipdrill.control.auth import bearer_auth
from sipdrill.control.files import write_atomically
from sipdrill.errors import FaultError
from sipdrill.orchestrator import labels
from sipdrill.orchestrator.compose import CLIENTS_SERVICE
from sipdrill.orchestrator.docker_runtime import DockerRuntime, generation
from sipdrill.orchestrator.fault_model import FaultKind
from sipdrill.orchestrator.faults import (
    Cut,
    Degrade,
    DnsOutage,
    DockerFault,
    DockerFaultRegistry,
    Pause,
    _NetnsFault,
)
from sipdrill.orchestrator.swarm_stack import ADDRESS_LABEL, AGENT_SERVICE

log = logging.getLogger("sipdrill.fault-agent")

RUNTIME = "swarm"
GWBRIDGE = "docker_gwbridge"
#: The routing protocol number of the agent's host routes (``ip route ... proto``).
ROUTE_PROTO = 93
#: How many undone fault ids an agent remembers to refuse their stale orders.
UNDONE_KEPT = 1024
#: The swarm label of a task's container: ``<stack>_<service>.<slot>.<task id>``.
TASK_NAME = "com.docker.swarm.task.name"


class Blackhole(_NetnsFault):
    """One side of a partition: the containers drop every packet from and to
    ``cidrs`` (the other side's addresses, which may live on other nodes)."""

    kind = FaultKind.PARTITION

    def __init__(
        self,
        runtime: DockerRuntime,
        containers: Sequence[str],
        *,
        cidrs: Sequence[str] = (),
        fault_id: str | None = None,
    ) -> None:
        super().__init__(runtime, containers, fault_id=fault_id)
        if not cidrs:
            raise FaultError(self.kind, RUNTIME, "a partition needs the other side's addresses")
        self.cidrs = list(cidrs)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "cidrs": list(self.cidrs)}

    def describe(self) -> str:
        return f"partition {', '.join(self.containers)} | {', '.join(self.cidrs)}"

    def _inject(self) -> None:
        for name in self.containers:
            ns, record = self._enter(name)
            self._block(ns, record, self.cidrs, "tc")


#: What an agent does, by kind.
AGENT_KINDS: dict[str, type[DockerFault]] = {
    cls.kind: cls for cls in (Cut, Blackhole, Degrade, Pause, DnsOutage)
}


class FaultOrder(BaseModel):
    """A fault the orchestrator asks for, on services of this node."""

    kind: FaultKind
    services: list[str] = Field(min_length=1)
    cidrs: list[str] = []  # partition: the other side
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss_percent: float = 0.0
    mode: str = "drop"
    dns_url: str = ""
    lease_seconds: float = Field(30.0, gt=0, le=86400)


class LeaseOrder(BaseModel):
    seconds: float = Field(gt=0, le=86400)


@dataclass(frozen=True)
class RemoteTask:
    """A lab task on another node, as the overlays' gossip tells it."""

    service: str  # pool1, clients-2
    network: str  # <lab>_<network>
    endpoint: str  # its Docker-assigned address on that network
    host: str  # its node's address


def task_service(lab: str, task_name: str) -> str | None:
    """``<lab>_pool1.1.<task id>`` -> ``pool1``; a clients replica ->
    ``clients-<slot>``; None for what is not a task of the lab."""
    if not task_name.startswith(f"{lab}_"):
        return None
    parts = task_name.removeprefix(f"{lab}_").split(".")
    if len(parts) < 3 or not parts[1].isdigit():
        return None
    if parts[0] == CLIENTS_SERVICE:
        return f"{CLIENTS_SERVICE}-{parts[1]}"
    return parts[0]


def parse_gossip(lab: str, network: Mapping[str, Any], local: Sequence[str]) -> list[RemoteTask]:
    """The other nodes' tasks in one ``network inspect --verbose`` answer
    (``local``: this node's container names, left out)."""
    found = []
    for svc in (network.get("Services") or {}).values():
        for t in svc.get("Tasks") or []:
            name = str(t.get("Name", ""))
            service = task_service(lab, name)
            host = str((t.get("Info") or {}).get("Host IP", ""))
            endpoint = str(t.get("EndpointIP", ""))
            if service is None or name in local or not host or not endpoint:
                continue
            found.append(RemoteTask(service, str(network.get("Name", "")), endpoint, host))
    return found


def plan_routes(
    remote: Sequence[RemoteTask],
    plan: Mapping[str, str],
    subnets: Mapping[str, ipaddress.IPv4Network],
) -> dict[str, tuple[str, str]]:
    """Plan address of each remote task -> (its home network, its Docker
    address there): what the node's containers on that network route via."""
    out: dict[str, tuple[str, str]] = {}
    for t in remote:
        address = plan.get(t.service)
        net = subnets.get(t.network)
        if address and net is not None and ipaddress.ip_address(address) in net:
            out[address] = (t.network, t.endpoint)
    return out


def remote_host_routes(
    lab: str, remote: Sequence[RemoteTask], plan: Mapping[str, str]
) -> dict[str, str]:
    """Address of each remote task the orchestrator reaches (plan address, or
    a clients replica's core address) -> its node's address."""
    out = {}
    for t in remote:
        address = plan.get(t.service)
        if not address and t.service.startswith(f"{CLIENTS_SERVICE}-"):
            address = t.endpoint if t.network == f"{lab}_core" else ""
        if address:
            out[address] = t.host
    return out


def parse_plan(text: str) -> dict[str, str]:
    """``pool1=10.0.1.11,dns=10.0.0.53`` (the stack's SIPDRILL_PLAN_ADDRESSES)."""
    out = {}
    for item in text.split(","):
        name, sep, address = item.strip().partition("=")
        if sep and name and address:
            ipaddress.ip_address(address)  # ValueError names it
            out[name] = address
    return out


def service_name(c: Container) -> str:
    """The lab service of a task's container: ``pool1``, ``clients-3``."""
    service = str(c.labels.get(labels.SERVICE, c.name))
    if service == CLIENTS_SERVICE:
        parts = str(c.labels.get(TASK_NAME, "")).split(".")
        return f"{CLIENTS_SERVICE}-{parts[1] if len(parts) > 2 else '1'}"
    return service


class AgentCore:
    """The faults and routes of one node of lab ``lab``."""

    def __init__(
        self,
        lab: str,
        node: str,
        state_dir: Path,
        runtime: DockerRuntime,
        *,
        routes: bool = True,
        clock: Any = time.time,
        plan: Mapping[str, str] | None = None,
    ) -> None:
        self.lab = lab
        self.node = node
        self.state_dir = state_dir
        self.runtime = runtime
        self.routes_enabled = routes
        self.clock = clock
        self.lock = threading.RLock()
        state_dir.mkdir(parents=True, exist_ok=True)
        self.registry = DockerFaultRegistry(runtime, state_dir / "faults.json", kinds=AGENT_KINDS)
        self.lease_path = state_dir / "lease.json"
        self.lease_until = self._load_lease()
        self.routes: dict[str, str] = {}  # address -> via
        #: service -> plan address, for the tasks of other nodes.
        self.plan = dict(plan or {})
        #: container generation -> {plan address: via} in force in its namespace.
        self.neighbours: dict[str, dict[str, str]] = {}
        self.remote: list[RemoteTask] = []
        self.subnets: dict[str, ipaddress.IPv4Network] = {}
        self.healed_by_lease = 0
        #: Ids the orchestrator has undone, newest last: an order for one of
        #: them that arrives later is stale and refused (see :meth:`apply`).
        self.undone: dict[str, None] = {}

    # --- lease -------------------------------------------------------------

    def _load_lease(self) -> float:
        try:
            return float(json.loads(self.lease_path.read_text())["until"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0.0

    def renew(self, seconds: float) -> float:
        with self.lock:
            # The orchestrator's latest word: a shorter lease shortens it.
            self.lease_until = self.clock() + seconds
            write_atomically(
                self.lease_path, json.dumps({"until": self.lease_until}).encode(), mode=0o644
            )
            return self.lease_until

    def lease_left(self) -> float:
        return float(self.lease_until - self.clock())

    def check_lease(self) -> int:
        """Heal everything once the lease has run out; how many faults healed."""
        with self.lock:
            active = self.registry.active()
            if not active or self.lease_left() > 0:
                return 0
            log.warning(
                "lease ran out %.1f s ago: healing %d fault(s)", -self.lease_left(), len(active)
            )
            errors = self.registry.heal()
            for e in errors:
                log.error("heal %s: %s", e.fault, e.message)
            healed = len(active) - len(errors)
            self.healed_by_lease += healed
            return healed

    # --- containers --------------------------------------------------------

    def containers(self) -> list[dict[str, Any]]:
        """The lab's task containers on this node (not the agent)."""
        gateways = self._gateways()
        rows = []
        for c in self.runtime.lab_containers(self.lab):
            if c.labels.get(labels.ROLE) == "agent":
                continue
            state = c.attrs["State"]
            nets = c.attrs.get("NetworkSettings", {}).get("Networks") or {}
            rows.append(
                {
                    "service": service_name(c),
                    "role": c.labels.get(labels.ROLE, ""),
                    "container": c.name,
                    "id": c.id,
                    "node": self.node,
                    "plan_address": c.labels.get(ADDRESS_LABEL, ""),
                    "addresses": {n: d.get("IPAddress", "") for n, d in nets.items()},
                    "gateway": gateways.get(c.id, ""),
                    "running": bool(state.get("Running")),
                    "health": _health(c),
                }
            )
        return rows

    def _gateways(self) -> dict[str, str]:
        """Container id -> its docker_gwbridge address."""
        try:
            net = self.runtime.client.networks.get(GWBRIDGE)
        except (NotFound, DockerException):
            return {}
        found = {}
        for cid, ep in (net.attrs.get("Containers") or {}).items():
            addr = str(ep.get("IPv4Address", "")).split("/")[0]
            if addr:
                found[cid] = addr
        return found

    def _names(self, services: Sequence[str], kind: str) -> list[str]:
        running = {r["service"]: r["container"] for r in self.containers() if r["running"]}
        missing = [s for s in services if s not in running]
        if missing:
            raise FaultError(
                kind,
                RUNTIME,
                f"no running task of {', '.join(missing)} on node {self.node} "
                f"(here: {', '.join(sorted(running)) or 'none'})",
            )
        return [running[s] for s in services]

    # --- faults ------------------------------------------------------------

    def apply(self, fault_id: str, order: FaultOrder) -> dict[str, Any]:
        with self.lock:
            existing = self.registry.get(fault_id)
            if existing is not None and existing.active:
                self.renew(order.lease_seconds)
                return existing.to_record()
            if fault_id in self.undone:
                log.warning(
                    "fault %s: a stale order (undone before it was read), refused", fault_id
                )
                # A paused or busy agent still reads the requests queued on its
                # socket: an order the orchestrator gave up on (and undid, the
                # DELETE queued behind it or run first by another thread) must
                # not take effect once the agent is back, or it stays in force
                # with no journal entry on the orchestrator's side.
                raise FaultError(
                    order.kind,
                    RUNTIME,
                    f"fault {fault_id} was undone before this order was read: "
                    "a stale order, not applied (make a new fault)",
                )
            names = self._names(order.services, order.kind)
            rt = self.runtime
            fault: DockerFault
            if order.kind is FaultKind.CUT:
                fault = Cut(rt, names, fault_id=fault_id)
            elif order.kind is FaultKind.PARTITION:
                fault = Blackhole(rt, names, cidrs=order.cidrs, fault_id=fault_id)
            elif order.kind is FaultKind.DEGRADE:
                fault = Degrade(
                    rt,
                    names,
                    delay_ms=order.delay_ms,
                    jitter_ms=order.jitter_ms,
                    loss_percent=order.loss_percent,
                    fault_id=fault_id,
                )
            elif order.kind is FaultKind.PAUSE:
                fault = Pause(rt, names, fault_id=fault_id)
            elif order.kind is FaultKind.DNS_OUTAGE:
                fault = DnsOutage(rt, names, url=order.dns_url, mode=order.mode, fault_id=fault_id)
            else:
                raise FaultError(order.kind, RUNTIME, "not a fault the agent does")
            # The lease first: a fault is never in force without one.
            self.renew(order.lease_seconds)
            self.registry.inject(fault)
            # And from when it is in force: an inject may take seconds.
            self.renew(order.lease_seconds)
            log.info("fault %s injected: %s", fault_id, fault.describe())
            return fault.to_record()

    def undo(self, fault_id: str) -> bool:
        with self.lock:
            try:
                fault = self.registry.heal_one(fault_id)
            finally:
                # After the undo, so that /health's count means "done".
                self.undone[fault_id] = None
                while len(self.undone) > UNDONE_KEPT:
                    del self.undone[next(iter(self.undone))]
            if fault is not None:
                log.info("fault %s healed", fault_id)
            return fault is not None

    def heal_all(self) -> list[FaultError]:
        with self.lock:
            errors = self.registry.heal()
            for c in self.runtime.lab_containers(self.lab):
                if c.attrs["State"]["Paused"]:
                    with contextlib.suppress(DockerException):
                        c.unpause()
            return errors

    def leftovers(self) -> list[str]:
        """Faults still in place on this node, whatever the journals say: the
        docker runtime's probe (paused or stopped containers, a fault's
        iptables chain or qdisc in a namespace), the agent itself left out."""
        from sipdrill.orchestrator.docker_lab_faults import DockerLabFaults

        with self.lock:
            probe = DockerLabFaults(self.lab, self.state_dir / "faults.json", list, log.info)
            found = probe.leftovers("")
        # A task Swarm replaced leaves its exited container: not a fault when
        # another container of the service runs.
        running = {r["service"] for r in self.containers() if r["running"]}
        replaced = tuple(f"{s}: not running" for s in running)
        return [
            f"{self.node}: {line}"
            for line in found
            if not line.startswith((AGENT_SERVICE, *replaced))
        ]

    def faults(self) -> list[dict[str, Any]]:
        with self.lock:
            return [f.to_record() for f in self.registry.active()]

    # --- routes ------------------------------------------------------------

    def wanted_routes(self) -> dict[str, str]:
        wanted = {}
        for row in self.containers():
            if not row["running"] or not row["gateway"]:
                continue
            address = row["plan_address"]
            if not address:  # a clients replica: its address on the core network
                address = next(
                    (a for n, a in row["addresses"].items() if n.endswith("_core") and a), ""
                )
            if address:
                wanted[address] = row["gateway"]
        for address, host in remote_host_routes(self.lab, self.remote, self.plan).items():
            wanted.setdefault(address, host)
        return wanted

    def sync_routes(self) -> None:
        if not self.routes_enabled:
            return
        wanted = self.wanted_routes()
        for address in [a for a in self.routes if a not in wanted]:
            _ip("route", "del", f"{address}/32", "proto", str(ROUTE_PROTO))
            self.routes.pop(address, None)
        local = {row["gateway"] for row in self.containers()}
        for address, via in wanted.items():
            if self.routes.get(address) == via:
                continue
            # A task of this node: by docker_gwbridge; of another node: by the
            # node's address, wherever the kernel finds it.
            dev = ["dev", GWBRIDGE] if via in local else []
            ok = _ip(
                "route", "replace", f"{address}/32", "via", via, *dev, "proto", str(ROUTE_PROTO)
            )
            if ok:
                self.routes[address] = via

    # --- across nodes -------------------------------------------------------

    def read_gossip(self) -> None:
        """The other nodes' tasks, from every lab overlay this node is on."""
        client = self.runtime.client
        local = [c.name for c in self.runtime.lab_containers(self.lab)]
        remote: list[RemoteTask] = []
        subnets: dict[str, ipaddress.IPv4Network] = {}
        for net in client.networks.list(filters={"driver": "overlay"}):
            if not str(net.name).startswith(f"{self.lab}_"):
                continue
            try:
                info = client.api.inspect_network(net.id, verbose=True)
            except DockerException:  # gone meanwhile
                continue
            for cfg in (info.get("IPAM") or {}).get("Config") or []:
                with contextlib.suppress(ValueError, TypeError):
                    subnet = ipaddress.ip_network(cfg.get("Subnet", ""))
                    if isinstance(subnet, ipaddress.IPv4Network):
                        subnets[str(net.name)] = subnet
            remote += parse_gossip(self.lab, info, local)
        self.remote, self.subnets = remote, subnets

    def sync_neighbours(self) -> None:
        """In each lab container of this node, a route to every plan address
        of another node's task on a network the container is on."""
        routes = plan_routes(self.remote, self.plan, self.subnets)
        seen = set()
        for c in self.runtime.lab_containers(self.lab):
            if c.labels.get(labels.ROLE) == "agent" or not c.attrs["State"].get("Running"):
                continue
            key = generation(c)
            seen.add(key)
            nets = c.attrs.get("NetworkSettings", {}).get("Networks") or {}
            own = c.labels.get(ADDRESS_LABEL, "")
            wanted = {
                address: via
                for address, (network, via) in routes.items()
                if network in nets and address != own
            }
            if self.neighbours.get(key) == wanted:
                continue
            if c.attrs["State"].get("Paused"):
                continue  # no exec in a paused container: the next tick
            keep = " ".join(f"{a}" for a in wanted)
            script = "".join(
                f"ip route replace {a}/32 via {v} proto {ROUTE_PROTO}\n"
                for a, v in sorted(wanted.items())
            ) + (
                f"ip -o route show proto {ROUTE_PROTO} | while read dst rest; do\n"
                f'  case " {keep} " in *" $dst "*) ;; '
                f"*) ip route del $dst proto {ROUTE_PROTO} ;; esac\n"
                "done\n"
            )
            try:
                result = c.exec_run(["sh", "-c", script], user="0")
            except DockerException as exc:
                log.warning("routes in %s: %s", c.name, exc)
                continue
            if result.exit_code == 0:
                self.neighbours[key] = wanted
                if wanted:
                    log.info(
                        "%s: routes to %d task(s) of other nodes", service_name(c), len(wanted)
                    )
            else:
                log.warning("routes in %s: %s", c.name, bytes(result.output or b"").decode())
        for key in set(self.neighbours) - seen:
            del self.neighbours[key]

    def drop_routes(self) -> None:
        for address in list(self.routes):
            _ip("route", "del", f"{address}/32", "proto", str(ROUTE_PROTO))
            self.routes.pop(address, None)

    # --- life --------------------------------------------------------------

    def tick(self) -> None:
        """What the agent's background thread does every second."""
        self.check_lease()
        try:
            if self.routes_enabled:
                self.read_gossip()
                self.sync_neighbours()
            self.sync_routes()
        except DockerException as exc:
            log.warning("routes: %s", exc)

    def shutdown(self) -> None:
        """The agent is going: heal its faults, remove its routes."""
        for e in self.heal_all():
            log.error("heal %s on the way out: %s", e.fault, e.message)
        self.drop_routes()


def _ip(*argv: str) -> bool:
    proc = subprocess.run(["ip", *argv], capture_output=True, text=True, check=False, timeout=10)
    if proc.returncode != 0:
        log.debug("ip %s: %s", " ".join(argv), proc.stderr.strip())
    return proc.returncode == 0


def _health(c: Container) -> str:
    state = c.attrs["State"]
    if state.get("Paused"):
        return "paused"
    if not state.get("Running"):
        return f"{state.get('Status')} ({state.get('ExitCode')})"
    return str((state.get("Health") or {}).get("Status") or "running")


def agent_app(core: AgentCore, token: str | None) -> FastAPI:
    app = FastAPI(title="sipdrill fault agent", docs_url=None, redoc_url=None)
    auth = bearer_auth(token)

    @app.exception_handler(FaultError)
    async def _fault_error(_request: Any, exc: FaultError) -> JSONResponse:
        return JSONResponse(
            {"code": "fault", "fault": exc.fault, "message": exc.message, "node": core.node},
            status_code=409,
        )

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {
            "lab": core.lab,
            "node": core.node,
            "faults": len(core.registry.active()),
            "lease_left": round(core.lease_left(), 1),
            "healed_by_lease": core.healed_by_lease,
            "undone": len(core.undone),
        }

    @app.get("/containers", dependencies=[auth])
    def containers() -> list[dict[str, Any]]:
        return core.containers()

    @app.get("/faults", dependencies=[auth])
    def faults() -> dict[str, Any]:
        return {"node": core.node, "faults": core.faults(), "lease_left": core.lease_left()}

    @app.get("/leftovers", dependencies=[auth])
    def leftovers() -> list[str]:
        return core.leftovers()

    @app.put("/faults/{fault_id}", dependencies=[auth])
    def put_fault(fault_id: str, order: FaultOrder) -> dict[str, Any]:
        if len(fault_id) != 8 or any(ch not in "0123456789abcdef" for ch in fault_id):
            raise HTTPException(422, "a fault id is 8 hex digits")
        return core.apply(fault_id, order)

    @app.delete("/faults/{fault_id}", dependencies=[auth])
    def delete_fault(fault_id: str) -> dict[str, Any]:
        return {"healed": core.undo(fault_id)}

    @app.post("/lease", dependencies=[auth])
    def lease(order: LeaseOrder) -> dict[str, Any]:
        core.renew(order.seconds)
        return {"lease_left": core.lease_left()}

    @app.post("/heal", dependencies=[auth])
    def heal() -> dict[str, Any]:
        errors = core.heal_all()
        if errors:
            raise FaultError("heal", RUNTIME, "; ".join(f"{e.fault}: {e.message}" for e in errors))
        return {"healed": True}

    return app


def run_agent(lab: str, listen: str, state_dir: Path, node: str, token: str | None) -> None:
    """Serve the agent until SIGTERM or SIGINT, then heal and remove routes."""
    import uvicorn

    from sipdrill.control.server import bind_tcp

    logging.basicConfig(level=logging.INFO, format="%(asctime)s fault-agent %(message)s")
    host, _, port = listen.rpartition(":")
    runtime = DockerRuntime.from_env(netns_method="exec")
    plan = parse_plan(os.environ.get("SIPDRILL_PLAN_ADDRESSES", ""))
    core = AgentCore(lab, node, state_dir, runtime, plan=plan)
    if core.registry.active():
        log.info(
            "found %d fault(s) in the journal, lease %.1f s left",
            len(core.registry.active()),
            core.lease_left(),
        )
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(1.0):
            try:
                core.tick()
            except Exception:  # the agent lives on: the next tick tries again
                log.exception("tick")

    core.tick()
    ticker = threading.Thread(target=loop, name="agent-tick", daemon=True)
    ticker.start()
    sock = bind_tcp(host or "0.0.0.0", int(port))
    server = uvicorn.Server(
        uvicorn.Config(
            agent_app(core, token),
            log_config=None,
            log_level="warning",
            access_log=False,
            lifespan="off",
        )
    )
    log.info("fault agent of lab %s on node %s, listening on %s", lab, node, listen)
    try:
        server.run(sockets=[sock])
    finally:
        stop.set()
        ticker.join(timeout=5)
        core.shutdown()
        runtime.close()
        log.info("stopped: every fault healed, routes removed")

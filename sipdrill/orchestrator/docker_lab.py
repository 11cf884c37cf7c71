"""The docker runtime: the lab as containers, one implementation of the
:class:`~sipdrill.orchestrator.runtime.Runtime` protocol (the local runtime
is the other).

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

Faults are :mod:`sipdrill.orchestrator.docker_lab_faults`'s: a site target
becomes every container whose plan address is in that site, as one fault of
:mod:`sipdrill.orchestrator.faults`, journalled in ``<state dir>/faults.json``
before it takes effect, so ``sipdrill lab down`` heals what a crashed
orchestrator left, before it removes the lab.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from docker.models.containers import Container

from sipdrill.control.files import write_atomically
from sipdrill.errors import OperationError
from sipdrill.orchestrator import labels
from sipdrill.orchestrator.compose import (
    CLIENTS_SERVICE,
    ComposeOptions,
    compose_model,
    networks_of,
    render,
)
from sipdrill.orchestrator.docker_lab_faults import (
    DockerLabFaults,
    container_health,
    lab_engine,
    service_of,
)
from sipdrill.orchestrator.docker_runtime import (
    RUNTIME,
    DockerRuntime,
    compose_command,
)
from sipdrill.orchestrator.fault_model import FaultRequest, journal_path, parse_fault_request
from sipdrill.orchestrator.local_runtime import spec_from_dict
from sipdrill.orchestrator.plan import Role, RuntimeKind, ServiceSpec
from sipdrill.orchestrator.runtime import InjectedFault
from sipdrill.topology import load_topology

Progress = Callable[[str], None]

STATE_FILE = "docker-lab.json"
DEFAULT_IMAGE = "sipdrill:latest"


def _quiet(_: str) -> None:
    pass


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
        self.faults = DockerLabFaults(lab, self.journal, self._specs, progress)
        self.topology_file = topology_file
        self.image = image or os.environ.get("SIPDRILL_IMAGE", DEFAULT_IMAGE)

    # --- engine and state ----------------------------------------------------

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
        with lab_engine() as rt:
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
        with lab_engine() as rt:
            rt.check_new_lab(self.lab, self.image, list(networks_of(topology).values()))
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

    def _compose_up(
        self,
        state: DockerLabState,
        specs: list[ServiceSpec],
        deadline: float,
        started: float,
        seen: dict[str, str],
    ) -> None:
        command = compose_command()
        assert command is not None  # checked by check_new_lab
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
            with lab_engine() as rt:
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
            name, health = service_of(c), container_health(c)
            if seen.get(name) != health:
                seen[name] = health
                self.progress(f"{name}: {health} ({time.monotonic() - started:.1f} s)")

    def _wait_healthy(
        self, specs: list[ServiceSpec], deadline: float, started: float, seen: dict[str, str]
    ) -> None:
        expected = {s.name for s in specs if s.role is not Role.CLIENTS}
        n_clients = sum(1 for s in specs if s.role is Role.CLIENTS)
        with lab_engine() as rt:
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
            health = container_health(c)
            if health == "healthy":
                continue
            checks = ((c.attrs["State"].get("Health") or {}).get("Log") or [])[-1:]
            last = f" last check: {checks[0].get('Output', '').strip()[:200]}" if checks else ""
            logs = c.logs(tail=10).decode(errors="replace")
            parts.append(f"--- {service_of(c)} ({c.name}): {health}{last}\n{_tail(logs, 10)}")
        return "\n".join(parts)

    def down(self) -> list[str]:
        """Heal every fault (from the journal), then remove every container,
        network and volume of the lab. Safe to call twice and after a crash."""
        removed: dict[str, list[str]] = {"containers": [], "networks": [], "volumes": []}
        with lab_engine() as rt:
            self.faults.heal_before_removal(rt)
            services = {c.name: service_of(c) for c in rt.lab_containers(self.lab)}
            removed = rt.remove_lab(self.lab)
        self.journal.unlink(missing_ok=True)
        self.state_path.unlink(missing_ok=True)
        # The generated compose file and the log of `up` belong to the lab that is gone.
        for leftover in ("compose.yaml", "compose-up.log"):
            (self.state_dir / leftover).unlink(missing_ok=True)
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
        active = self.faults.active()
        rows = []
        with lab_engine() as rt:
            for c in rt.lab_containers(self.lab):
                name = service_of(c)
                spec = by_name.get(name)
                network = spec.network if spec else ("core" if name.startswith("clients") else None)
                faults = [f"{f['kind']} {f['id']}" for f in active if c.name in f["containers"]]
                rows.append(
                    {
                        "name": name,
                        "role": c.labels.get(labels.ROLE, ""),
                        "address": _home_address(c, f"{project}_{network}" if network else None),
                        "container": c.name,
                        "health": "; ".join([container_health(c), *faults]),
                    }
                )
        return sorted(rows, key=lambda r: (order.get(r["name"], len(order)), r["name"]))

    def live_specs(self, planned: Sequence[ServiceSpec] = ()) -> list[ServiceSpec]:
        """The plan as a drill reaches it: every clients replica at the address
        Docker gave it (the plan's clients addresses, and ``planned``, are not used)."""
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

    # --- faults (docker_lab_faults) -----------------------------------------

    def inject(self, kind: str, target: str, **params: Any) -> InjectedFault:
        """Parse and inject a fault; it is journalled before it takes effect."""
        return self.apply(parse_fault_request(kind, target, params, self.kind))

    def apply(self, request: FaultRequest) -> InjectedFault:
        self._state()
        return self.faults.apply(request)

    def undo(self, fault_id: str) -> None:
        """Undo a fault (idempotent: an unknown or healed id does nothing)."""
        self.faults.undo(fault_id)

    def heal_all(self) -> None:
        """Undo every fault in the journal; raise if any could not be undone."""
        self.faults.heal_all()

    def leftovers(self) -> list[str]:
        """Faults still in place, whatever the journal says (see DockerLabFaults)."""
        return self.faults.leftovers(self.token)


def _levels(specs: Sequence[ServiceSpec]) -> int:
    """How many start levels the plan's dependencies make (dns, pools, backups...)."""
    depth: dict[str, int] = {}
    for _ in specs:
        for s in specs:
            depth[s.name] = 1 + max((depth.get(d, 0) for d in s.depends_on), default=0)
    return max(depth.values(), default=0)


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])

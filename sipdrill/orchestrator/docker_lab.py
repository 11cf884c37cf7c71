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

A lab started without sipdrill (``docker-compose up -d`` on a generated
file), or one whose state directory is gone, is found by its containers'
labels (``sipdrill.lab``) and driven all the same: its plan comes from the
topology file its containers mount, its token from their environment, its
Compose project from Compose's own label (:func:`state_from_containers`;
never saved, the containers stay the truth). ``sipdrill drill run`` attaches
to a running lab (:meth:`DockerLab.attach`) instead of starting one.

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
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from docker.models.containers import Container

from sipdrill.control.files import write_atomically
from sipdrill.errors import ConfigFileError, OperationError
from sipdrill.orchestrator import labels
from sipdrill.orchestrator.compose import (
    CLIENTS_SERVICE,
    CONTAINER_TOPOLOGY,
    ENV_FILE,
    PROJECT_VARIABLE,
    ComposeOptions,
    compose_model,
    docker_plan,
    networks_of,
    project_name,
    render,
    write_env_file,
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
from sipdrill.orchestrator.plan import Role, RuntimeKind, ServiceSpec, with_running_clients
from sipdrill.orchestrator.runtime import InjectedFault
from sipdrill.topology import Topology, load_topology

Progress = Callable[[str], None]

STATE_FILE = "docker-lab.json"
DEFAULT_IMAGE = "sipdrill:latest"
#: Compose's labels (v1 and v2) on what it made: the project, and its files.
COMPOSE_PROJECT = "com.docker.compose.project"
COMPOSE_FILES = "com.docker.compose.project.config_files"
COMPOSE_DIR = "com.docker.compose.project.working_dir"
#: What ``up`` leaves in the state directory besides the state and the journal.
GENERATED_FILES = ("compose.yaml", "compose-up.log", ENV_FILE)


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
    #: Read from the containers of a lab sipdrill did not start (or whose
    #: state file is gone or stale), with the topology file they mount: never saved.
    adopted_from: str | None = None

    @classmethod
    def load(cls, path: Path) -> DockerLabState | None:
        try:
            return cls(**json.loads(path.read_text()))
        except FileNotFoundError:
            return None

    def save(self, path: Path) -> None:
        assert self.adopted_from is None  # the containers are the truth of an adopted lab
        data = json.dumps(asdict(self), indent=2).encode()
        write_atomically(path, data, mode=0o600, make_parents=True)  # it holds the token


def _env(attrs: Mapping[str, Any]) -> dict[str, str]:
    pairs = (e.split("=", 1) for e in (attrs.get("Config") or {}).get("Env") or [] if "=" in e)
    return {k: v for k, v in pairs}


def topology_mount(attrs: Mapping[str, Any]) -> str | None:
    """The host path of the topology file a lab container mounts, if any."""
    for mount in attrs.get("Mounts") or []:
        if mount.get("Destination") == CONTAINER_TOPOLOGY and mount.get("Source"):
            return str(mount["Source"])
    return None


def compose_project(attrs: Mapping[str, Any]) -> str | None:
    return ((attrs.get("Config") or {}).get("Labels") or {}).get(COMPOSE_PROJECT)


def _option(argv: Sequence[str], name: str) -> str | None:
    argv = list(argv)
    return argv[argv.index(name) + 1] if name in argv[:-1] else None


def state_from_containers(lab: str, containers: Sequence[Mapping[str, Any]]) -> DockerLabState:
    """The state of a running lab as its containers (their ``attrs``) tell it:
    Compose project, token, image, and the plan of the topology they mount.
    Raises OperationError ``lab-unreadable`` when that cannot be known here."""
    projects = Counter(p for p in map(compose_project, containers) if p)
    project = projects.most_common(1)[0][0] if projects else project_name(lab)
    where = f"docker lab {lab!r} (Compose project {project}, {len(containers)} container(s))"
    token = next(
        (t for t in (_env(c).get("SIPDRILL_CONTROL_TOKEN") for c in containers) if t), None
    )
    source = next((s for s in map(topology_mount, containers) if s), None)
    if source is None or token is None:
        missing = "its topology file" if source is None else "SIPDRILL_CONTROL_TOKEN"
        raise OperationError(
            "lab-unreadable",
            f"{where} was not made from a sipdrill Compose file: no container has "
            f"{missing} ({CONTAINER_TOPOLOGY}, the control token). Remove it with "
            f"`sipdrill lab down {lab} --runtime docker`, then start it with "
            "`sipdrill lab up TOPOLOGY --runtime docker` or from `sipdrill lab compose`'s file",
        )
    try:
        topology = load_topology(source).topology
    except ConfigFileError as exc:
        raise OperationError(
            "lab-unreadable",
            f"{where} was started without sipdrill, and its plan comes from the topology "
            f"file its containers mount, {source}, which cannot be used here: "
            f"{str(exc).splitlines()[0]}. Run sipdrill on the Docker host, where that "
            "file is, or restart the lab with `sipdrill lab up TOPOLOGY --runtime docker`",
        ) from None
    clients = [c for c in containers if _labels(c).get(labels.ROLE) == Role.CLIENTS.value]
    per_replica = next(
        (int(n) for n in (_option(_cmd(c), "--count") for c in clients) if n and n.isdigit()),
        0,
    )
    image = next((str(c["Config"]["Image"]) for c in containers if c.get("Config")), "")
    files = next((str(f) for f in (_labels(c).get(COMPOSE_FILES) for c in containers) if f), "")
    workdir = next((str(w) for w in (_labels(c).get(COMPOSE_DIR) for c in containers) if w), "")
    if files and workdir:  # v1 records the files as given (relative to the directory)
        files = ",".join(str(Path(workdir, f)) for f in files.split(","))
    return DockerLabState(
        lab=lab,
        project=project,
        token=token,
        image=image,
        compose_file=files,
        specs=[asdict(s) for s in docker_plan(topology, clients=per_replica)],
        adopted_from=source,
    )


def _runs(attrs: Mapping[str, Any], state: DockerLabState) -> bool:
    """Whether a container is of the lab ``state`` describes (not of a lab
    started since with the same name: another token, maybe another project)."""
    token = _env(attrs).get("SIPDRILL_CONTROL_TOKEN")
    return compose_project(attrs) == state.project and token == state.token


def _labels(attrs: Mapping[str, Any]) -> dict[str, str]:
    return dict((attrs.get("Config") or {}).get("Labels") or {})


def _cmd(attrs: Mapping[str, Any]) -> list[str]:
    return [str(a) for a in (attrs.get("Config") or {}).get("Cmd") or []]


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
        # The lab's state once read (a command or a drill sees one lab).
        self._cached: DockerLabState | None = None

    # --- engine and state ----------------------------------------------------

    def _state(self) -> DockerLabState:
        """The lab as it runs: the state ``up`` saved when its containers are
        that state's, else what the containers say (a lab started with
        docker-compose, or whose state is gone or stale). Raises
        OperationError ``lab-not-up`` when there is neither."""
        if self._cached is not None:
            return self._cached
        state = DockerLabState.load(self.state_path)
        with lab_engine() as rt:
            containers = [c.attrs for c in rt.lab_containers(self.lab)]
        if not containers:
            if state is None:
                raise OperationError(
                    "lab-not-up",
                    f"no docker lab {self.lab!r}: no container is labelled "
                    f"{labels.LAB}={self.lab} and {self.state_path} does not exist; start it "
                    "with `sipdrill lab up TOPOLOGY --runtime docker` or `docker-compose up -d`",
                    404,
                )
            return state  # down, or crashed: what it was is still worth knowing
        if state is None or any(not _runs(c, state) for c in containers):
            state = state_from_containers(self.lab, containers)
        self._cached = state
        return state

    def _state_or_none(self) -> DockerLabState | None:
        """The state, or None when there is no lab or it cannot be read here
        (status still lists its containers)."""
        try:
            return self._state()
        except OperationError as exc:
            if exc.code in ("lab-not-up", "lab-unreadable"):
                return None
            raise

    @property
    def project(self) -> str:
        return project_name(self.lab)

    @property
    def token(self) -> str:
        """The token the lab's services run with (a hand-started lab's too)."""
        return self._state().token

    def _specs(self) -> list[ServiceSpec]:
        state = self._state_or_none()
        return [spec_from_dict(d) for d in state.specs] if state else []

    def running(self) -> bool:
        """Whether any container of the lab exists (whoever started it)."""
        with lab_engine() as rt:
            return bool(rt.lab_containers(self.lab))

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
        # Compose commands run by hand in the state directory (ps, logs, up --scale)
        # then act on this project, with the token and image it runs with.
        write_env_file(
            self.state_dir,
            {
                PROJECT_VARIABLE: state.project,
                "SIPDRILL_CONTROL_TOKEN": state.token,
                "SIPDRILL_IMAGE": state.image,
            },
            mode=0o600,
        )
        state.save(self.state_path)
        self._cached = None
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
        self._cached = None
        # The generated compose file, its .env and the log of `up` belong to the lab that is gone.
        for leftover in GENERATED_FILES:
            (self.state_dir / leftover).unlink(missing_ok=True)
        if any(removed.values()):
            self.progress(
                f"removed {len(removed['containers'])} container(s), "
                f"{len(removed['networks'])} network(s), {len(removed['volumes'])} volume(s)"
            )
        return [services.get(n, n) for n in removed["containers"]]

    def status(self) -> list[dict[str, Any]]:
        state = self._state_or_none()
        specs = [spec_from_dict(d) for d in state.specs] if state else []
        by_name = {s.name: s for s in specs}
        order = _order(specs)
        active = self.faults.active()
        rows = []
        with lab_engine() as rt:
            containers = rt.lab_containers(self.lab)
            projects = (compose_project(c.attrs) for c in containers)
            project = state.project if state else next(filter(None, projects), self.project)
            for c in containers:
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
        return with_running_clients(self._specs(), self.status())

    # --- a drill on a running lab -------------------------------------------

    def attach(self, topology: Topology, clients: int) -> list[str]:
        """Take the running lab for a drill on ``topology`` (asking for
        ``clients`` clients) instead of starting one. Refuses (OperationError)
        a lab that is not healthy or runs another topology; returns what the
        drill should know (timers other than the drill's, another number of
        clients, idle replicas, who started the lab)."""
        state = self._state()
        sick = [f"{r['name']}: {r['health']}" for r in self.status() if r["health"] != "healthy"]
        if sick:
            raise OperationError(
                "lab-not-healthy",
                f"docker lab {self.lab!r} is already up but not healthy ({'; '.join(sick)}): "
                f"wait until it is, or `sipdrill lab heal|down {self.lab} --runtime docker` "
                "(down: the drill then starts a lab of its own)",
                409,
            )
        source, running = self._running_topology()
        differs = [
            k
            for k in Topology.model_fields
            if k not in ("timers", "description") and getattr(running, k) != getattr(topology, k)
        ]
        if differs:
            raise OperationError(
                "lab-differs",
                f"docker lab {self.lab!r} is already up with the topology {source}, whose "
                f"{', '.join(differs)} differ from the drill's: `sipdrill lab down {self.lab} "
                "--runtime docker` first, and the drill starts a lab of its own",
                409,
            )
        who = (
            f"started without sipdrill ({state.compose_file or 'docker-compose'})"
            if state.adopted_from
            else "started by sipdrill"
        )
        notes = [f"the running lab: Compose project {state.project}, {who}; it stays up"]
        ours, theirs = running.timers, topology.timers
        timers = [
            f"{name} {getattr(ours, name)} (the drill's: {getattr(theirs, name)})"
            for name in type(ours).model_fields
            if getattr(ours, name) != getattr(theirs, name)
        ]
        if timers:
            notes.append("it runs its own timers, not the drill's: " + "; ".join(timers))
        notes += self._clients_notes(clients)
        return notes

    def _running_topology(self) -> tuple[str, Topology]:
        with lab_engine() as rt:
            mounts = [topology_mount(c.attrs) for c in rt.lab_containers(self.lab)]
        source = next((m for m in mounts if m), None)
        if source is None:
            raise OperationError(
                "lab-unreadable", f"no container of docker lab {self.lab!r} mounts its topology"
            )
        try:
            return source, load_topology(source).topology
        except ConfigFileError as exc:
            raise OperationError(
                "lab-unreadable",
                f"docker lab {self.lab!r} runs the topology {source}, which cannot be read "
                f"here: {str(exc).splitlines()[0]}",
            ) from None

    def _clients_notes(self, asked: int) -> list[str]:
        """What the lab's clients replicas simulate, against what the drill asks."""
        total, idle = 0, []
        with httpx.Client(timeout=5.0) as http:
            for spec in self.live_specs():
                if spec.role is not Role.CLIENTS:
                    continue
                try:
                    health = http.get(f"{spec.control_url}/health").json()
                except (httpx.HTTPError, ValueError) as exc:
                    raise OperationError(
                        "lab-not-healthy",
                        f"{spec.name} of docker lab {self.lab!r} does not answer: {exc}",
                        409,
                    ) from None
                total += int(health.get("endpoints", 0))
                if health.get("status") == "idle":
                    idle.append(spec.name)
        notes = []
        if total != asked:
            notes.append(f"it simulates {total} client(s), not the drill's {asked}")
        if idle:
            notes.append(f"{', '.join(idle)}: no users left (idle)")
        return notes

    # --- faults (docker_lab_faults) -----------------------------------------

    def inject(self, kind: str, target: str, **params: Any) -> InjectedFault:
        """Parse and inject a fault; it is journalled before it takes effect."""
        return self.apply(parse_fault_request(kind, target, params, self.kind))

    def apply(self, request: FaultRequest) -> InjectedFault:
        self._state()  # lab-not-up, or a hand-started lab that cannot be read: say why
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

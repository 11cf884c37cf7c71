"""The lab as a Compose file, generated from the lab plan of a topology.

``sipdrill lab compose topologies/paired-pools.yaml > compose.yaml`` writes it;
``docker-compose up -d`` then brings the lab to healthy and the clients to full
service with no other step, and the docker runtime
(:mod:`sipdrill.orchestrator.docker_lab`) runs the same generator for drills.

Networks. One bridge network per site and one for the core (its subnets are
the topology's), with each service's plan address on its home network. Docker
isolates user-defined bridges from one another (``DOCKER-ISOLATION`` rules on
the host), so nothing is routed between them, and a router container would
need routes in every container that a ``docker network disconnect`` wipes.
So the lab is multi-homed instead: every service also has a leg on every
other lab network, with an address from the top quarter of that subnet
(``ip_range``, which no plan address may use). The topology's addresses are
all on-link everywhere and every path is symmetric; the site is where a
service's plan address lives and what a site fault hits. Every fault acts on
all of a container's legs (``cut`` drops on every interface, ``disconnect``
leaves every network, ``partition`` drops every address of the other side),
so cutting site1 silences pool1 *and* backup-pool1 completely.

Clients. One ``clients`` service, scalable with ``--scale clients=N``: each
replica claims the lowest free slot (``serve clients --slots``: an ``flock``
on the shared volume, held for the life of its process) and simulates users
``slot*count`` to ``slot*count + count - 1`` of the topology, so replicas
never share a user (:mod:`sipdrill.clients.slots`). A replica that restarts
takes its slot back; one past the last user stays up, healthy and idle.

Shared state. One named volume at :data:`CONTAINER_STATE` holds the lab CA
(every role creates it under ``flock`` if missing), each service's state
directory and the clients' slots; ``docker-compose down -v`` removes it.

Privileges. Every service runs as the image's unprivileged user
(:data:`SERVICE_USER`) with no capabilities. Containers have ``cap_add:
[NET_ADMIN]`` all the same: a ``docker exec`` gets the container's
capabilities and no more (``exec --privileged`` is refused on this engine),
and the orchestrator's faults run ``iptables`` and ``tc`` that way, as root.
A service with a port forward starts as root for its one ``iptables`` rule,
then drops to the user (:data:`PORT_FORWARD_SCRIPT`); Compose's init
(``init: true``, PID 1) is root in those containers, and only reaps.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sipdrill.errors import OperationError
from sipdrill.orchestrator import labels
from sipdrill.orchestrator.plan import Role, RuntimeKind, ServiceSpec, lab_plan
from sipdrill.topology import Topology

#: Where the topology file is mounted (read-only) in every container.
CONTAINER_TOPOLOGY = "/etc/sipdrill/topology.yaml"
#: The lab's state directory in every container: the shared named volume.
CONTAINER_STATE = "/var/lib/sipdrill/lab"
#: The named volume mounted at CONTAINER_STATE.
STATE_VOLUME = "lab-state"
#: The compose service of the clients (replicas are clients-1, clients-2, ...).
CLIENTS_SERVICE = "clients"
#: Host ports of the control APIs in the committed file: base + plan index.
DEFAULT_PORT_BASE = 18080
IMAGE = "${SIPDRILL_IMAGE:-sipdrill:latest}"
TOKEN = "${SIPDRILL_CONTROL_TOKEN:-lab}"
#: The image's user that every service runs as (Dockerfile).
SERVICE_USER = "sipdrill"
#: Run the rest of a command line as {user}, with no capability kept or to gain.
SETPRIV = (
    "setpriv --reuid={user} --regid={user} --init-groups --inh-caps=-all "
    "--bounding-set=-all --no-new-privs"
)
#: Health checks: often enough that ``up`` is quick (Docker 20.10 has no
#: start_interval), cheap enough to run all the time (a socket, no urllib).
HEALTH_INTERVAL = "2s"
HEALTH_TIMEOUT = "5s"
HEALTH_RETRIES = 5
HEALTH_START_PERIOD = "60s"

#: Where the clients replicas claim their slots (``serve clients --slots``).
CLIENT_SLOTS = f"{CONTAINER_STATE}/clients-slots"


def docker_plan(
    topology: Topology,
    *,
    clients: int = 0,
    clients_processes: int = 1,
    client_args: tuple[str, ...] = (),
) -> list[ServiceSpec]:
    """The lab plan with the paths the containers see."""
    return lab_plan(
        topology,
        RuntimeKind.DOCKER,
        topology_path=CONTAINER_TOPOLOGY,
        state_dir=CONTAINER_STATE,
        clients=clients,
        clients_processes=clients_processes,
        client_args=client_args,
    )


@dataclass(frozen=True)
class ComposeOptions:
    lab: str  # the sipdrill.lab label and the prefix of container names
    topology_source: str  # the topology file as Compose resolves it (relative: to the file)
    port_base: int | None = DEFAULT_PORT_BASE  # None: ephemeral host ports
    image: str = IMAGE
    token: str = TOKEN


def networks_of(topology: Topology) -> dict[str, ipaddress.IPv4Network]:
    """The lab networks: ``core`` then each site, by name."""
    nets = {"core": topology.lab.core_subnet}
    nets.update({s.name: s.subnet for s in topology.sites})
    return nets


def dynamic_range(subnet: ipaddress.IPv4Network) -> ipaddress.IPv4Network:
    """The top quarter of ``subnet``: where Docker picks the addresses of legs."""
    return list(subnet.subnets(prefixlen_diff=2))[-1]


def home_network(spec: ServiceSpec) -> str:
    return spec.network


def _check_addresses(topology: Topology, specs: Sequence[ServiceSpec]) -> None:
    nets = networks_of(topology)
    for spec in specs:
        if spec.role is Role.CLIENTS:
            continue
        net = nets[spec.network]
        addr = ipaddress.IPv4Address(spec.address)
        if addr not in net:
            raise OperationError(
                "bad-address", f"{spec.name}'s address {addr} is outside network {spec.network}"
            )
        if addr in dynamic_range(net):
            raise OperationError(
                "bad-address",
                f"{spec.name}'s address {addr} is in {dynamic_range(net)}, the range the "
                f"docker runtime keeps for the legs of other services on {spec.network}: "
                "give it an address in the lower three quarters of the subnet",
            )


def _health(url_host: str, port: int, *, as_root: bool = False) -> dict[str, Any]:
    """The health check; ``as_root``: the container's user is root (a port
    forward), and the check drops to SERVICE_USER as the service does."""
    probe = (
        f'import socket; s = socket.create_connection(("{url_host}", {port}), 3); '
        f's.sendall(b"GET /health HTTP/1.0\\r\\nHost: {url_host}\\r\\n\\r\\n"); '
        'assert s.recv(64).split()[1] == b"200"'
    )
    drop = [*SETPRIV.format(user=SERVICE_USER).split()] if as_root else []
    return {
        "test": ["CMD", *drop, "python3", "-I", "-S", "-c", probe],
        "interval": HEALTH_INTERVAL,
        "timeout": HEALTH_TIMEOUT,
        "retries": HEALTH_RETRIES,
        "start_period": HEALTH_START_PERIOD,
    }


#: The entrypoint of a service whose control API listens on a network that is
#: not the container's gateway network (Docker publishes ports on that one):
#: forward the control port there to the service's address (as root, the
#: container's user), then run the service as SERVICE_USER with no
#: capabilities at all (none kept, none to gain). {addr}, {port}, {setpriv}.
PORT_FORWARD_SCRIPT = """\
iptables -w 5 -t nat -I PREROUTING -p tcp --dport {port} ! -d {addr} \\
  -j DNAT --to-destination {addr}:{port} \\
  || echo "sipdrill: no forward of port {port} to {addr} (cap_add NET_ADMIN?)" >&2
exec {setpriv} sipdrill "$$@"
"""


def gateway_network(networks: Sequence[str]) -> str:
    """The network Docker (20.10) routes a multi-homed container's default
    traffic and published ports through: the first by name (every network of
    a project has the same prefix)."""
    return min(networks)


def _clients_args(args: Sequence[str]) -> list[str]:
    """A clients process's plan arguments for a replica: no fixed source
    address (replicas get theirs from Docker), the control API on every
    address, no ``--offset``: the replica's slot picks its users (``--slots``)."""
    out: list[str] = []
    it = iter(args)
    for a in it:
        if a in ("--bind", "--offset"):
            next(it, None)
        elif a == "--control":
            _host, _, port = next(it).rpartition(":")
            out += ["--control", f"0.0.0.0:{port}"]
        else:
            out.append(a)
    return [*out, "--slots", CLIENT_SLOTS]


def compose_model(
    topology: Topology, specs: Sequence[ServiceSpec], options: ComposeOptions
) -> dict[str, Any]:
    """The Compose file (as a dict) that runs ``specs`` (a docker lab plan)."""
    _check_addresses(topology, specs)
    nets = networks_of(topology)
    lab = options.lab
    services: dict[str, Any] = {}
    clients = [s for s in specs if s.role is Role.CLIENTS]
    for index, spec in enumerate(s for s in specs if s.role is not Role.CLIENTS):
        networks: dict[str, Any] = {spec.network: {"ipv4_address": spec.address}}
        networks.update({n: None for n in nets if n != spec.network})
        env = {"SIPDRILL_CONTROL_TOKEN": options.token}
        if spec.role is Role.DNS:
            env["SIPDRILL_DNS_TOKEN"] = options.token
        env.update(dict(spec.env))
        entrypoint: dict[str, Any] = {}
        if gateway_network(list(nets)) != spec.network:
            script = PORT_FORWARD_SCRIPT.format(
                addr=spec.address, port=spec.control_port,
                setpriv=SETPRIV.format(user=SERVICE_USER),
            )
            # Root for the forward only: the script drops to SERVICE_USER.
            entrypoint = {"user": "root", "entrypoint": ["sh", "-c", script, "sipdrill"]}
        services[spec.name] = {
            "image": options.image,
            "container_name": f"{lab}-{spec.name}",
            "hostname": spec.name,
            **entrypoint,
            "command": list(spec.args),
            "init": True,
            "cap_add": ["NET_ADMIN"],
            "environment": env,
            "labels": labels.lab_labels(lab, role=spec.role.value, service=spec.name),
            "networks": networks,
            "ports": [_port(options.port_base, index, spec.control_port)],
            "volumes": _volumes(options),
            "healthcheck": _health(spec.address, spec.control_port, as_root=bool(entrypoint)),
            "stop_grace_period": "5s",
            **_depends(spec.depends_on),
        }
    if clients:
        first = clients[0]
        service: dict[str, Any] = {
            "image": options.image,
            "command": _clients_args(first.args),
            "init": True,
            "cap_add": ["NET_ADMIN"],
            "environment": {"SIPDRILL_CONTROL_TOKEN": options.token},
            "labels": labels.lab_labels(lab, role=Role.CLIENTS.value, service=CLIENTS_SERVICE),
            "networks": {n: None for n in nets},
            "ports": [_port(None, 0, first.control_port)],
            "volumes": _volumes(options),
            "healthcheck": _health("127.0.0.1", first.control_port),
            "stop_grace_period": "5s",
            **_depends(first.depends_on),
        }
        if len(clients) > 1:
            service["scale"] = len(clients)
        services[CLIENTS_SERVICE] = service
    return {
        "services": services,
        "networks": {
            name: {
                "labels": labels.lab_labels(lab),
                "ipam": {
                    "config": [
                        {
                            "subnet": str(net),
                            "gateway": str(net.network_address + 1),
                            "ip_range": str(dynamic_range(net)),
                        }
                    ]
                },
            }
            for name, net in nets.items()
        },
        "volumes": {STATE_VOLUME: {"labels": labels.lab_labels(lab)}},
    }


def _port(base: int | None, index: int, container_port: int) -> str:
    if base is None:
        return f"127.0.0.1::{container_port}"
    return f"127.0.0.1:{base + index}:{container_port}"


def _volumes(options: ComposeOptions) -> list[str]:
    return [
        f"{options.topology_source}:{CONTAINER_TOPOLOGY}:ro",
        f"{STATE_VOLUME}:{CONTAINER_STATE}",
    ]


def _depends(names: Sequence[str]) -> dict[str, Any]:
    if not names:
        return {}
    return {"depends_on": {n: {"condition": "service_healthy"} for n in names}}


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line strings; ``key:`` (not ``key: null``) for empty maps."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


def _none(dumper: yaml.SafeDumper, _value: None) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:null", "")


_Dumper.add_representer(str, _str)
_Dumper.add_representer(type(None), _none)


def render(model: dict[str, Any], *, header: str = "") -> str:
    body = yaml.dump(model, Dumper=_Dumper, sort_keys=False, width=200, allow_unicode=True)
    return header + body


def generate(
    topology: Topology,
    options: ComposeOptions,
    *,
    clients: int = 0,
    clients_processes: int = 1,
    command: str = "",
) -> str:
    """The Compose file for ``topology`` as text."""
    specs = docker_plan(topology, clients=clients, clients_processes=clients_processes)
    nets = networks_of(topology)
    published = [
        f"{s.name} {_port(options.port_base, i, s.control_port).split(':')[1] or 'ephemeral'}"
        for i, s in enumerate(x for x in specs if x.role is not Role.CLIENTS)
    ]
    if any(s.role is Role.CLIENTS for s in specs):
        published.append("clients ephemeral (docker-compose port clients 8080)")
    lines = [
        f"# The {topology.name} lab: docker-compose up -d (or docker compose up -d).",
        f"# Generated by `{command or 'sipdrill lab compose'}`:",
        "# change the topology and generate the file again (docs/runtimes.md).",
        "#",
        "# Networks: " + ", ".join(f"{n} {net}" for n, net in nets.items()) + ".",
        "# Each service has its plan address on its home network and a leg on every",
        "# other one (from the top quarter of the subnet): Docker does not route between",
        "# bridges, and every fault acts on all legs, so a site cut silences the site.",
        "# Control APIs published on 127.0.0.1 (container port 8080):",
        *(f"#   {p}" for p in published),
        "# Token: SIPDRILL_CONTROL_TOKEN (default `lab`). More clients: --scale clients=N",
        "# (each replica simulates its own slice of the topology's users; one past the",
        "# last user stays up, idle). Project name: "
        f"{project_name(options.lab)}, from {ENV_FILE} beside this file",
        f"# ({PROJECT_VARIABLE}; `sipdrill lab compose -o FILE` writes both): run compose",
        f"# from this directory, or pass -p {project_name(options.lab)}.",
        "",
    ]
    return render(compose_model(topology, specs, options), header="\n".join(lines) + "\n")


#: The file beside a Compose file that Compose (v1 1.28+ and v2) reads for
#: its variables, COMPOSE_PROJECT_NAME among them.
ENV_FILE = ".env"
PROJECT_VARIABLE = "COMPOSE_PROJECT_NAME"


def project_name(lab: str) -> str:
    """The Compose project of ``lab``: the name as Compose would normalise it
    (lower case; letters, digits, ``-`` and ``_``; starting with a letter or
    digit), so that v1, v2 and the docker runtime all name it alike."""
    name = re.sub(r"[^a-z0-9_-]", "", lab.lower()).lstrip("-_")
    return name or "sipdrill"


ENV_HEADER = """\
# Read by docker-compose (v1) and docker compose (v2) from the directory of
# compose.yaml: the project name is the lab's, not this directory's, so the
# networks, the volume and the clients replicas have the same names wherever
# the file lives (paired-pools_core, paired-pools_clients_1 or
# paired-pools-clients-1). Run compose from here, or pass -p with this name.
"""


def write_env_file(directory: Path, values: dict[str, str], *, mode: int = 0o644) -> Path:
    """Set ``values`` in ``directory``'s ``.env`` (other lines are kept)."""
    path = directory / ENV_FILE
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        lines = ENV_HEADER.splitlines()
    pending = dict(values)
    out = []
    for line in lines:
        key = line.split("=", 1)[0].strip()
        if "=" in line and not line.lstrip().startswith("#") and key in values:
            if key in pending:
                out.append(f"{key}={pending.pop(key)}")
            continue  # a duplicate of a key we set
        out.append(line)
    out += [f"{k}={v}" for k, v in pending.items()]
    path.write_text("\n".join(out) + "\n", encoding="utf-8")
    path.chmod(mode)
    return path


def command_line(
    topology: Topology, topology_arg: str, options: ComposeOptions, clients: int, processes: int
) -> str:
    """The ``sipdrill lab compose`` command that makes a file (for its header)."""
    parts = ["sipdrill", "lab", "compose", topology_arg]
    if options.lab != topology.name:
        parts += ["--lab", options.lab]
    if clients:
        parts += ["--clients", str(clients)]
    if processes != 1:
        parts += ["--clients-processes", str(processes)]
    if options.port_base != DEFAULT_PORT_BASE:
        parts += ["--port-base", str(options.port_base) if options.port_base else "0"]
    return " ".join(shlex.quote(p) for p in parts)

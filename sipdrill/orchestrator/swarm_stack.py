"""The lab as a Docker Swarm stack file, made from the Compose file of
:mod:`sipdrill.orchestrator.compose` (one generator for both: the stack is
the Compose model with what Swarm does differently), and the overlay networks
the stack runs on.

What differs from the Compose file, and why:

* **Networks** are overlays, one per site and one for the core, attachable
  (a container started by hand, or an orchestrator in a container, can join
  them), with the topology's subnets. The stack file format refuses
  ``ip_range``, and without it Swarm hands out addresses from the bottom of
  the subnet, where the plan's addresses are; so the runtime creates the
  networks itself (:func:`overlay_networks`, with ``ip_range`` the top
  quarter as in Compose) and the stack names them ``external``.
* **Addresses.** Swarm gives a service's task no fixed address
  (``ipv4_address`` is ignored in a stack). Each task claims its plan address
  itself: its entrypoint (:data:`SWARM_ENTRYPOINT`, NET_ADMIN) adds the plan
  address as a second address of its leg on its home network. The lab DNS
  server then serves the topology's records unchanged, and every part that
  reaches a pool at its plan address (clients after SRV, pools calling pools,
  Backup Services) works as on the docker runtime. On one node the overlay's
  bridge answers ARP for it; across nodes each node's fault agent routes its
  node's containers to the plan addresses of other nodes' tasks via their
  Docker addresses (:mod:`sipdrill.orchestrator.swarm_agent`).
* **No start order**: Swarm has no ``depends_on``; every role retries until
  what it needs answers, health checks say when it is ready, and a task that
  exits is started again (``restart_policy``).
* **Placement**: each site's services go on nodes labelled
  ``sipdrill.site=<site>`` (the core's on ``sipdrill.site=core``); a site no
  node is labelled for goes on any node, with a warning from the runtime.
* **Shared files**: the topology is a Swarm config, the lab CA two secrets
  (the orchestrator makes the CA: a volume is per node, and every node must
  trust the same CA); each service's state is in a per-node volume.
* **Clients** are a replicated service; replica ``n`` (Swarm's
  ``{{.Task.Slot}}``, stable across restarts) simulates users
  ``(n-1)*count+1`` to ``n*count``.
* **Health checks** allow two minutes of failures (:data:`SWARM_HEALTH`):
  Swarm replaces an unhealthy task, Compose does not.
* **The fault agent** (:mod:`sipdrill.orchestrator.swarm_agent`) is a global
  service: one per node, host network, NET_ADMIN and the node's Docker
  socket.
* **No published ports**: the orchestrator reaches each task at its home
  address through a host route the agent of its node keeps
  (``via`` the task's docker_gwbridge address).
"""

from __future__ import annotations

import copy
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sipdrill.errors import FileIssue, OperationError
from sipdrill.orchestrator import labels
from sipdrill.orchestrator.compose import (
    CLIENTS_SERVICE,
    CONTAINER_STATE,
    CONTAINER_TOPOLOGY,
    IMAGE,
    SERVICE_USER,
    SETPRIV,
    STATE_VOLUME,
    TOKEN,
    ComposeOptions,
    compose_model,
    dynamic_range,
    networks_of,
)
from sipdrill.orchestrator.plan import Role, ServiceSpec
from sipdrill.topology import Topology
from sipdrill.yamlfile import Lines, dotted

#: The node label that places a site's services: ``sipdrill.site=<site>``.
SITE_LABEL = "sipdrill.site"
#: The container label with a service's plan address (the agent routes to it).
ADDRESS_LABEL = "sipdrill.address"
#: The stack service of the fault agents.
AGENT_SERVICE = "fault-agent"
AGENT_VOLUME = "agent-state"
AGENT_STATE = "/var/lib/sipdrill/agent"
#: The agents' port on each node's host network (a lab picks its own at ``up``).
DEFAULT_AGENT_PORT = 18600
#: Swarm kills and replaces a task whose health check fails ``retries`` times
#: in a row (Compose only marks it unhealthy). A clients replica signing in
#: thousands of endpoints on a loaded node answers its check late, and a
#: paused task (a pause fault) not at all: two minutes of failures before Swarm
#: steps in, not Compose's ten seconds (a sign-in of 20,000 clients was
#: replaced in a loop with those).
#: Every 5 s, not Compose's 2 s: each check starts a Python process, and a
#: 50,000-client lab of 34 tasks on one 2-core node spent most of a core on
#: 17 of them a second, until the clients replicas' own checks timed out and
#: Swarm replaced them in a loop. 24 failures x 5 s: two minutes, as before.
SWARM_HEALTH = {"interval": "5s", "timeout": "10s", "retries": 24, "start_period": "120s"}
CA_SECRET = "ca-cert"
CA_KEY_SECRET = "ca-key"
TOPOLOGY_CONFIG = "topology"

#: Every lab task's entrypoint (``sh -c``, as root; argv: sipdrill's
#: arguments): the CA from the secrets into the state volume, the plan address
#: on the home network's leg, then sipdrill as the image's unprivileged user
#: with no capability (as on the docker runtime). ``$$``: the stack file is
#: interpolated.
SWARM_ENTRYPOINT = f"""\
set -e
ca={CONTAINER_STATE}/ca
mkdir -p "$$ca"
if [ -r /run/secrets/sipdrill-ca.pem ]; then
  # Temporary files of this task's own (mktemp: every task's shell has the
  # same pid): the tasks of a node share the volume.
  key=$$(mktemp "$$ca/.key.XXXXXX"); cert=$$(mktemp "$$ca/.ca.XXXXXX")
  cat /run/secrets/sipdrill-ca-key.pem >"$$key"; cat /run/secrets/sipdrill-ca.pem >"$$cert"
  chmod 644 "$$cert"; chown {SERVICE_USER}:{SERVICE_USER} "$$key" "$$cert"
  mv "$$key" "$$ca/ca-key.pem"; mv "$$cert" "$$ca/ca.pem"
fi
chown {SERVICE_USER}:{SERVICE_USER} "$$ca"
if [ -n "$${{SIPDRILL_PLAN_ADDRESS:-}}" ]; then
  dev=$$(ip -o -4 addr show | python3 -I -S -c "import ipaddress, sys
net = ipaddress.ip_network(sys.argv[1])
print(next(l.split()[1] for l in sys.stdin if ipaddress.ip_interface(l.split()[3]).ip in net))" \\
    "$$SIPDRILL_PLAN_SUBNET")
  ip addr replace "$$SIPDRILL_PLAN_ADDRESS/$${{SIPDRILL_PLAN_SUBNET#*/}}" dev "$$dev"
  echo "sipdrill: plan address $$SIPDRILL_PLAN_ADDRESS on $$dev" >&2
fi
if [ "$${{1:-}}" = clients-slot ]; then
  shift; exec {SETPRIV.format(user=SERVICE_USER)} python3 -c "$$SIPDRILL_SLOT_SCRIPT" "$$@"
fi
exec {SETPRIV.format(user=SERVICE_USER)} sipdrill "$$@"
"""

#: A clients replica's users: its Swarm slot, not a lock on a shared volume
#: (a volume is per node). argv: the plan's ``serve clients ...`` arguments.
SWARM_SLOT_SCRIPT = """\
import os, sys
from sipdrill.topology import load_topology
args = sys.argv[1:]
count = int(args[args.index('--count') + 1])
slot = int(os.environ['SIPDRILL_CLIENT_SLOT']) - 1
topology = load_topology(args[args.index('--topology') + 1]).topology
users = topology.all_users()[slot * count:(slot + 1) * count]
if len(users) < count:
    sys.exit(f'clients replica {slot + 1}: only {len(users)} of {count} users left: fewer replicas')
names = ','.join('*:' + u.uri.split(':', 1)[1].split('@', 1)[0] for u in users)
print(f'clients replica {slot + 1}: users {slot * count + 1} to {slot * count + count}',
      file=sys.stderr, flush=True)
os.execvp('sipdrill', ['sipdrill', *args, '--users', names])
"""


@dataclass(frozen=True)
class OverlaySpec:
    """An overlay network the runtime creates before the stack."""

    name: str  # <lab>_<network>
    network: str  # core or a site
    subnet: ipaddress.IPv4Network
    ip_range: ipaddress.IPv4Network
    gateway: ipaddress.IPv4Address


@dataclass(frozen=True)
class StackOptions:
    lab: str
    topology_file: str  # on the host that runs `docker stack deploy` (a config)
    ca_cert: str  # the lab CA's files on that host (secrets)
    ca_key: str
    #: Sites (and ``core``) that have a node labelled sipdrill.site=<it>.
    placed: frozenset[str] = field(default_factory=frozenset)
    agent_port: int = DEFAULT_AGENT_PORT
    image: str = IMAGE
    token: str = TOKEN


def overlay_networks(topology: Topology, lab: str) -> list[OverlaySpec]:
    return [
        OverlaySpec(
            name=f"{lab}_{name}",
            network=name,
            subnet=net,
            ip_range=dynamic_range(net),
            gateway=net.network_address + 1,
        )
        for name, net in networks_of(topology).items()
    ]


def _placement(network: str, placed: frozenset[str]) -> dict[str, Any]:
    if network not in placed:
        return {}
    return {"placement": {"constraints": [f"node.labels.{SITE_LABEL} == {network}"]}}


def _deploy(lab: str, network: str, options: StackOptions, **extra: Any) -> dict[str, Any]:
    return {
        # No virtual IP: nothing reaches a service by its name's VIP, and a VIP
        # would take an address of every network's dynamic range per service.
        "endpoint_mode": "dnsrr",
        "restart_policy": {"condition": "any", "delay": "2s"},
        "labels": labels.lab_labels(lab),
        **_placement(network, options.placed),
        **extra,
    }


def _files() -> dict[str, Any]:
    return {
        "configs": [{"source": TOPOLOGY_CONFIG, "target": CONTAINER_TOPOLOGY, "mode": 0o444}],
        "secrets": [
            {"source": CA_SECRET, "target": "sipdrill-ca.pem", "mode": 0o444},
            {"source": CA_KEY_SECRET, "target": "sipdrill-ca-key.pem", "mode": 0o400},
        ],
    }


def front_ends_issue(topology: Topology, file: str | Path) -> FileIssue | None:
    """Why the swarm runtime cannot run ``topology`` (read from ``file``, for
    the line): a pool of several front ends. They share the pool's store (its
    Back End) in one state directory, and a swarm lab's state volumes are per
    node: front ends placed on two nodes would each have a store of its own.
    None when every pool has one front end."""
    for i, pool in enumerate(topology.pools):
        if len(pool.front_ends) > 1:
            where: list[str | int] = ["pools", i, "front_ends"]
            try:
                line = Lines(yaml.compose(Path(file).read_text(encoding="utf-8"))).line(where)
            except (OSError, yaml.YAMLError):
                line = None
            return FileIssue(
                str(file),
                line,
                dotted(where),
                f"pool {pool.fqdn} has {len(pool.front_ends)} front ends; the swarm runtime "
                "runs one front end per pool (a pool's front ends share its store in one "
                "state directory, and a swarm lab's volumes are per node)",
                "run this topology with --runtime docker or --runtime local, or give "
                "each pool one front end for --runtime swarm",
            )
    return None


def refuse_front_ends(topology: Topology, file: str | Path) -> None:
    """OperationError ``swarm-front-ends`` for a topology the swarm runtime
    cannot run (:func:`front_ends_issue`), before anything is deployed."""
    issue = front_ends_issue(topology, file)
    if issue is not None:
        raise OperationError("swarm-front-ends", str(issue), 400)


def stack_model(
    topology: Topology, specs: Sequence[ServiceSpec], options: StackOptions
) -> dict[str, Any]:
    """The stack file (as a dict) that runs ``specs`` (a docker lab plan)."""
    refuse_front_ends(topology, options.topology_file)
    lab = options.lab
    compose = compose_model(
        topology,
        specs,
        ComposeOptions(
            lab=lab,
            topology_source=options.topology_file,
            port_base=None,
            image=options.image,
            token=options.token,
        ),
    )
    nets = networks_of(topology)
    by_name = {s.name: s for s in specs}
    services: dict[str, Any] = {}
    for name, service in compose["services"].items():
        svc = copy.deepcopy(service)
        for key in ("container_name", "depends_on", "ports", "entrypoint", "scale", "user"):
            svc.pop(key, None)
        svc["user"] = "root"  # for the entrypoint; it drops to SERVICE_USER
        svc["volumes"] = [v for v in svc["volumes"] if not v.endswith(f"{CONTAINER_TOPOLOGY}:ro")]
        svc["networks"] = sorted(svc["networks"])
        svc["entrypoint"] = ["sh", "-c", SWARM_ENTRYPOINT, "sipdrill"]
        svc.update(_files())
        env = dict(svc["environment"])
        if name == CLIENTS_SERVICE:
            replicas = sum(1 for s in specs if s.role is Role.CLIENTS)
            env["SIPDRILL_CLIENT_SLOT"] = "{{.Task.Slot}}"
            env["SIPDRILL_SLOT_SCRIPT"] = SWARM_SLOT_SCRIPT.replace("$", "$$")
            svc["command"] = ["clients-slot", *_without_slots(svc["command"])]
            svc["hostname"] = "clients-{{.Task.Slot}}"
            svc["deploy"] = _deploy(lab, "core", options, replicas=replicas)
        else:
            spec = by_name[name]
            env["SIPDRILL_PLAN_ADDRESS"] = spec.address
            env["SIPDRILL_PLAN_SUBNET"] = str(nets[spec.network])
            svc["labels"] = {**svc["labels"], ADDRESS_LABEL: spec.address}
            svc["deploy"] = _deploy(lab, spec.network, options)
        svc["environment"] = env
        svc["healthcheck"] = {**svc["healthcheck"], **SWARM_HEALTH}
        services[name] = svc
    plan = {s.name: s.address for s in specs if s.role is not Role.CLIENTS}
    services[AGENT_SERVICE] = agent_service(lab, options, plan)
    volumes = {
        STATE_VOLUME: {"labels": labels.lab_labels(lab)},
        AGENT_VOLUME: {"labels": labels.lab_labels(lab)},
    }
    return {
        "version": "3.9",
        "services": services,
        "networks": {
            **{n: {"external": True, "name": f"{lab}_{n}"} for n in nets},
            "hostnet": {"external": True, "name": "host"},
        },
        "volumes": volumes,
        "configs": {TOPOLOGY_CONFIG: {"file": options.topology_file}},
        "secrets": {
            CA_SECRET: {"file": options.ca_cert},
            CA_KEY_SECRET: {"file": options.ca_key},
        },
    }


def _without_slots(args: Sequence[str]) -> list[str]:
    """A replica's arguments without ``--slots DIR``: its Swarm slot picks its
    users, not a lock in a volume (a volume is per node)."""
    out: list[str] = []
    it = iter(args)
    for a in it:
        if a == "--slots":
            next(it, None)
        else:
            out.append(a)
    return out


def agent_service(
    lab: str, options: StackOptions, plan: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """One fault agent per node: the node's network namespace (its routes to
    the tasks), NET_ADMIN, the node's Docker socket (the containers' network
    namespaces, through ``docker exec`` as the docker runtime does), and the
    plan's addresses (``plan``: service -> address), which it routes the
    tasks of other nodes by."""
    port = options.agent_port
    probe = (
        f'import socket; s = socket.create_connection(("127.0.0.1", {port}), 3); '
        's.sendall(b"GET /health HTTP/1.0\\r\\n\\r\\n"); '
        'assert s.recv(64).split()[1] == b"200"'
    )
    return {
        "image": options.image,
        "command": [
            "serve",
            "fault-agent",
            "--lab",
            lab,
            "--listen",
            f"0.0.0.0:{port}",
            "--state-dir",
            AGENT_STATE,
        ],
        "init": True,
        "user": "root",  # the Docker socket, the node's routes
        "cap_add": ["NET_ADMIN"],
        "environment": {
            "SIPDRILL_CONTROL_TOKEN": options.token,
            "SIPDRILL_AGENT_NODE": "{{.Node.Hostname}}",
            "SIPDRILL_AGENT_NODE_ID": "{{.Node.ID}}",
            "SIPDRILL_PLAN_ADDRESSES": ",".join(
                f"{k}={v}" for k, v in sorted((plan or {}).items())
            ),
        },
        "labels": labels.lab_labels(lab, role="agent", service=AGENT_SERVICE),
        "networks": ["hostnet"],
        "volumes": ["/var/run/docker.sock:/var/run/docker.sock", f"{AGENT_VOLUME}:{AGENT_STATE}"],
        # Swarm replaces a task whose check fails `retries` times in a row: with
        # 30 s to start and 5 failures, three nodes' agents on this loaded 2-core
        # machine (load 20-40) were replaced in a loop before they answered
        # (each took ~70 s to import and listen). A hung agent is still
        # found out at once by the orchestrator's calls ("does not answer").
        "healthcheck": {
            "test": ["CMD", "python3", "-I", "-S", "-c", probe],
            "interval": "2s",
            "timeout": "10s",
            "retries": 30,
            "start_period": "120s",
        },
        "stop_grace_period": "20s",  # it heals its faults before it goes
        "deploy": {
            "mode": "global",
            "restart_policy": {"condition": "any", "delay": "1s"},
            "labels": labels.lab_labels(lab),
        },
    }


def placement_warnings(
    topology: Topology, node_labels: Mapping[str, Mapping[str, str]]
) -> tuple[frozenset[str], list[str]]:
    """Which networks have a labelled node (``node_labels``: node -> its
    labels), and a warning for each site that has none."""
    labelled = {lbls.get(SITE_LABEL) for lbls in node_labels.values()} - {None}
    networks = list(networks_of(topology))
    placed = frozenset(n for n in networks if n in labelled)
    warnings = [
        f"no node is labelled {SITE_LABEL}={site}: its services go on any node "
        f"(`docker node update --label-add {SITE_LABEL}={site} NODE` to place them)"
        for site in networks
        if site != "core" and site not in placed
    ]
    unknown = sorted(str(x) for x in labelled - set(networks))
    if unknown:
        warnings.append(
            f"nodes are labelled {SITE_LABEL}= {', '.join(unknown)}, which this topology "
            f"does not have (its networks: {', '.join(networks)})"
        )
    return placed, warnings

"""A swarm of several nodes on one machine, for tests: this engine is the
manager, each other node a Docker engine in a container (Docker-in-Docker,
the image of ``scripts/build-node-image.sh``) on a bridge network of its own,
joined as a worker with the swarm's token and given the lab image by
``docker save | docker load`` (no registry).

:class:`SwarmNodes` leaves nothing on exit, whatever happened: the workers
leave the swarm and their containers (and their engines' volumes) are
removed, this engine leaves the swarm, and the networks it made go.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import secrets
import subprocess
import time
from dataclasses import dataclass, field
from types import TracebackType

import docker
from docker.errors import DockerException, ImageNotFound, NotFound

NODE_IMAGE = os.environ.get("SIPDRILL_NODE_IMAGE", "sipdrill-node:bookworm")
#: The swarm's own networks (ingress) come from here, away from the labs'.
ADDR_POOL = "10.230.0.0/16"
NODE_LABEL = "sipdrill.test.swarm-node"

#: Everything --privileged gives a Docker engine, but one capability: a host
#: whose bounding set lacks CAP_SYS_RESOURCE (this one) refuses --privileged.
NODE_RUN_OPTIONS = (
    "--cap-add", "ALL", "--cap-drop", "SYS_RESOURCE",
    "--security-opt", "seccomp=unconfined", "--security-opt", "apparmor=unconfined",
    "--security-opt", "systempaths=unconfined",
    "--device-cgroup-rule", "a *:* rwm", "--cgroupns", "private",
)  # fmt: skip


def node_image_problem(client: docker.DockerClient) -> str | None:
    try:
        client.images.get(NODE_IMAGE)
    except ImageNotFound:
        return f"no image {NODE_IMAGE}: run scripts/build-node-image.sh (a few minutes)"
    return None


def _docker(*argv: str, timeout: float = 60, node: str | None = None) -> str:
    cmd = ["docker", *(["exec", node, "docker"] if node else []), *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {proc.stderr.strip()}")
    return proc.stdout.strip()


@dataclass
class SwarmNodes:
    """This engine as the manager (labelled ``manager_site``) and one
    Docker-in-Docker worker per entry of ``sites`` (labelled with it)."""

    client: docker.DockerClient
    image: str
    sites: list[str]
    manager_site: str | None = None
    name: str = field(default_factory=lambda: f"sipdrill-nodes-{secrets.token_hex(3)}")
    workers: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    _before: set[str] = field(default_factory=set)
    _network: str | None = None

    def __enter__(self) -> SwarmNodes:
        self._before = {str(n.name) for n in self.client.networks.list()}
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: tuple[type[BaseException], BaseException, TracebackType]) -> None:
        self.close()

    def _free_subnet(self) -> ipaddress.IPv4Network:
        used = [
            ipaddress.ip_network(c["Subnet"])
            for n in self.client.networks.list()
            for c in (n.attrs.get("IPAM") or {}).get("Config") or []
            if c.get("Subnet") and ":" not in c["Subnet"]
        ]
        for _ in range(50):
            net = ipaddress.IPv4Network(
                f"10.{random.randint(224, 227)}.{random.randint(0, 255)}.0/24"
            )
            if not any(net.overlaps(u) for u in used):
                return net
        raise RuntimeError("no free /24 in 10.224.0.0/14 for the nodes' network")

    def _start(self) -> None:
        t0 = time.monotonic()
        subnet = self._free_subnet()
        hosts = list(subnet.hosts())
        manager = str(hosts[0])
        ipam = docker.types.IPAMConfig(
            pool_configs=[docker.types.IPAMPool(subnet=str(subnet), gateway=manager)]
        )
        self.client.networks.create(self.name, driver="bridge", ipam=ipam, labels={NODE_LABEL: "1"})
        self._network = self.name
        # The manager on the nodes' bridge: the workers reach it there (2377 for
        # the control plane, 7946 gossip, 4789/udp VXLAN for the overlays).
        _docker("swarm", "init", "--advertise-addr", manager, "--listen-addr", f"{manager}:2377",
                "--default-addr-pool", ADDR_POOL)  # fmt: skip
        # A swarm left while its ingress network is still being made keeps it
        # (and docker_gwbridge) after `swarm leave`: wait for it first.
        deadline = time.monotonic() + 30
        while "ingress" not in {str(n.name) for n in self.client.networks.list()}:
            if time.monotonic() > deadline:
                raise RuntimeError("the swarm's ingress network did not appear in 30 s")
            time.sleep(0.5)
        if self.manager_site:
            me = self.client.info()["Swarm"]["NodeID"]
            _docker("node", "update", "--label-add", f"sipdrill.site={self.manager_site}", me)
        token = _docker("swarm", "join-token", "-q", "worker")
        for i, site in enumerate(self.sites):
            name = f"{self.name}-{site}"
            self.workers.append(name)
            # The CLI, not the SDK: --security-opt systempaths=unconfined is the
            # CLI's (the API takes empty masked and read-only path lists).
            _docker("run", "-d", "--name", name, "--hostname", name,
                    "--label", f"{NODE_LABEL}=1", "--network", self.name,
                    "--ip", str(hosts[i + 1]), "-v", f"{name}-engine:/var/lib/docker",
                    *NODE_RUN_OPTIONS, NODE_IMAGE)  # fmt: skip
        for name in self.workers:
            self._wait_engine(name)
        self.timings["engines"] = time.monotonic() - t0
        for site, name in zip(self.sites, self.workers, strict=True):
            address = self.client.containers.get(name).attrs["NetworkSettings"]["Networks"][
                self.name
            ]["IPAddress"]
            _docker("swarm", "join", "--token", token, "--advertise-addr", address,
                    "--listen-addr", f"{address}:2377", f"{manager}:2377", node=name)  # fmt: skip
            _docker("node", "update", "--label-add", f"sipdrill.site={site}", name)
        self.timings["joined"] = time.monotonic() - t0
        for name in self.workers:
            self.load_image(name)
        self.timings["image loaded"] = time.monotonic() - t0

    def _wait_engine(self, name: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                _docker("info", "--format", "{{.ServerVersion}}", node=name, timeout=10)
                return
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                if time.monotonic() > deadline:
                    logs = self.client.containers.get(name).logs(tail=20).decode(errors="replace")
                    raise RuntimeError(
                        f"node {name}'s engine did not start: {exc}\n{logs}"
                    ) from None
            time.sleep(0.5)

    def load_image(self, name: str) -> None:
        """The lab image on a worker: ``docker save | docker load``."""
        save = subprocess.Popen(["docker", "save", self.image], stdout=subprocess.PIPE)
        load = subprocess.run(["docker", "exec", "-i", name, "docker", "load"], stdin=save.stdout,
                              capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
        assert save.stdout is not None
        save.stdout.close()
        if save.wait(timeout=60) != 0 or load.returncode != 0:
            raise RuntimeError(f"docker save {self.image} | docker load on {name}: {load.stderr}")

    def exec(self, node: str, *argv: str) -> str:
        """``docker ARGV`` on a worker's engine."""
        return _docker(*argv, node=node)

    def close(self) -> None:
        for name in self.workers:
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                _docker("swarm", "leave", "--force", node=name, timeout=30)
        for name in self.workers:
            with contextlib.suppress(NotFound):
                self.client.containers.get(name).remove(force=True, v=True)
            with contextlib.suppress(NotFound):
                self.client.volumes.get(f"{name}-engine").remove(force=True)
        subprocess.run(["docker", "swarm", "leave", "--force"], capture_output=True, timeout=60,
                       check=False)  # fmt: skip
        # Only what this swarm made: the nodes' bridge, and docker_gwbridge and
        # ingress if they were not there before (other tests' networks made
        # meanwhile are theirs).
        ours = {self.name, "docker_gwbridge", "ingress"} - self._before
        for _ in range(20):
            left = ours & {str(n.name) for n in self.client.networks.list()}
            for name in left:
                with contextlib.suppress(DockerException):
                    self.client.networks.get(name).remove()
            if not ours & {str(n.name) for n in self.client.networks.list()}:
                return
            time.sleep(1)
        raise AssertionError(f"networks left behind: {left}")

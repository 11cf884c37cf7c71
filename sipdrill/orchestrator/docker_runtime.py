"""The Docker engine as the lab's runtime: labelled containers and networks, and
a way into a container's network namespace for the faults in
:mod:`sipdrill.orchestrator.faults`.

Commands in a container's network namespace run one of two ways:

``exec``
    ``docker exec`` as root, with the container's own ``iptables``, ``tc``
    and ``python3``. The container needs ``cap_add: [NET_ADMIN]``: on this
    engine ``docker exec --privileged`` is refused ("unable to apply caps"),
    so an exec can only use the capabilities the container was given.
``nsenter``
    ``nsenter -t <pid> -n`` from the host, with the host's tools. Needs root
    on the Docker host and a local engine, and works for any container,
    whatever its image and capabilities (and also while it is paused).

``auto`` (the default) uses ``exec`` when the container allows it and
``nsenter`` otherwise; a fault that can use neither raises
:class:`~sipdrill.errors.FaultError`.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import docker
from docker.errors import APIError, DockerException, ImageNotFound, NotFound
from docker.models.containers import Container
from docker.models.networks import Network

from sipdrill.errors import FaultError, OperationError, SipdrillError
from sipdrill.orchestrator import labels

RUNTIME = "docker"

NetnsMethod = Literal["auto", "exec", "nsenter"]

#: What a fault may need inside the namespace.
NETWORK_TOOLS: tuple[str, ...] = ("iptables", "ip", "tc")


class DockerUnavailable(SipdrillError):
    """No Docker engine answers (or the SDK cannot reach it)."""


@dataclass(frozen=True)
class Netns:
    """How to run commands in one container's network namespace, as found
    when a fault was injected (``generation`` changes when it restarts, and
    with it the namespace: whatever a fault put there is gone)."""

    container: str  # name
    container_id: str
    method: Literal["exec", "nsenter"]
    pid: int  # the container's main process on the host (nsenter), else 0
    generation: str

    @property
    def python(self) -> str:
        """The Python that runs in this namespace: the container's for exec,
        the orchestrator's own for nsenter."""
        return "python3" if self.method == "exec" else sys.executable


def generation(container: Container) -> str:
    """Changes whenever the container (and so its network namespace) restarts."""
    state = container.attrs.get("State", {})
    return f"{container.id[:12]}@{state.get('StartedAt', '')}"


def ipv4_addresses(container: Container) -> dict[str, str]:
    """Network name -> the container's IPv4 address on it."""
    nets = container.attrs.get("NetworkSettings", {}).get("Networks") or {}
    return {name: data["IPAddress"] for name, data in nets.items() if data.get("IPAddress")}


def proc_start_time(pid: int) -> str | None:
    """Field 22 of /proc/<pid>/stat: with the pid, a host process's identity."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def python_bootstrap(source: str) -> str:
    """A ``python3 -c`` program that runs ``source`` (compressed, so process
    listings stay short)."""
    blob = base64.b64encode(zlib.compress(source.encode(), 9)).decode()
    return f"import base64,zlib;exec(zlib.decompress(base64.b64decode('{blob}')))"


class DockerRuntime:
    """A Docker engine, its lab objects, and the way into their namespaces.

    Owns its SDK client: use it as a context manager or call :meth:`close`.
    """

    name = RUNTIME

    def __init__(
        self,
        client: docker.DockerClient,
        *,
        netns_method: NetnsMethod = "auto",
        owns_client: bool = False,
        exec_timeout: float = 60.0,
    ) -> None:
        self.client = client
        self.netns_method = netns_method
        self.exec_timeout = exec_timeout
        self._owns_client = owns_client
        self._tools_cache: dict[tuple[str, tuple[str, ...]], bool] = {}

    @classmethod
    def from_env(cls, *, netns_method: NetnsMethod = "auto", timeout: int = 120) -> DockerRuntime:
        """Connect the way the ``docker`` CLI does (DOCKER_HOST, the local socket)."""
        try:
            client = docker.from_env(timeout=timeout)
        except DockerException as exc:
            raise DockerUnavailable(f"no Docker engine: {exc}") from exc
        try:
            client.ping()
        except (DockerException, OSError) as exc:
            client.close()
            raise DockerUnavailable(f"the Docker engine does not answer: {exc}") from exc
        return cls(client, netns_method=netns_method, owns_client=True)

    def close(self) -> None:
        if self._owns_client:
            self.client.close()

    def __enter__(self) -> DockerRuntime:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- containers and networks -------------------------------------------

    def find(self, ref: str) -> Container | None:
        """The container named (or with id) ``ref``, fresh from the engine, or None."""
        try:
            return self.client.containers.get(ref)
        except NotFound:
            return None

    def container(self, ref: str, *, fault: str) -> Container:
        found = self.find(ref)
        if found is None:
            raise FaultError(fault, RUNTIME, f"no container {ref!r}")
        return found

    def find_network(self, ref: str) -> Network | None:
        try:
            return self.client.networks.get(ref)
        except NotFound:
            return None

    def network_has_subnet(self, network: Network) -> bool:
        """Whether the network has a user-configured subnet (then a container
        can be connected to it with a fixed address)."""
        config = (network.attrs.get("IPAM") or {}).get("Config") or []
        return any(entry.get("Subnet") for entry in config)

    def wait_for(
        self, ref: str, predicate: str, *, timeout: float = 30.0, fault: str = "wait"
    ) -> Container:
        """Wait until the container's state is ``running``, ``stopped`` (not
        running) or ``paused``."""
        deadline = time.monotonic() + timeout
        while True:
            c = self.container(ref, fault=fault)
            state = c.attrs["State"]
            done = {
                "running": state["Running"] and not state["Paused"],
                "stopped": not state["Running"],
                "paused": state["Paused"],
            }[predicate]
            if done:
                return c
            if time.monotonic() > deadline:
                raise FaultError(
                    fault, RUNTIME, f"{ref} not {predicate} after {timeout:g} s ({state['Status']})"
                )
            time.sleep(0.1)

    # --- network namespaces --------------------------------------------------

    def _has_net_admin(self, c: Container) -> bool:
        host = c.attrs.get("HostConfig", {})
        caps = {str(cap).upper().removeprefix("CAP_") for cap in host.get("CapAdd") or []}
        return bool(host.get("Privileged")) or "NET_ADMIN" in caps or "ALL" in caps

    def _has_tools(self, c: Container, tools: Sequence[str]) -> bool:
        key = (c.id, tuple(tools))
        if key not in self._tools_cache:
            script = " && ".join(f"command -v {shlex.quote(t)} >/dev/null" for t in tools)
            try:
                result = c.exec_run(["sh", "-c", script], user="0")
                self._tools_cache[key] = result.exit_code == 0
            except APIError:
                return False
        return self._tools_cache[key]

    def nsenter_problem(self, tools: Sequence[str] = NETWORK_TOOLS) -> str | None:
        """Why this process cannot use nsenter, or None if it can."""
        if os.geteuid() != 0:
            return "nsenter needs root on the Docker host"
        if not str(self.client.api.base_url).startswith("http+docker://"):
            return "the Docker engine is not local (nsenter needs its host)"
        missing = [t for t in ("nsenter", *tools) if t != "python3" and shutil.which(t) is None]
        if missing:
            return f"the host lacks {', '.join(missing)}"
        return None

    def netns(self, c: Container, *, fault: str, tools: Sequence[str] = NETWORK_TOOLS) -> Netns:
        """The way into a running container's network namespace (see the module doc)."""
        c.reload()
        state = c.attrs["State"]
        if not state["Running"]:
            raise FaultError(
                fault, RUNTIME, f"container {c.name} is not running ({state['Status']})"
            )
        reasons: list[str] = []
        if self.netns_method in ("auto", "exec"):
            if state["Paused"]:
                reasons.append(f"{c.name} is paused (no exec)")
            elif not self._has_net_admin(c):
                reasons.append(f"{c.name} lacks cap_add NET_ADMIN (exec)")
            elif not self._has_tools(c, tools):
                reasons.append(f"{c.name}'s image lacks one of {', '.join(tools)} (exec)")
            else:
                return Netns(c.name, c.id, "exec", 0, generation(c))
        if self.netns_method in ("auto", "nsenter"):
            problem = self.nsenter_problem(tools)
            if problem is None:
                return Netns(c.name, c.id, "nsenter", int(state["Pid"]), generation(c))
            reasons.append(problem)
        raise FaultError(
            fault,
            RUNTIME,
            f"cannot act in {c.name}'s network namespace: {'; '.join(reasons)}. Give the "
            "container cap_add NET_ADMIN and an image with iproute2 and iptables (the "
            "sipdrill image), or run the orchestrator as root on the Docker host",
        )

    def netns_again(self, ref: str, method: str, recorded_generation: str) -> Netns | None:
        """The namespace a fault acted in, if it still exists: None when the
        container is gone, stopped or restarted (and the namespace with it)."""
        c = self.find(ref)
        if c is None or generation(c) != recorded_generation:
            return None
        state = c.attrs["State"]
        if not state["Running"]:
            return None
        if method == "exec" and state["Paused"]:
            # Undo it with nsenter if we can; else after the container is unpaused.
            if self.nsenter_problem() is None:
                return Netns(c.name, c.id, "nsenter", int(state["Pid"]), generation(c))
            raise FaultError(
                "undo", RUNTIME, f"{ref} is paused: unpause it, then undo this fault again"
            )
        return Netns(c.name, c.id, method, int(state["Pid"]), generation(c))  # type: ignore[arg-type]

    def run_sh(self, ns: Netns, script: str) -> tuple[int, str]:
        """Run a shell script as root in the namespace: (exit code, output)."""
        if ns.method == "exec":
            try:
                c = self.client.containers.get(ns.container_id)
                result = c.exec_run(["sh", "-c", script], user="0")
            except APIError as exc:
                return 125, str(exc)
            return int(result.exit_code), bytes(result.output or b"").decode(errors="replace")
        try:
            proc = subprocess.run(
                ["nsenter", "-t", str(ns.pid), "-n", "sh", "-c", script],
                capture_output=True,
                text=True,
                timeout=self.exec_timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            return 124, f"timed out after {exc.timeout} s"
        return proc.returncode, proc.stdout + proc.stderr

    def sh(self, ns: Netns, script: str, *, fault: str) -> str:
        rc, out = self.run_sh(ns, script)
        if rc != 0:
            raise FaultError(fault, RUNTIME, f"in {ns.container} ({ns.method}): {_tail(out)}")
        return out

    def kill_tagged(self, ns_method: str, container: str, pid: int, tag: str) -> None:
        """Stop a helper process started in a container's namespace, if ``pid``
        is still the one with ``tag`` in its command line (pids get reused)."""
        if ns_method == "nsenter":  # a host process: whatever became of the container
            _kill_host_process(pid, tag)
            return
        c = self.find(container)
        if c is None or not c.attrs["State"]["Running"]:
            return  # it died with the container
        script = (
            f"p={pid}; t={shlex.quote(tag)}; "
            'if [ -r /proc/$p/cmdline ] && tr "\\000" " " </proc/$p/cmdline | grep -qF -- "$t"; '
            "then kill -TERM $p; i=0; "
            'while [ $i -lt 50 ] && [ -d /proc/$p ] && ! grep -q "^State:.*Z" /proc/$p/status; '
            "do sleep 0.1; i=$((i+1)); done; "
            "kill -KILL $p 2>/dev/null; fi; true"
        )
        with contextlib.suppress(APIError):
            c.exec_run(["sh", "-c", script], user="0")

    # --- lab objects ---------------------------------------------------------

    def create_network(
        self,
        lab: str,
        name: str,
        subnet: str,
        *,
        internal: bool = False,
        extra_labels: dict[str, str] | None = None,
    ) -> Network:
        """A bridge network with a fixed subnet, labelled for ``lab``. The
        gateway is the subnet's first address."""
        net = ipaddress.IPv4Network(subnet)
        ipam = docker.types.IPAMConfig(
            pool_configs=[
                docker.types.IPAMPool(subnet=str(net), gateway=str(net.network_address + 1))
            ]
        )
        return self.client.networks.create(
            name,
            driver="bridge",
            ipam=ipam,
            internal=internal,
            labels=labels.lab_labels(lab, **(extra_labels or {})),
            check_duplicate=True,
        )

    def run_container(
        self,
        lab: str,
        name: str,
        image: str,
        command: Sequence[str] | str | None = None,
        *,
        network: str | None = None,
        ipv4_address: str | None = None,
        aliases: Sequence[str] = (),
        net_admin: bool = True,
        extra_labels: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> Container:
        """Create and start a labelled container (``init`` on, so it stops at
        once), connected to ``network`` at ``ipv4_address``."""
        networking = None
        if network is not None:
            endpoint = self.client.api.create_endpoint_config(
                ipv4_address=ipv4_address, aliases=list(aliases) or None
            )
            networking = {network: endpoint}
        created = self.client.api.create_container(
            image,
            command=command,
            name=name,
            labels=labels.lab_labels(lab, **(extra_labels or {})),
            host_config=self.client.api.create_host_config(
                init=True,
                cap_add=["NET_ADMIN"] if net_admin else None,
                network_mode=network,
                **kwargs.pop("host_config", {}),
            ),
            networking_config=(
                self.client.api.create_networking_config(networking) if networking else None
            ),
            **kwargs,
        )
        container = self.client.containers.get(created["Id"])
        container.start()
        container.reload()
        return container

    def lab_containers(self, lab: str) -> list[Container]:
        # ignore_removed: a container removed between the list and its inspect
        # (another lab's teardown) is not an error.
        return list(
            self.client.containers.list(
                all=True, filters=labels.lab_filter(lab), ignore_removed=True
            )
        )

    def remove_lab(self, lab: str) -> dict[str, list[str]]:
        """Remove every container, network and volume labelled for ``lab``,
        whatever state it is in. Returns the names removed."""
        removed: dict[str, list[str]] = {"containers": [], "networks": [], "volumes": []}
        for c in self.lab_containers(lab):
            with contextlib.suppress(NotFound):
                c.remove(force=True, v=True)
                removed["containers"].append(c.name)
        for n in self.client.networks.list(filters=labels.lab_filter(lab)):
            with contextlib.suppress(NotFound):
                n.reload()
                for member in n.containers:  # a container of another lab, connected by hand
                    with contextlib.suppress(APIError):
                        n.disconnect(member, force=True)
                n.remove()
                removed["networks"].append(str(n.name))
        for v in self.client.volumes.list(filters=labels.lab_filter(lab)):
            with contextlib.suppress(NotFound):
                v.remove(force=True)
                removed["volumes"].append(str(v.name))
        return removed

    def check_new_lab(
        self, lab: str, image: str, topology_subnets: list[ipaddress.IPv4Network]
    ) -> None:
        """Refuse to start ``lab`` (OperationError) when it already has objects,
        ``image`` is missing, another network overlaps one of the topology's
        subnets, or no Compose CLI is installed."""
        lab_filter = labels.lab_filter(lab)
        if (
            self.lab_containers(lab)
            or self.client.networks.list(filters=lab_filter)
            or self.client.volumes.list(filters=lab_filter)
        ):
            raise OperationError(
                "lab-already-up",
                f"docker lab {lab!r} already has containers, networks or volumes: "
                f"run `sipdrill lab down {lab} --runtime docker` first",
            )
        try:
            self.client.images.get(image)
        except ImageNotFound:
            raise OperationError(
                "no-image", f"no image {image}: run `make image` first", 503
            ) from None
        for net in self.client.networks.list():
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

    def labs(self, prefix: str = "") -> set[str]:
        """The names of the labs that have anything on this engine."""
        found: set[str] = set()
        sources: Iterable[Any] = (
            *self.client.containers.list(
                all=True, filters={"label": labels.LAB}, ignore_removed=True
            ),
            *self.client.networks.list(filters={"label": labels.LAB}),
            *self.client.volumes.list(filters={"label": labels.LAB}),
        )
        for obj in sources:
            attrs = obj.attrs
            lab_labels = attrs.get("Labels") or attrs.get("Config", {}).get("Labels") or {}
            name = lab_labels.get(labels.LAB)
            if name and name.startswith(prefix):
                found.add(name)
        return found


def compose_command() -> list[str] | None:
    """The Compose CLI of this machine: ``docker compose`` (the v2 plugin) if
    it answers, else the v1 ``docker-compose`` tool, else None."""
    docker_cli = shutil.which("docker")
    if docker_cli is not None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            probe = subprocess.run(
                [docker_cli, "compose", "version"], capture_output=True, timeout=30, check=False
            )
            if probe.returncode == 0:
                return [docker_cli, "compose"]
    v1 = shutil.which("docker-compose")
    return [v1] if v1 is not None else None


def _kill_host_process(pid: int, tag: str, grace: float = 5.0) -> None:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return
    if tag.encode() not in cmdline:
        return  # not ours any more
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return
        if "\nState:\tZ" in status:
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _tail(text: str, limit: int = 800) -> str:
    text = text.strip()
    return text if len(text) <= limit else "..." + text[-limit:]

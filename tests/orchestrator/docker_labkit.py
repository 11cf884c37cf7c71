"""Throwaway Docker labs for tests: labelled containers of the sipdrill image on
a bridge network with a fixed subnet, an echo server in each, and a probe that
runs inside one container against another.

Everything a :class:`ProbeLab` creates carries ``sipdrill.lab=<its name>`` and
is removed on exit, whatever happened inside the ``with`` block.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import docker
import pytest
from docker.errors import APIError, DockerException, ImageNotFound

from sipdrill.orchestrator.docker_runtime import DockerRuntime, compose_command

IMAGE = os.environ.get("SIPDRILL_IMAGE", "sipdrill:latest")
#: Lab names of tests start with this (a failing test's leftovers are easy to find).
LAB_PREFIX = os.environ.get("SIPDRILL_TEST_LAB_PREFIX", "test-")
REPO = Path(__file__).resolve().parents[2]
ECHO_PORT = 9000

#: UDP and TCP echo on ECHO_PORT: the main process of every test container.
ECHO_SERVER = f"""
import socket, threading
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind(("0.0.0.0", {ECHO_PORT}))
tcp = socket.socket()
tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
tcp.bind(("0.0.0.0", {ECHO_PORT}))
tcp.listen(64)
def serve(conn):
    with conn:
        while True:
            data = conn.recv(4096)
            if not data:
                return
            conn.sendall(data)
def accept():
    while True:
        conn, _ = tcp.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()
threading.Thread(target=accept, daemon=True).start()
while True:
    data, peer = udp.recvfrom(4096)
    udp.sendto(data, peer)
"""

#: Run in the source container: argv = dst, port, udp count, timeout, tcp (0/1).
PROBE = """
import json, socket, sys, time
dst, port, count, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
do_tcp = sys.argv[5] == "1"
out = {"udp_sent": 0, "udp_ok": 0, "udp_error": None, "rtt_ms": [], "tcp": None}
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(timeout)
for i in range(count):
    payload = b"probe-%d" % i
    t0 = time.monotonic()
    try:
        s.sendto(payload, (dst, port))
        out["udp_sent"] += 1
    except OSError as exc:
        out["udp_error"] = exc.__class__.__name__ + ":" + str(exc.errno)
        continue
    deadline = t0 + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        s.settimeout(left)
        try:
            data, _ = s.recvfrom(4096)
        except socket.timeout:
            break
        except OSError as exc:
            out["udp_error"] = exc.__class__.__name__ + ":" + str(exc.errno)
            break
        if data == payload:
            out["udp_ok"] += 1
            out["rtt_ms"].append((time.monotonic() - t0) * 1000)
            break
if do_tcp:
    t = socket.socket()
    t.settimeout(timeout)
    try:
        t.connect((dst, port))
    except socket.timeout:
        out["tcp"] = "timeout"
    except ConnectionRefusedError:
        out["tcp"] = "refused"
    except OSError as exc:
        out["tcp"] = "error:" + str(exc.errno)
    else:
        try:
            t.sendall(b"ping")
            out["tcp"] = "ok" if t.recv(16) == b"ping" else "bad-echo"
        except socket.timeout:
            out["tcp"] = "no-echo"
        except OSError as exc:
            out["tcp"] = "error:" + str(exc.errno)
    t.close()
print(json.dumps(out))
"""


def docker_problem(image: str = IMAGE) -> str | None:
    """Why Docker tests cannot run here, or None."""
    try:
        client = docker.from_env(timeout=30)
    except DockerException as exc:
        return f"no Docker engine ({exc})"
    try:
        client.ping()
        client.images.get(image)
    except ImageNotFound:
        return f"no image {image}: run `make image` (scripts/build-image.sh) first"
    except (DockerException, OSError) as exc:
        return f"the Docker engine does not answer ({exc})"
    finally:
        client.close()
    return None


def build_image() -> None:
    subprocess.run(["bash", str(REPO / "scripts" / "build-image.sh")], check=True, cwd=REPO)


#: SIPDRILL_REQUIRE_DOCKER=1 (CI): a docker test that cannot run fails, never skips.
REQUIRED = os.environ.get("SIPDRILL_REQUIRE_DOCKER") == "1"


def lab_problem(*, compose: bool) -> str | None:
    """Why a docker test module cannot run here, or None: no engine, no image
    (built first when SIPDRILL_BUILD_IMAGE=1) or, with ``compose``, no Compose CLI."""
    problem = docker_problem()
    if problem and "no image" in problem and os.environ.get("SIPDRILL_BUILD_IMAGE") == "1":
        build_image()
        problem = docker_problem()
    if problem is None and compose and compose_command() is None:
        problem = "no Compose CLI (docker compose or docker-compose)"
    return problem


def docker_marks(problem: str | None, *, slow: bool) -> list[pytest.MarkDecorator]:
    """A docker test module's ``pytestmark``: skipped for ``problem`` unless REQUIRED."""
    marks = [pytest.mark.docker, *([pytest.mark.slow] if slow else [])]
    return [*marks, pytest.mark.skipif(bool(problem) and not REQUIRED,
                                       reason=f"docker tests: {problem}")]


@dataclass
class Probe:
    udp_sent: int
    udp_ok: int
    udp_error: str | None
    rtt_ms: list[float]
    tcp: str | None

    @property
    def reachable(self) -> bool:
        return self.udp_ok == self.udp_sent > 0 and self.tcp in (None, "ok")


class ProbeLab:
    """A labelled network and echo containers; removed on exit.

    ``members`` maps a short name to whether the container gets NET_ADMIN.
    Containers are named ``<lab>-<short>``; their addresses are ``ip[short]``.
    """

    def __init__(
        self,
        members: dict[str, bool],
        *,
        name: str | None = None,
        image: str = IMAGE,
    ) -> None:
        self.name = name or f"{LAB_PREFIX}{secrets.token_hex(3)}"
        self.members = members
        self.image = image
        self.runtime = DockerRuntime.from_env()
        self.network = f"{self.name}-net"
        self.subnet = ""
        self.ip: dict[str, str] = {}

    def container(self, short: str) -> str:
        return f"{self.name}-{short}"

    def __enter__(self) -> ProbeLab:
        try:
            self._create_network()
            net = ipaddress.IPv4Network(self.subnet)
            for i, (short, net_admin) in enumerate(self.members.items()):
                ip = str(net.network_address + 10 + i)
                self.runtime.run_container(
                    self.name,
                    self.container(short),
                    self.image,
                    ["-c", ECHO_SERVER],
                    entrypoint=["python3"],
                    network=self.network,
                    ipv4_address=ip,
                    aliases=[short],
                    net_admin=net_admin,
                    extra_labels={"purpose": "test"},
                )
                self.ip[short] = ip
            for short in self.members:
                self.wait_echo(short)
        except BaseException:
            self.close()
            raise
        return self

    def _create_network(self) -> None:
        last: Exception | None = None
        for _ in range(30):
            subnet = f"10.213.{random.randint(8, 250)}.0/24"
            try:
                self.runtime.create_network(self.name, self.network, subnet)
            except APIError as exc:  # overlaps a network of another test or lab
                last = exc
                continue
            self.subnet = subnet
            return
        raise RuntimeError(f"no free test subnet: {last}")

    def wait_echo(self, short: str, timeout: float = 20.0) -> None:
        """Until ``short``'s echo server answers on its own address."""
        c = self.runtime.client.containers.get(self.container(short))
        script = (
            "import socket,sys,time\n"
            f"end=time.monotonic()+{timeout}\n"
            "while time.monotonic()<end:\n"
            "    s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.settimeout(0.2)\n"
            "    try:\n"
            f"        s.sendto(b'x',('127.0.0.1',{ECHO_PORT}));s.recvfrom(10);sys.exit(0)\n"
            "    except OSError: time.sleep(0.1)\n"
            "sys.exit(1)\n"
        )
        result = c.exec_run(["python3", "-c", script])
        if result.exit_code != 0:
            raise RuntimeError(f"{c.name}: echo server not up: {c.logs(tail=20)!r}")

    def probe(
        self,
        src: str,
        dst: str,
        *,
        count: int = 2,
        timeout: float = 0.6,
        tcp: bool = True,
        dst_ip: str | None = None,
    ) -> Probe:
        """From container ``src`` to ``dst``'s address: UDP echoes, then a TCP echo."""
        c = self.runtime.client.containers.get(self.container(src))
        target = dst_ip or self.ip[dst]
        argv = [target, str(ECHO_PORT), str(count), str(timeout), "1" if tcp else "0"]
        result = c.exec_run(["python3", "-c", PROBE, *argv])
        text = bytes(result.output).decode(errors="replace")
        if result.exit_code != 0:
            raise RuntimeError(f"probe {src}->{dst} failed: {text}")
        data: dict[str, Any] = json.loads(text.strip().splitlines()[-1])
        return Probe(**data)

    def sh(self, short: str, script: str) -> str:
        """Run a root shell in ``short``'s network namespace: docker exec if it
        has NET_ADMIN, else nsenter from the host (to inspect, not to change)."""
        c = self.runtime.client.containers.get(self.container(short))
        if self.members[short]:
            result = c.exec_run(["sh", "-c", script], user="0")
            text = bytes(result.output).decode(errors="replace")
            if result.exit_code != 0:
                raise RuntimeError(f"{c.name}: {script!r} failed: {text}")
            return text
        pid = c.attrs["State"]["Pid"]
        proc = subprocess.run(
            ["nsenter", "-t", str(pid), "-n", "sh", "-c", script],
            capture_output=True,
            text=True,
            check=True,
        )
        return proc.stdout

    def leftovers(self, short: str) -> str:
        """Whatever a fault may have left in ``short``'s namespace (empty: nothing)."""
        out = self.sh(short, "iptables -S; tc qdisc show")
        keep = [
            line
            for line in out.splitlines()
            if "sipdrill-" in line or ("qdisc" in line and not line.startswith("qdisc noqueue"))
        ]
        return "\n".join(keep)

    def close(self) -> None:
        try:
            self.runtime.remove_lab(self.name)
        finally:
            self.runtime.close()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def leftovers_of(prefix: str) -> set[str]:
    """Labs whose name starts with ``prefix`` that still have anything on the engine."""
    with DockerRuntime.from_env() as rt:
        return rt.labs(prefix)

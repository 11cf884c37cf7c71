"""Every docker fault kind, for real: injected into throwaway containers of the
sipdrill image, observed from another container, undone, and observed gone.

Needs a Docker engine and the image (`make image`); skipped otherwise, unless
SIPDRILL_REQUIRE_DOCKER=1 (CI), which turns the skip into a failure.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from docker_labkit import (
    IMAGE,
    LAB_PREFIX,
    REQUIRED,
    ProbeLab,
    docker_marks,
    lab_problem,
    leftovers_of,
)

from sipdrill.errors import FaultError
from sipdrill.orchestrator.docker_runtime import DockerRuntime, compose_command
from sipdrill.orchestrator.faults import (
    Crash,
    Cut,
    Degrade,
    Disconnect,
    DockerFaultRegistry,
    FaultJournal,
    Partition,
    Pause,
    Restart,
    Stop,
    heal_journal,
)

_PROBLEM = lab_problem(compose=False)
_REQUIRED = REQUIRED

pytestmark = docker_marks(_PROBLEM, slow=False)
needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="nsenter into a container's namespace needs root on the Docker host"
)


@pytest.fixture(scope="module")
def lab() -> Iterator[ProbeLab]:
    """a and b have NET_ADMIN (faults use docker exec), c has not (nsenter)."""
    if _PROBLEM:
        pytest.fail(f"SIPDRILL_REQUIRE_DOCKER=1 but {_PROBLEM}")
    with ProbeLab({"a": True, "b": True, "c": False}) as probe_lab:
        yield probe_lab
    assert leftovers_of(probe_lab.name) == set()


@pytest.fixture
def faults(lab: ProbeLab, tmp_path: Path) -> Iterator[DockerFaultRegistry]:
    registry = DockerFaultRegistry(lab.runtime, tmp_path / "faults.json")
    yield registry
    assert registry.heal() == []
    assert FaultJournal(tmp_path / "faults.json").records() == []
    for short in lab.members:  # the next test starts from a clean lab
        lab.runtime.wait_for(lab.container(short), "running")
        assert lab.leftovers(short) == ""


def _helper_running(lab: ProbeLab, short: str, tag: str) -> bool:
    # The bracket keeps this shell's own command line from matching.
    pattern = f"{tag[:-1]}[{tag[-1]}]"
    out = lab.sh(short, f"grep -l -e '{pattern}' /proc/[0-9]*/cmdline 2>/dev/null || true")
    return bool(out.strip())


def _host_process_has(pid: int, tag: str) -> bool:
    try:
        return tag.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def test_the_image_runs_sipdrill_and_has_the_fault_tools(lab: ProbeLab) -> None:
    image = lab.runtime.client.images.get(IMAGE)
    assert image.attrs["Config"]["Entrypoint"] == ["sipdrill"]
    c = lab.runtime.client.containers.get(lab.container("a"))
    script = (
        "sipdrill --version && command -v iptables && command -v tc && command -v ip "
        "&& python3 -c 'import sys; print(sys.version_info[:2])'"
    )
    result = c.exec_run(["sh", "-c", script])
    out = result.output.decode()
    assert result.exit_code == 0, out
    assert "sipdrill " in out
    assert "(3, 11)" in out
    # Its processes run unprivileged by default, and nothing set-uid in it
    # hands a process root (and the container's NET_ADMIN) back.
    assert image.attrs["Config"]["User"] == "sipdrill"
    assert c.exec_run(["id", "-u"]).output.decode().split() == ["10001"]
    result = c.exec_run(["find", "/", "-xdev", "-type", "f", "-perm", "/6000"], user="0")
    assert result.exit_code == 0 and result.output == b"", result.output


def test_a_compose_cli_is_found_v2_plugin_or_v1_tool() -> None:
    command = compose_command()
    assert command is not None
    assert command[-1] == "compose" or command[-1].endswith("docker-compose")
    version = subprocess.run([*command, "version"], capture_output=True, text=True, check=True)
    assert (
        "ompose" in version.stdout
    )  # "Docker Compose version v2..." or "docker-compose version 1..."


def test_every_container_reaches_every_other_before_any_fault(lab: ProbeLab) -> None:
    for src in lab.members:
        for dst in lab.members:
            if src != dst:
                assert lab.probe(src, dst).reachable, (src, dst)


@pytest.mark.parametrize(
    ("target", "method"), [("b", "exec"), pytest.param("c", "nsenter", marks=needs_root)]
)
def test_cut_drops_silently_both_ways_and_undo_restores(
    lab: ProbeLab, faults: DockerFaultRegistry, target: str, method: str
) -> None:
    name = lab.container(target)
    cut = faults.inject(Cut(lab.runtime, [name]))
    assert cut.state["targets"][name]["method"] == method
    assert [r["id"] for r in faults.journal.records()] == [cut.id]  # type: ignore[union-attr]

    towards = lab.probe("a", target)
    assert (towards.udp_sent, towards.udp_ok, towards.udp_error) == (2, 0, None)
    assert towards.tcp == "timeout"  # silent: no RST, no ICMP
    away = lab.probe(target, "a")
    # The cut container's own senders are not told either (a tc drop, not EPERM).
    assert (away.udp_sent, away.udp_ok, away.udp_error) == (2, 0, None)
    assert away.tcp == "timeout"
    bystander = "c" if target == "b" else "b"
    assert lab.probe("a", bystander).reachable

    cut.undo()
    cut.undo()  # idempotent
    assert lab.probe("a", target).reachable
    assert lab.probe(target, "a").reachable
    assert lab.leftovers(target) == ""
    assert faults.journal.records() == []  # type: ignore[union-attr]


def test_cut_with_iptables_egress_tells_the_cut_container_eperm(
    lab: ProbeLab, faults: DockerFaultRegistry
) -> None:
    cut = faults.inject(Cut(lab.runtime, [lab.container("b")], egress="iptables"))
    away = lab.probe("b", "a", tcp=False)
    assert away.udp_error == "PermissionError:1"
    assert lab.probe("a", "b", tcp=False).udp_ok == 0
    cut.undo()
    assert lab.probe("b", "a").reachable


def test_partition_separates_two_groups_that_both_stay_up(
    lab: ProbeLab, faults: DockerFaultRegistry
) -> None:
    a, b = lab.container("a"), lab.container("b")
    part = faults.inject(Partition(lab.runtime, [a], [b]))
    assert part.state["addresses"] == {"a": [f"{lab.ip['a']}/32"], "b": [f"{lab.ip['b']}/32"]}
    for src, dst in (("a", "b"), ("b", "a")):
        p = lab.probe(src, dst)
        assert (p.udp_ok, p.udp_error, p.tcp) == (0, None, "timeout"), (src, dst)
    for src, dst in (("a", "c"), ("b", "c"), ("c", "a"), ("c", "b")):
        assert lab.probe(src, dst).reachable, (src, dst)
    part.undo()
    assert lab.probe("a", "b").reachable
    assert lab.probe("b", "a").reachable


def test_degrade_adds_latency_and_jitter_then_goes(
    lab: ProbeLab, faults: DockerFaultRegistry
) -> None:
    name = lab.container("b")
    assert max(lab.probe("a", "b", count=3, tcp=False).rtt_ms) < 50
    slow = faults.inject(Degrade(lab.runtime, [name], delay_ms=150, jitter_ms=30, seed=1))
    assert _helper_running(lab, "b", slow.tag)  # type: ignore[attr-defined]
    p = lab.probe("a", "b", count=8, timeout=2.0, tcp=False)
    assert p.udp_ok == 8
    assert all(110 <= rtt <= 400 for rtt in p.rtt_ms), p.rtt_ms
    assert max(p.rtt_ms) - min(p.rtt_ms) > 5, p.rtt_ms  # jitter
    assert lab.probe("a", "b", count=1, timeout=3.0).tcp == "ok"  # delayed, not broken

    slow.undo()
    assert max(lab.probe("a", "b", count=3, tcp=False).rtt_ms) < 50
    assert not _helper_running(lab, "b", slow.tag)  # type: ignore[attr-defined]


@needs_root
def test_degrade_from_the_host_for_a_container_without_net_admin(
    lab: ProbeLab, faults: DockerFaultRegistry
) -> None:
    name = lab.container("c")
    slow = faults.inject(Degrade(lab.runtime, [name], delay_ms=100))
    record = slow.state["targets"][name]
    assert record["method"] == "nsenter"
    pid = record["helper_pid"]
    assert _host_process_has(pid, record["helper_tag"])
    assert min(lab.probe("a", "c", count=3, timeout=2.0, tcp=False).rtt_ms) >= 90
    slow.undo()
    assert not _host_process_has(pid, record["helper_tag"])
    assert max(lab.probe("a", "c", count=3, tcp=False).rtt_ms) < 50


def test_degrade_loss_drops_silently(lab: ProbeLab, faults: DockerFaultRegistry) -> None:
    name = lab.container("b")
    lossy = faults.inject(Degrade(lab.runtime, [name], loss_percent=100))
    assert lab.probe("a", "b", count=3, tcp=False).udp_ok == 0  # the replies are lost
    away = lab.probe("b", "a", count=2, tcp=False)
    assert (away.udp_ok, away.udp_error) == (0, None)  # the sender is not told
    lossy.undo()
    assert lab.probe("a", "b").reachable

    half = faults.inject(Degrade(lab.runtime, [name], loss_percent=50, seed=7))
    p = lab.probe("a", "b", count=20, timeout=0.3, tcp=False)
    assert 3 <= p.udp_ok <= 17, p
    half.undo()
    assert lab.probe("a", "b", count=5, timeout=0.3, tcp=False).udp_ok == 5


def test_a_second_degrade_is_refused_and_the_first_stays(
    lab: ProbeLab, faults: DockerFaultRegistry
) -> None:
    name = lab.container("b")
    first = faults.inject(Degrade(lab.runtime, [name], delay_ms=100))
    second = Degrade(lab.runtime, [name], delay_ms=10)
    with pytest.raises(FaultError, match="already degraded"):
        faults.inject(second)
    assert second.status == "undone"
    assert [r["id"] for r in faults.journal.records()] == [first.id]  # type: ignore[union-attr]
    assert min(lab.probe("a", "b", count=2, timeout=2.0, tcp=False).rtt_ms) >= 90
    first.undo()


def test_degrade_with_netem_works_or_says_the_kernel_lacks_it(
    lab: ProbeLab, faults: DockerFaultRegistry
) -> None:
    fault = Degrade(lab.runtime, [lab.container("b")], delay_ms=100, method="netem")
    try:
        faults.inject(fault)
    except FaultError as exc:  # this machine's kernel: no sch_netem
        assert exc.runtime == "docker"
        assert "netem" in exc.message
        assert fault.status == "undone"
        assert lab.leftovers("b") == ""
        return
    assert min(lab.probe("a", "b", count=2, timeout=2.0, tcp=False).rtt_ms) >= 90
    fault.undo()
    assert max(lab.probe("a", "b", count=2, tcp=False).rtt_ms) < 50


def test_disconnect_then_reconnect_with_the_same_address_and_alias(
    lab: ProbeLab, faults: DockerFaultRegistry
) -> None:
    name = lab.container("b")
    gone = faults.inject(Disconnect(lab.runtime, [name], network=lab.network))
    c = lab.runtime.client.containers.get(name)
    assert lab.network not in c.attrs["NetworkSettings"]["Networks"]
    p = lab.probe("a", "b")
    assert p.udp_ok == 0
    assert p.tcp in ("timeout", "error:113")  # 113: EHOSTUNREACH once ARP gives up
    gone.undo()
    gone.undo()
    c.reload()
    endpoint = c.attrs["NetworkSettings"]["Networks"][lab.network]
    assert endpoint["IPAddress"] == lab.ip["b"]
    assert "b" in endpoint["Aliases"]
    assert lab.probe("a", "b").reachable
    assert lab.probe("b", "a").reachable


def test_pause_freezes_the_container_but_the_kernel_still_accepts(
    lab: ProbeLab, faults: DockerFaultRegistry
) -> None:
    name = lab.container("b")
    frozen = faults.inject(Pause(lab.runtime, [name]))
    assert lab.runtime.client.containers.get(name).attrs["State"]["Paused"]
    p = lab.probe("a", "b")
    assert p.udp_ok == 0
    assert p.tcp == "no-echo"  # the handshake completes, nobody answers
    frozen.undo()
    frozen.undo()
    assert lab.probe("a", "b").reachable


@pytest.mark.parametrize("kind", [Crash, Stop])
def test_crash_and_stop_are_undone_by_starting_again(
    lab: ProbeLab, faults: DockerFaultRegistry, kind: type[Crash] | type[Stop]
) -> None:
    name = lab.container("b")
    down = faults.inject(kind(lab.runtime, [name]))
    assert not lab.runtime.client.containers.get(name).attrs["State"]["Running"]
    p = lab.probe("a", "b")
    assert p.udp_ok == 0
    assert p.tcp in ("timeout", "error:113")
    down.undo()
    lab.wait_echo("b")
    assert lab.probe("a", "b").reachable


def test_a_restart_takes_network_faults_with_the_old_namespace(
    lab: ProbeLab, faults: DockerFaultRegistry
) -> None:
    name = lab.container("b")
    cut = faults.inject(Cut(lab.runtime, [name]))
    assert lab.probe("a", "b", tcp=False).udp_ok == 0
    faults.inject(Restart(lab.runtime, [name], timeout=5))
    lab.wait_echo("b")
    assert lab.probe("a", "b").reachable
    cut.undo()  # nothing left to undo, and no error
    assert cut.status == "undone"


def test_what_the_runtime_cannot_do_raises_fault_error(
    lab: ProbeLab, faults: DockerFaultRegistry
) -> None:
    with pytest.raises(FaultError) as info:
        faults.create("dns-outage", [lab.container("b")])
    assert (info.value.fault, info.value.runtime) == ("dns-outage", "docker")
    with pytest.raises(FaultError, match="no container"):
        faults.inject(Cut(lab.runtime, ["sipdrill-no-such-container"]))
    exec_only = DockerRuntime(lab.runtime.client, netns_method="exec")
    with pytest.raises(FaultError, match="NET_ADMIN"):
        Cut(exec_only, [lab.container("c")]).inject()

    crash = faults.inject(Crash(lab.runtime, [lab.container("b")]))
    with pytest.raises(FaultError, match="not running"):
        faults.inject(Cut(lab.runtime, [lab.container("b")]))
    crash.undo()
    lab.wait_echo("b")
    assert faults.journal.records() == []  # type: ignore[union-attr]


def test_a_crashed_orchestrator_is_healed_from_its_journal(lab: ProbeLab, tmp_path: Path) -> None:
    journal = tmp_path / "faults.json"
    a, b, c = (lab.container(s) for s in "abc")
    degraded = c if os.geteuid() == 0 else a
    program = textwrap.dedent(
        f"""
        import os
        from sipdrill.orchestrator.docker_runtime import DockerRuntime, compose_command
        from sipdrill.orchestrator.faults import Cut, Degrade, DockerFaultRegistry, Pause
        rt = DockerRuntime.from_env()
        registry = DockerFaultRegistry(rt, {str(journal)!r})
        registry.inject(Cut(rt, [{b!r}]))
        registry.inject(Degrade(rt, [{degraded!r}], delay_ms=200))
        registry.inject(Pause(rt, [{a!r}]))
        os._exit(0)  # a crash: nothing undone, nothing closed
        """
    )
    subprocess.run([sys.executable, "-c", program], check=True, timeout=120)
    records = FaultJournal(journal).records()
    assert [r["kind"] for r in records] == ["cut", "degrade", "pause"]
    assert all(r["status"] == "active" for r in records)
    helper = records[1]["state"]["targets"][degraded]
    assert lab.probe("c", "b", tcp=False).udp_ok == 0

    assert heal_journal(journal, lab.runtime) == []
    assert FaultJournal(journal).records() == []
    assert not lab.runtime.client.containers.get(a).attrs["State"]["Paused"]
    if helper["method"] == "nsenter":
        assert not _host_process_has(helper["helper_pid"], helper["helper_tag"])
    for src, dst in (("a", "b"), ("b", "c"), ("c", "a")):
        assert lab.probe(src, dst).reachable, (src, dst)
    assert max(lab.probe("b", "c", count=2, tcp=False).rtt_ms) < 50
    for short in "abc":
        assert lab.leftovers(short) == ""
    assert heal_journal(journal, lab.runtime) == []  # again: nothing to do


def test_a_lab_is_removed_when_the_block_raises() -> None:
    name = f"{LAB_PREFIX}raise-{secrets.token_hex(3)}"
    with pytest.raises(RuntimeError, match="on purpose"), ProbeLab({"x": True}, name=name):
        assert leftovers_of(name) == {name}
        raise RuntimeError("on purpose")
    assert leftovers_of(name) == set()


INNER_TEST = """
import pytest
from docker_labkit import ProbeLab
from sipdrill.orchestrator.faults import Cut, DockerFaultRegistry


@pytest.fixture
def lab():
    with ProbeLab({"x": True, "y": False}) as lab:
        yield lab


def test_fails_on_purpose(lab, tmp_path):
    registry = DockerFaultRegistry(lab.runtime, tmp_path / "faults.json")
    registry.inject(Cut(lab.runtime, [lab.container("x")]))
    assert lab.runtime.labs(lab.name) == {lab.name}
    print("made", lab.name)
    assert False, "this test fails on purpose"
"""


def test_a_failing_test_leaves_no_container_or_network(tmp_path: Path) -> None:
    prefix = f"{LAB_PREFIX}inner-{secrets.token_hex(3)}-"
    test_file = tmp_path / "test_fails_on_purpose.py"
    test_file.write_text(INNER_TEST)
    path = [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "SIPDRILL_TEST_LAB_PREFIX": prefix, "PYTHONPATH": os.pathsep.join(path)}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", str(test_file)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "1 failed" in proc.stdout
    assert f"made {prefix}" in proc.stdout  # it did create a lab before failing
    assert leftovers_of(prefix) == set()


def test_a_disconnect_gives_back_only_the_addresses_the_container_was_given(
    tmp_path: Path,
) -> None:
    """Found by `sipdrill chaos run` (seed 8, docker): a lab service is on its
    own network at a fixed address and on the others at addresses Docker chose.
    Reconnecting with the chosen ones pinned made them the container's for
    good: after a crash, another container got one of them, and the service
    never started again ("Address already in use")."""
    import docker as docker_sdk

    if _PROBLEM:
        pytest.fail(f"SIPDRILL_REQUIRE_DOCKER=1 but {_PROBLEM}")
    name = f"{LAB_PREFIX}pin-{secrets.token_hex(3)}"
    labels = {"sipdrill.lab": name}
    with DockerRuntime.from_env() as rt:
        client = rt.client

        def network(n: str, subnet: str) -> Any:
            pool = docker_sdk.types.IPAMPool(subnet=subnet)
            ipam = docker_sdk.types.IPAMConfig(pool_configs=[pool])
            return client.networks.create(f"{name}-{n}", driver="bridge", labels=labels, ipam=ipam)

        def container(short: str, net: str, ip: str | None = None) -> Any:
            config = {net: client.api.create_endpoint_config(ipv4_address=ip)} if ip else None
            c = client.containers.create(
                IMAGE, ["sleep", "600"], entrypoint=[], name=f"{name}-{short}", labels=labels,
                network=net, networking_config=config,
            )  # fmt: skip
            return c

        try:
            x = 150 + secrets.randbelow(40)
            home, other = network("home", f"10.{x}.71.0/24"), network("other", f"10.{x}.72.0/24")
            a = container("a", home.name, f"10.{x}.71.11")
            other.connect(a)
            a.start()
            registry = DockerFaultRegistry(rt, tmp_path / "faults.json")
            registry.undo(registry.inject(Disconnect(rt, [a.name])))
            a.reload()
            nets = a.attrs["NetworkSettings"]["Networks"]
            assert nets[home.name]["IPAddress"] == f"10.{x}.71.11"
            assert not (nets[other.name].get("IPAMConfig") or {}).get("IPv4Address")
            freed = nets[other.name]["IPAddress"]
            crash = registry.inject(Crash(rt, [a.name]))
            b = container("b", other.name)  # takes the address a had there
            b.start()
            b.reload()
            assert b.attrs["NetworkSettings"]["Networks"][other.name]["IPAddress"] == freed
            crash.undo()  # starts a again
            a.reload()
            assert a.attrs["State"]["Running"]
            assert a.attrs["NetworkSettings"]["Networks"][home.name]["IPAddress"] == f"10.{x}.71.11"
        finally:
            rt.remove_lab(name)
    assert leftovers_of(name) == set()

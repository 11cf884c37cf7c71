"""Faults for the docker runtime, each with ``inject()`` and an idempotent
``undo()`` (the discipline of :class:`~sipdrill.orchestrator.fault_model.Fault`),
and a journal so that an interrupted drill can still heal them.

Kinds (the names of the drill file's ``fault: {kind: ...}``):

==============  =============================================================
``cut``         silent drop: iptables DROP on the way in, and a tc drop on
                the way out (an iptables DROP on output would tell the cut
                container's own senders EPERM; a qdisc drop is silent both
                ways). Peers see timeouts; ARP still answers.
``disconnect``  ``docker network disconnect``; undo reconnects with the same
                address and aliases. Peers see "host unreachable" once ARP fails.
``partition``   two groups of containers lose each other (every address of
                each on every network) while both stay up; rules on both sides.
``degrade``     latency, jitter and loss on the way out. This kernel has no
                ``sch_netem``, so by default (``method="nfqueue"``) packets go
                to an NFQUEUE served by :mod:`nfq_delay` in the namespace;
                ``method="netem"`` uses netem where the kernel has it.
``crash``       ``docker kill`` (SIGKILL); undo starts the container.
``stop``        ``docker stop``; undo starts it.
``pause``       ``docker pause`` (cgroup freezer: the kernel still accepts
                connections, nobody answers); undo unpauses.
``restart``     ``docker restart``; nothing to undo (undo starts it if it
                did not come back).
``dns-outage``  the lab's DNS server drops queries or answers SERVFAIL,
                through its control API (not in :data:`FAULT_KINDS`: it
                needs the lab's DNS server, :data:`LAB_FAULT_KINDS` has it).
==============  =============================================================

Every fault takes a list of container names, so a site fault is one fault.
A fault that cannot be done raises :class:`~sipdrill.errors.FaultError`; an
inject that fails half-way undoes what it did before raising.

Use a :class:`DockerFaultRegistry`: it writes each fault to a JSON journal
*before* the fault takes effect (and again as it records what to undo), so
that ``DockerFaultRegistry(runtime, path).heal()`` in a new process heals
everything a crashed one left (``sipdrill lab down`` does this).
"""

from __future__ import annotations

import shlex
import subprocess
from abc import abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
from docker.errors import DockerException

from sipdrill.errors import FaultError
from sipdrill.orchestrator import labels
from sipdrill.orchestrator.docker_runtime import (
    NETWORK_TOOLS,
    RUNTIME,
    DockerRuntime,
    Netns,
    generation,
    ipv4_addresses,
    proc_start_time,
    python_bootstrap,
)
from sipdrill.orchestrator.fault_model import (
    Fault,
    FaultJournal,
    FaultKind,
    FaultRegistry,
    check_dns_outage_mode,
    journal_path,
)

__all__ = [
    "FAULT_KINDS",
    "LAB_FAULT_KINDS",
    "Crash",
    "Cut",
    "Degrade",
    "Disconnect",
    "DnsOutage",
    "DockerFault",
    "DockerFaultRegistry",
    "FaultJournal",
    "Partition",
    "Pause",
    "Restart",
    "Stop",
    "heal_journal",
    "journal_path",
]

IPT = "iptables -w 5"
#: Our root qdisc on a container's interfaces: class 1 drops, class 2 passes.
TC_ROOT = "5d1:"
TC_NETEM = "5d3:"
_DEVICES = "ip -o link show | sed -n 's/^[0-9]*: \\([^:@]*\\).*/\\1/p'"


def _chain(fault_id: str, suffix: str) -> str:
    return f"{labels.FAULT_PREFIX}{fault_id}-{suffix}"


def _add_chain(chain: str, hook: str, rules: Sequence[str], *, first: bool = True) -> list[str]:
    position = f"-I {hook} 1" if first else f"-A {hook}"
    return [
        f"{IPT} -N {chain}",
        *(f"{IPT} -A {chain} {rule}" for rule in rules),
        f"{IPT} {position} -j {chain}",
    ]


def _del_chain(chain: str, hook: str) -> str:
    return (
        f"while {IPT} -D {hook} -j {chain} 2>/dev/null; do :; done; "
        f"{IPT} -F {chain} 2>/dev/null; {IPT} -X {chain} 2>/dev/null; true"
    )


def _tc_drop(matches: Sequence[str]) -> list[str]:
    """Drop IPv4 leaving by every interface but lo that matches one of the u32
    ``matches``; prints ``tc <dev> <prio>`` before it adds the filters."""
    add = f'tc filter add dev "$dev" parent {TC_ROOT} protocol ip prio "$prio" u32'
    filters = " && ".join(f"{add} {m} flowid {TC_ROOT}1" for m in matches)
    htb_class = "htb rate 10gbit quantum 60000"
    return [
        f"for dev in $({_DEVICES}); do",
        '  [ "$dev" = lo ] && continue',
        f'  if ! tc qdisc show dev "$dev" root | grep -q "^qdisc htb {TC_ROOT} "; then',
        f'    tc qdisc add dev "$dev" root handle {TC_ROOT} htb default 2',
        f'    tc class add dev "$dev" parent {TC_ROOT} classid {TC_ROOT}1 {htb_class}',
        f'    tc class add dev "$dev" parent {TC_ROOT} classid {TC_ROOT}2 {htb_class}',
        f'    tc qdisc add dev "$dev" parent {TC_ROOT}1 handle 5d2: pfifo limit 0',
        "  fi",
        f'  prio=$(tc filter show dev "$dev" parent {TC_ROOT} '
        "| sed -n 's/.* pref \\([0-9]*\\) .*/\\1/p' | sort -n | tail -n 1)",
        "  prio=$(( ${prio:-100} + 1 ))",
        '  echo "tc $dev $prio"',
        f"  {filters}",
        "done",
    ]


def _tc_undrop(dev: str, prio: int) -> str:
    d = shlex.quote(dev)
    return (
        f"tc filter del dev {d} parent {TC_ROOT} prio {prio} 2>/dev/null; "
        f'if [ -z "$(tc filter show dev {d} parent {TC_ROOT} 2>/dev/null)" ]; then '
        f"tc qdisc del dev {d} root handle {TC_ROOT} 2>/dev/null; fi; true"
    )


def _script(lines: Sequence[str]) -> str:
    return "set -e\n" + "\n".join(lines) + "\n"


def _addresses(runtime: DockerRuntime, containers: Sequence[str], fault: str) -> list[str]:
    out: list[str] = []
    for name in containers:
        c = runtime.container(name, fault=fault)
        addrs = ipv4_addresses(c)
        if not addrs:
            raise FaultError(fault, RUNTIME, f"{name} has no IPv4 address on any network")
        out.extend(f"{a}/32" for a in addrs.values())
    return sorted(set(out))


class DockerFault(Fault[DockerRuntime]):
    """A fault on one or more containers (see :class:`~sipdrill.orchestrator.fault_model.Fault`)."""

    runtime_name = RUNTIME
    target_noun = "container"
    targets_param = "containers"
    inject_failures = (DockerException, OSError, subprocess.SubprocessError)
    undo_failures = (DockerException,)

    def __init__(
        self, runtime: DockerRuntime, containers: Sequence[str], *, fault_id: str | None = None
    ) -> None:
        super().__init__(runtime, containers, fault_id=fault_id)

    @property
    def containers(self) -> list[str]:
        return self.targets


class _NetnsFault(DockerFault):
    """A fault made of rules in each target's network namespace. ``state``
    keeps, per container, the namespace (method, generation) and what was put
    there, so that undo finds it, or knows it died with a restart."""

    def _tools(self) -> tuple[str, ...]:
        """What the fault runs in the namespace."""
        return NETWORK_TOOLS

    def _targets(self) -> dict[str, dict[str, Any]]:
        targets: dict[str, dict[str, Any]] = self.state.setdefault("targets", {})
        return targets

    def _enter(self, name: str) -> tuple[Netns, dict[str, Any]]:
        c = self.runtime.container(name, fault=self.kind)
        ns = self.runtime.netns(c, fault=self.kind, tools=self._tools())
        record = {"method": ns.method, "generation": ns.generation, "pid": ns.pid}
        self._targets()[name] = record
        self.save()
        return ns, record

    def _run_recording(self, ns: Netns, record: dict[str, Any], lines: Sequence[str]) -> str:
        """Run ``lines``; record the ``tc <dev> <prio>`` they print (even on failure)."""
        rc, out = self.runtime.run_sh(ns, _script(lines))
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[0] == "tc" and parts[2].isdigit():
                record.setdefault("tc", []).append([parts[1], int(parts[2])])
            elif len(parts) == 2 and parts[0] == "pid" and parts[1].isdigit():
                record["helper_pid"] = int(parts[1])
        self.save()
        if rc != 0:
            raise FaultError(self.kind, RUNTIME, f"in {ns.container} ({ns.method}): {out.strip()}")
        return out

    def _undo(self) -> None:
        errors: list[str] = []
        for name, record in list(self._targets().items()):
            try:
                self._undo_one(name, record)
            except FaultError as exc:
                errors.append(exc.message)
                continue
            self._targets().pop(name, None)
            self.save()
        if errors:
            raise FaultError(self.kind, RUNTIME, "; ".join(errors))

    def _undo_one(self, name: str, record: dict[str, Any]) -> None:
        ns = self.runtime.netns_again(name, record["method"], record["generation"])
        if ns is None:
            return  # the container restarted or is gone: so is its namespace
        lines = [
            _del_chain(_chain(self.id, "in"), "INPUT"),
            _del_chain(_chain(self.id, "out"), "OUTPUT"),
        ]
        lines += [_tc_undrop(dev, prio) for dev, prio in record.get("tc", [])]
        self.runtime.sh(ns, "\n".join(lines), fault=self.kind)

    def _block(
        self, ns: Netns, record: dict[str, Any], cidrs: Sequence[str] | None, egress: str
    ) -> None:
        """Drop traffic from and to ``cidrs`` (None: everything but loopback)."""
        if cidrs is None:
            rules_in, rules_out, matches = (
                ["! -i lo -j DROP"],
                ["! -o lo -j DROP"],
                ["match u32 0 0"],
            )
        else:
            rules_in = [f"-s {c} -j DROP" for c in cidrs]
            rules_out = [f"-d {c} -j DROP" for c in cidrs]
            matches = [f"match ip dst {c}" for c in cidrs]
        lines = _add_chain(_chain(self.id, "in"), "INPUT", rules_in)
        if egress == "tc":
            lines += _tc_drop(matches)
        else:
            lines += _add_chain(_chain(self.id, "out"), "OUTPUT", rules_out)
        self._run_recording(ns, record, lines)


class Cut(_NetnsFault):
    """Silent drop of everything in and out (the realistic "site gone")."""

    kind = FaultKind.CUT

    def __init__(
        self,
        runtime: DockerRuntime,
        containers: Sequence[str],
        *,
        egress: str = "tc",
        fault_id: str | None = None,
    ) -> None:
        super().__init__(runtime, containers, fault_id=fault_id)
        if egress not in ("tc", "iptables"):
            raise FaultError(self.kind, RUNTIME, f"egress must be tc or iptables, not {egress!r}")
        self.egress = egress

    def params(self) -> dict[str, Any]:
        return {**super().params(), "egress": self.egress}

    def describe(self) -> str:
        return f"cut {', '.join(self.containers)} (silent drop, egress by {self.egress})"

    def _inject(self) -> None:
        for name in self.containers:
            ns, record = self._enter(name)
            self._block(ns, record, None, self.egress)


class Partition(_NetnsFault):
    """``containers`` and ``peer`` lose each other; each keeps every other path."""

    kind = FaultKind.PARTITION

    def __init__(
        self,
        runtime: DockerRuntime,
        containers: Sequence[str],
        peer: Sequence[str],
        *,
        egress: str = "tc",
        fault_id: str | None = None,
    ) -> None:
        super().__init__(runtime, containers, fault_id=fault_id)
        self.peer = [peer] if isinstance(peer, str) else list(peer)
        if not self.peer:
            raise FaultError(self.kind, RUNTIME, "a partition needs a peer group")
        both = set(self.containers) & set(self.peer)
        if both:
            raise FaultError(self.kind, RUNTIME, f"{', '.join(sorted(both))} on both sides")
        if egress not in ("tc", "iptables"):
            raise FaultError(self.kind, RUNTIME, f"egress must be tc or iptables, not {egress!r}")
        self.egress = egress

    def params(self) -> dict[str, Any]:
        return {**super().params(), "peer": list(self.peer), "egress": self.egress}

    def describe(self) -> str:
        return f"partition {', '.join(self.containers)} | {', '.join(self.peer)}"

    def _inject(self) -> None:
        side_a = _addresses(self.runtime, self.containers, self.kind)
        side_b = _addresses(self.runtime, self.peer, self.kind)
        self.state["addresses"] = {"a": side_a, "b": side_b}
        for names, other in ((self.containers, side_b), (self.peer, side_a)):
            for name in names:
                ns, record = self._enter(name)
                self._block(ns, record, other, self.egress)


class Degrade(_NetnsFault):
    """Latency, jitter and loss on the way out of each container (towards
    ``peers`` only, if given: addresses or CIDRs)."""

    kind = FaultKind.DEGRADE

    def __init__(
        self,
        runtime: DockerRuntime,
        containers: Sequence[str],
        *,
        delay_ms: float = 0.0,
        jitter_ms: float = 0.0,
        loss_percent: float = 0.0,
        peers: Sequence[str] = (),
        method: str = "nfqueue",
        seed: int | None = None,
        fault_id: str | None = None,
    ) -> None:
        super().__init__(runtime, containers, fault_id=fault_id)
        if method not in ("nfqueue", "netem"):
            raise FaultError(self.kind, RUNTIME, f"method must be nfqueue or netem, not {method!r}")
        if delay_ms < 0 or jitter_ms < 0 or not 0 <= loss_percent <= 100:
            raise FaultError(self.kind, RUNTIME, "delay and jitter >= 0, loss in 0..100 %")
        if jitter_ms > delay_ms:
            raise FaultError(self.kind, RUNTIME, "jitter larger than the delay")
        if not (delay_ms or loss_percent):
            raise FaultError(self.kind, RUNTIME, "nothing to degrade: give a delay or a loss")
        if method == "netem" and peers:
            raise FaultError(self.kind, RUNTIME, "netem acts on whole interfaces: no peers")
        self.delay_ms = float(delay_ms)
        self.jitter_ms = float(jitter_ms)
        self.loss_percent = float(loss_percent)
        self.peers = list(peers)
        self.method = method
        self.seed = seed

    def _tools(self) -> tuple[str, ...]:
        return NETWORK_TOOLS if self.method == "netem" else (*NETWORK_TOOLS, "python3")

    def params(self) -> dict[str, Any]:
        return {
            **super().params(),
            "delay_ms": self.delay_ms,
            "jitter_ms": self.jitter_ms,
            "loss_percent": self.loss_percent,
            "peers": list(self.peers),
            "method": self.method,
            "seed": self.seed,
        }

    def describe(self) -> str:
        parts = [f"{self.delay_ms:g}±{self.jitter_ms:g} ms"] if self.delay_ms else []
        if self.loss_percent:
            parts.append(f"{self.loss_percent:g} % loss")
        towards = f" towards {', '.join(self.peers)}" if self.peers else ""
        return f"degrade {', '.join(self.containers)}: {', '.join(parts)}{towards} ({self.method})"

    @property
    def queue(self) -> int:
        return 0x5D00 + int(self.id[:2], 16)

    @property
    def tag(self) -> str:
        return _chain(self.id, "dg")

    def _inject(self) -> None:
        for name in self.containers:
            ns, record = self._enter(name)
            if self.method == "netem":
                self._netem(ns, record)
            else:
                self._nfqueue(ns, record)

    def _netem(self, ns: Netns, record: dict[str, Any]) -> None:
        spec = f"delay {self.delay_ms:g}ms"
        if self.jitter_ms:
            spec += f" {self.jitter_ms:g}ms"
        if self.loss_percent:
            spec += f" loss {self.loss_percent:g}%"
        lines = [
            f"for dev in $({_DEVICES}); do",
            '  [ "$dev" = lo ] && continue',
            '  echo "netem $dev"',
            f'  tc qdisc add dev "$dev" root handle {TC_NETEM} netem {spec}',
            "done",
        ]
        rc, out = self.runtime.run_sh(ns, _script(lines))
        record["netem"] = [
            line.split()[1] for line in out.splitlines() if line.startswith("netem ")
        ]
        self.save()
        if rc != 0:
            hint = ""
            if "unknown" in out.lower():
                hint = " (this kernel has no sch_netem: use method nfqueue)"
            raise FaultError(self.kind, RUNTIME, f"in {ns.container}: {out.strip()}{hint}")

    def _nfqueue(self, ns: Netns, record: dict[str, Any]) -> None:
        source = (Path(__file__).parent / "nfq_delay.py").read_text()
        args = [
            "--queue", str(self.queue),
            "--delay-ms", f"{self.delay_ms:g}",
            "--jitter-ms", f"{self.jitter_ms:g}",
            "--loss-percent", f"{self.loss_percent:g}",
        ]  # fmt: skip
        if self.seed is not None:
            args += ["--seed", str(self.seed)]
        if ns.method == "nsenter":  # a host process: make it go with the container
            start = proc_start_time(ns.pid)
            if start is not None:
                args += ["--watch-pid", str(ns.pid), "--watch-start", start]
        args += ["--tag", self.tag]
        command = " ".join(
            shlex.quote(a) for a in [ns.python, "-c", python_bootstrap(source), *args]
        )
        log = f"/tmp/{self.tag}.log"
        q = self.queue
        chain = _chain(self.id, "dg")
        if self.peers:
            rules = [f"-d {p} -j NFQUEUE --queue-num {q} --queue-bypass" for p in self.peers]
        else:
            rules = [f"! -o lo -j NFQUEUE --queue-num {q} --queue-bypass"]
        record["helper_tag"] = self.tag
        self.save()
        lines = [
            f"if {IPT} -S | grep -q -- '^-N {labels.FAULT_PREFIX}[0-9a-f]*-dg$'; then",
            f"  echo '{ns.container} is already degraded by another fault' >&2; exit 3",
            "fi",
            f"{command} </dev/null >/dev/null 2>{log} &",
            "pid=$!",
            'echo "pid $pid"',
            "i=0",
            "until sed -n 's/^ *\\([0-9][0-9]*\\) .*/\\1/p' /proc/net/netfilter/nfnetlink_queue "
            f"2>/dev/null | grep -qx {q}; do",
            '  if ! kill -0 "$pid" 2>/dev/null; then',
            f'    echo "the delayer exited:" >&2; cat {log} >&2; exit 4',
            "  fi",
            f'  i=$((i+1)); if [ "$i" -ge 100 ]; then echo "queue {q} not bound" >&2; exit 5; fi',
            "  sleep 0.1",
            "done",
            # Appended, not inserted: a cut's DROP (inserted first) still wins.
            *_add_chain(chain, "OUTPUT", rules, first=False),
        ]
        self._run_recording(ns, record, lines)

    def _undo_one(self, name: str, record: dict[str, Any]) -> None:
        ns = self.runtime.netns_again(name, record["method"], record["generation"])
        if ns is not None:
            lines = [_del_chain(_chain(self.id, "dg"), "OUTPUT")]
            lines += [
                f"tc qdisc del dev {shlex.quote(dev)} root handle {TC_NETEM} 2>/dev/null; true"
                for dev in record.get("netem", [])
            ]
            self.runtime.sh(ns, "\n".join(lines), fault=self.kind)
        pid = record.get("helper_pid")
        if pid:
            # After the rule is gone: it accepts what it still holds, then exits.
            self.runtime.kill_tagged(record["method"], name, int(pid), record["helper_tag"])


class Disconnect(DockerFault):
    """``docker network disconnect`` from ``network`` (default: every network)."""

    kind = FaultKind.DISCONNECT

    def __init__(
        self,
        runtime: DockerRuntime,
        containers: Sequence[str],
        *,
        network: str | None = None,
        fault_id: str | None = None,
    ) -> None:
        super().__init__(runtime, containers, fault_id=fault_id)
        self.network = network

    def params(self) -> dict[str, Any]:
        return {**super().params(), "network": self.network}

    def describe(self) -> str:
        return f"disconnect {', '.join(self.containers)} from {self.network or 'every network'}"

    def _inject(self) -> None:
        plan: list[dict[str, Any]] = []
        for name in self.containers:
            c = self.runtime.container(name, fault=self.kind)
            nets = c.attrs["NetworkSettings"]["Networks"] or {}
            if self.network is not None and self.network not in nets:
                raise FaultError(self.kind, RUNTIME, f"{name} is not on network {self.network}")
            for net_name, data in nets.items():
                if self.network is not None and net_name != self.network:
                    continue
                ipam = data.get("IPAMConfig") or {}
                aliases = [a for a in data.get("Aliases") or [] if a != c.id[:12]]
                plan.append(
                    {
                        "container": name,
                        "network": net_name,
                        "ipv4_address": ipam.get("IPv4Address") or data.get("IPAddress") or None,
                        # Only an address the container was given is given back: pinning
                        # one Docker chose would make it the container's for good, and a
                        # later start fails ("Address already in use") once another
                        # container has been handed it while this one was down.
                        "pinned": bool(ipam.get("IPv4Address")),
                        "aliases": aliases,
                        "links": data.get("Links") or [],
                    }
                )
        # Journal first: what to reconnect is known before anything is cut.
        self.state["endpoints"] = plan
        self.save()
        for ep in plan:
            net = self.runtime.find_network(ep["network"])
            if net is None:
                raise FaultError(self.kind, RUNTIME, f"no network {ep['network']}")
            net.disconnect(ep["container"])

    def _undo(self) -> None:
        for ep in self.state.get("endpoints", []):
            c = self.runtime.find(ep["container"])
            net = self.runtime.find_network(ep["network"])
            if c is None or net is None:
                continue  # removed: nothing to reconnect
            if ep["network"] in (c.attrs["NetworkSettings"]["Networks"] or {}):
                continue  # still (or again) connected
            pinned = ep.get("pinned", True)  # journals of older versions pinned every address
            fixed = (
                ep["ipv4_address"] if pinned and self.runtime.network_has_subnet(net) else None
            )
            links = [tuple(link.split(":", 1)) for link in ep["links"]] or None
            net.connect(c, ipv4_address=fixed, aliases=ep["aliases"] or None, links=links)


class _LifecycleFault(DockerFault):
    """A container lifecycle action whose undo brings the container back."""

    def _inject(self) -> None:
        targets: dict[str, str] = self.state.setdefault("generations", {})
        for name in self.containers:
            c = self.runtime.container(name, fault=self.kind)
            state = c.attrs["State"]
            if not state["Running"]:
                raise FaultError(self.kind, RUNTIME, f"{name} is not running ({state['Status']})")
            targets[name] = generation(c)
            self.save()
            self._act(name)

    @abstractmethod
    def _act(self, name: str) -> None: ...

    def _undo(self) -> None:
        for name in self.state.get("generations", {}):
            c = self.runtime.find(name)
            if c is None:
                continue
            state = c.attrs["State"]
            if state["Paused"]:
                c.unpause()
            elif not state["Running"]:
                c.start()
            self.runtime.wait_for(name, "running", fault=self.kind)


class Crash(_LifecycleFault):
    """``docker kill`` (SIGKILL unless ``signal``); undo starts the container."""

    kind = FaultKind.CRASH

    def __init__(
        self,
        runtime: DockerRuntime,
        containers: Sequence[str],
        *,
        signal: str = "SIGKILL",
        fault_id: str | None = None,
    ) -> None:
        super().__init__(runtime, containers, fault_id=fault_id)
        self.signal = signal

    def params(self) -> dict[str, Any]:
        return {**super().params(), "signal": self.signal}

    def describe(self) -> str:
        return f"crash {', '.join(self.containers)} ({self.signal})"

    def _act(self, name: str) -> None:
        self.runtime.container(name, fault=self.kind).kill(signal=self.signal)
        self.runtime.wait_for(name, "stopped", fault=self.kind)


class _TimedLifecycleFault(_LifecycleFault):
    """A lifecycle fault whose docker call takes a stop timeout (seconds)."""

    def __init__(
        self,
        runtime: DockerRuntime,
        containers: Sequence[str],
        *,
        timeout: int = 10,
        fault_id: str | None = None,
    ) -> None:
        super().__init__(runtime, containers, fault_id=fault_id)
        self.timeout = timeout

    def params(self) -> dict[str, Any]:
        return {**super().params(), "timeout": self.timeout}


class Stop(_TimedLifecycleFault):
    """``docker stop`` (SIGTERM, SIGKILL after ``timeout``); undo starts it."""

    kind = FaultKind.STOP

    def _act(self, name: str) -> None:
        self.runtime.container(name, fault=self.kind).stop(timeout=self.timeout)


class Pause(_LifecycleFault):
    """``docker pause``: frozen, the kernel still accepts; undo unpauses."""

    kind = FaultKind.PAUSE

    def _act(self, name: str) -> None:
        self.runtime.container(name, fault=self.kind).pause()


class Restart(_TimedLifecycleFault):
    """``docker restart``; there is nothing to undo but a container that did
    not come back (undo starts it)."""

    kind = FaultKind.RESTART

    def _act(self, name: str) -> None:
        self.runtime.container(name, fault=self.kind).restart(timeout=self.timeout)
        self.runtime.wait_for(name, "running", fault=self.kind)


class DnsOutage(DockerFault):
    """The DNS server drops every query (``mode="drop"``) or answers SERVFAIL,
    through its control API (``PUT/DELETE /faults``). The token is the one
    the container runs with, so the journal holds no secret."""

    kind = FaultKind.DNS_OUTAGE

    def __init__(
        self,
        runtime: DockerRuntime,
        containers: Sequence[str],
        *,
        url: str,
        mode: str = "drop",
        fault_id: str | None = None,
    ) -> None:
        super().__init__(runtime, containers, fault_id=fault_id)
        self.url = url
        self.mode = check_dns_outage_mode(mode, RUNTIME)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "url": self.url, "mode": self.mode}

    def describe(self) -> str:
        return f"dns-outage ({self.mode}) on {', '.join(self.containers)}"

    def _call(self, method: str, name: str) -> None:
        c = self.runtime.container(name, fault=self.kind)
        env = dict(e.split("=", 1) for e in c.attrs["Config"].get("Env") or [] if "=" in e)
        token = env.get("SIPDRILL_DNS_TOKEN") or env.get("SIPDRILL_CONTROL_TOKEN", "")
        body = {self.mode: True} if method == "PUT" else None
        with httpx.Client(timeout=5.0, headers={"Authorization": f"Bearer {token}"}) as http:
            try:
                r = http.request(method, f"{self.url}/faults", json=body)
            except httpx.HTTPError as exc:
                raise FaultError(self.kind, RUNTIME, f"{self.url}: {exc!r}") from exc
        if r.status_code >= 300:
            raise FaultError(self.kind, RUNTIME, f"the DNS control API said {r.status_code}")

    def _inject(self) -> None:
        for name in self.containers:
            self._call("PUT", name)

    def _undo(self) -> None:
        for name in self.containers:
            c = self.runtime.find(name)
            if c is None or not c.attrs["State"]["Running"]:
                continue  # gone or stopped: the fault lived in its memory
            self._call("DELETE", name)


#: The Docker engine's faults (on any container): the kinds a plain
#: :class:`DockerFaultRegistry` makes.
FAULT_KINDS: dict[str, type[DockerFault]] = {
    cls.kind: cls for cls in (Cut, Partition, Degrade, Disconnect, Crash, Stop, Pause, Restart)
}

#: The fault kinds of a docker lab: the engine's and dns-outage (through the
#: lab's DNS server).
LAB_FAULT_KINDS: dict[str, type[DockerFault]] = {**FAULT_KINDS, DnsOutage.kind: DnsOutage}


class DockerFaultRegistry(FaultRegistry[DockerRuntime]):
    """A :class:`~sipdrill.orchestrator.fault_model.FaultRegistry` of docker
    faults (``kinds``: :data:`FAULT_KINDS` unless told otherwise)."""

    def __init__(
        self,
        runtime: DockerRuntime,
        journal: Path | str | None = None,
        *,
        kinds: Mapping[str, type[DockerFault]] = FAULT_KINDS,
    ) -> None:
        super().__init__(runtime, journal, kinds=kinds, runtime_name=RUNTIME)


def heal_journal(journal: Path | str, runtime: DockerRuntime | None = None) -> list[FaultError]:
    """Undo every fault a docker lab's journal holds (``sipdrill lab down`` after a crash)."""
    if not Path(journal).exists():
        return []
    if runtime is not None:
        return DockerFaultRegistry(runtime, journal).heal()
    with DockerRuntime.from_env() as rt:
        return DockerFaultRegistry(rt, journal).heal()

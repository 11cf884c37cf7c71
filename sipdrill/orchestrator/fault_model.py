"""The fault model both runtimes share.

* :class:`FaultKind`: the kinds of the drill file's ``fault: {kind: ...}``
  and of ``sipdrill lab fault``; :data:`RUNTIME_FAULTS` says which runtime
  does which, and how.
* :func:`parse_fault_request`: the one place a fault request (kind, target,
  parameters) is checked and typed, for ``lab fault``, the drill engine and
  both runtimes; it raises :class:`~sipdrill.errors.FaultError` with what is
  wrong.
* :class:`Fault`: one fault on one or more targets (containers, processes),
  with ``inject()`` (all or nothing) and an idempotent ``undo()``;
  :class:`FaultJournal` and :class:`FaultRegistry` write each fault to a JSON
  journal *before* it takes effect, so that a new process heals what a
  crashed one left (``sipdrill lab down``).

The runtimes' fault classes live in :mod:`sipdrill.orchestrator.faults`
(docker) and :mod:`sipdrill.orchestrator.local_faults` (local).
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Generic, Literal, TypeVar

from sipdrill.control.files import write_atomically
from sipdrill.errors import FaultError
from sipdrill.orchestrator.plan import RuntimeKind, ServiceSpec, pool_targets


class FaultKind(StrEnum):
    """What a fault does (the drill file's names)."""

    CUT = "cut"  # silent drop: the realistic "site gone" case
    DISCONNECT = "disconnect"  # docker network disconnect
    PARTITION = "partition"  # two sites lose each other, both stay up
    DEGRADE = "degrade"  # latency / jitter / loss
    CRASH = "crash"  # kill the process / container
    STOP = "stop"
    PAUSE = "pause"
    RESTART = "restart"
    DNS_OUTAGE = "dns-outage"


DnsOutageMode = Literal["drop", "servfail"]

#: The kinds a site or a pool of several front ends takes as a target (every
#: process or container of it, as one fault); any other kind takes one front end.
SITE_FAULTS = (FaultKind.CUT, FaultKind.CRASH)


def pool_target(
    specs: Sequence[ServiceSpec], target: str, kind: str, runtime: str
) -> list[str] | None:
    """The services a pool or front-end target hits (:func:`pool_targets`),
    or None when ``target`` names neither. ``pool1`` of several front ends
    takes the SITE_FAULTS kinds only: FaultError naming its front ends for
    any other. Shared by the local and docker runtimes (same targets, same
    messages); a runtime matches its own service names first."""
    names = pool_targets(specs).get(target)
    if names is None:
        return None
    if len(names) > 1 and kind not in SITE_FAULTS:
        fes = ", ".join(f"{target}/{n.rsplit('-', 1)[-1]}" for n in names)
        raise FaultError(
            kind,
            runtime,
            f"{target} is a pool of {len(names)} front ends: {kind} takes one ({fes}), "
            f"or use {' or '.join(SITE_FAULTS)} on the pool",
        )
    return list(names)

#: The parameters each kind takes (the drill file's and ``lab fault``'s names).
PARAMETERS: dict[FaultKind, tuple[str, ...]] = {
    FaultKind.PARTITION: ("peer",),
    FaultKind.DEGRADE: ("delay_ms", "jitter_ms", "loss_percent"),
    FaultKind.DNS_OUTAGE: ("mode",),
}

#: What each runtime does for each kind it can do; anything else is refused.
RUNTIME_FAULTS: dict[RuntimeKind, dict[FaultKind, str]] = {
    RuntimeKind.LOCAL: {
        FaultKind.CUT: "SIGSTOP the process: its sockets stay open but nothing answers "
        "(a silent drop)",
        FaultKind.CRASH: "SIGKILL the process; undo starts it again",
        FaultKind.RESTART: "SIGTERM then start again (no undo needed)",
        FaultKind.DNS_OUTAGE: "the DNS server drops queries (or answers SERVFAIL) through its "
        "control API",
    },
    RuntimeKind.DOCKER: {
        FaultKind.CUT: "silent drop on every interface (iptables in, tc out), in the "
        "containers' namespaces",
        FaultKind.DISCONNECT: "docker network disconnect from every network; undo reconnects, "
        "same addresses",
        FaultKind.PARTITION: "the target and `peer` (sites or services) drop each other's "
        "every address",
        FaultKind.DEGRADE: "delay_ms, jitter_ms, loss_percent on the way out (NFQUEUE: no "
        "netem here)",
        FaultKind.CRASH: "docker kill (SIGKILL); undo starts the container",
        FaultKind.STOP: "docker stop; undo starts it",
        FaultKind.PAUSE: "docker pause (frozen; the kernel still accepts); undo unpauses",
        FaultKind.RESTART: "docker restart, then wait until healthy (nothing to undo)",
        FaultKind.DNS_OUTAGE: "the DNS server drops queries (mode drop) or answers SERVFAIL, "
        "via its API",
    },
    # The same faults as docker's, applied by the fault agent on the node of
    # each target (orchestrator/swarm_agent.py). Not disconnect (a swarm task
    # cannot leave its service's networks) nor crash, stop, restart (swarm
    # replaces a task that stops: a new container, nothing to undo).
    RuntimeKind.SWARM: {
        FaultKind.CUT: "silent drop on every interface (iptables in, tc out), by the fault "
        "agent on each target's node",
        FaultKind.PARTITION: "the target and `peer` drop each other's every address (each "
        "side by its node's agent)",
        FaultKind.DEGRADE: "delay_ms, jitter_ms, loss_percent on the way out (NFQUEUE), by "
        "the node's agent",
        FaultKind.PAUSE: "docker pause by the node's agent; undo unpauses",
        FaultKind.DNS_OUTAGE: "the DNS server drops queries (mode drop) or answers SERVFAIL, "
        "via its API (by its node's agent)",
    },
}


def check_dns_outage_mode(mode: str, runtime: str) -> DnsOutageMode:
    if mode == "drop":
        return "drop"
    if mode == "servfail":
        return "servfail"
    raise FaultError(FaultKind.DNS_OUTAGE, runtime, f"mode must be drop or servfail, not {mode!r}")


@dataclass(frozen=True)
class FaultRequest:
    """A checked fault request; the runtime resolves ``target`` (a service or
    a site) to what it acts on."""

    kind: FaultKind
    target: str
    peer: str | None = None  # partition: the other side (a site or a service)
    mode: DnsOutageMode = "drop"  # dns-outage
    delay_ms: float = 0.0  # degrade
    jitter_ms: float = 0.0
    loss_percent: float = 0.0

    def describe(self) -> str:
        return f"{self.kind} on {self.target}"


def parse_fault_request(
    kind: str, target: str, params: Mapping[str, Any], runtime: RuntimeKind
) -> FaultRequest:
    """``kind`` on ``target`` with ``params`` (the drill file's names), as
    ``runtime`` can do it, or :class:`FaultError` saying why not."""
    can_do = RUNTIME_FAULTS[runtime]
    try:
        fault: FaultKind | None = FaultKind(kind)
    except ValueError:
        fault = None
    if fault is None or fault not in can_do:
        hint = " (use --runtime docker for network faults)" if runtime is RuntimeKind.LOCAL else ""
        raise FaultError(
            str(kind),
            runtime,
            f"not supported; the {runtime} runtime can do: {', '.join(can_do)}{hint}",
        )
    if runtime is not RuntimeKind.LOCAL:  # the local runtime has always ignored them
        extra = sorted(set(params) - set(PARAMETERS.get(fault, ())))
        if extra:
            raise FaultError(fault, runtime, f"unexpected parameters {extra} for {fault}")
    if fault is FaultKind.PARTITION:
        peer = params.get("peer")
        if not peer:
            raise FaultError(fault, runtime, "a partition needs `peer` (the other site)")
        return FaultRequest(fault, target, peer=str(peer))
    if fault is FaultKind.DEGRADE:
        return FaultRequest(
            fault,
            target,
            delay_ms=float(params.get("delay_ms") or 0),
            jitter_ms=float(params.get("jitter_ms") or 0),
            loss_percent=float(params.get("loss_percent") or 0),
        )
    if fault is FaultKind.DNS_OUTAGE:
        mode = check_dns_outage_mode(params.get("mode") or "drop", runtime)
        return FaultRequest(fault, target, mode=mode)
    return FaultRequest(fault, target)


# --- faults, their journal and their registry ------------------------------------

R = TypeVar("R")

_ID_RE = re.compile(r"^[0-9a-f]{8}$")


class Fault(ABC, Generic[R]):
    """One fault on one or more targets of a runtime ``R`` (containers,
    processes). ``state`` holds what undo needs (and goes to the journal);
    ``status`` is new, injecting, active or undone."""

    kind: ClassVar[FaultKind]
    #: The runtime's name in errors and journals.
    runtime_name: ClassVar[str]
    #: What a target is called (``container``), and the constructor's (and
    #: the journal's) name for the list of them (``containers``).
    target_noun: ClassVar[str]
    targets_param: ClassVar[str]
    #: The runtime's own failures: inject turns them into FaultError ...
    inject_failures: ClassVar[tuple[type[BaseException], ...]] = ()
    #: ... and so does undo.
    undo_failures: ClassVar[tuple[type[BaseException], ...]] = ()

    def __init__(self, runtime: R, targets: Sequence[str], *, fault_id: str | None = None) -> None:
        if isinstance(targets, str):
            targets = [targets]
        if not targets:
            raise FaultError(self.kind, self.runtime_name, f"no {self.target_noun} to act on")
        if fault_id is not None and not _ID_RE.match(fault_id):
            raise FaultError(
                self.kind, self.runtime_name, f"bad fault id {fault_id!r} (8 hex digits)"
            )
        self.runtime = runtime
        self.targets = list(targets)
        self.id = fault_id or secrets.token_hex(4)
        self.status = "new"
        self.state: dict[str, Any] = {}
        self.listener: Callable[[Fault[R]], None] | None = None

    # --- what subclasses provide ---------------------------------------------

    def params(self) -> dict[str, Any]:
        """Constructor arguments (JSON), to rebuild the fault from the journal."""
        return {self.targets_param: list(self.targets)}

    @abstractmethod
    def _inject(self) -> None: ...

    @abstractmethod
    def _undo(self) -> None: ...

    def describe(self) -> str:
        return f"{self.kind} {', '.join(self.targets)}"

    # --- the protocol ------------------------------------------------------------

    def _error(self, message: str) -> FaultError:
        return FaultError(self.kind, self.runtime_name, message)

    def save(self) -> None:
        """Tell the journal (if any) what this fault has done so far."""
        if self.listener is not None:
            self.listener(self)

    def inject(self) -> None:
        """Make the fault take effect; all or nothing."""
        if self.status == "active":
            return
        if self.status == "undone":
            raise self._error(f"fault {self.id} was undone; make a new one")
        self.status = "injecting"
        self.save()
        try:
            self._inject()
        except BaseException as exc:
            with contextlib.suppress(Exception):
                self._undo()
            self.status = "undone"
            self.save()
            if isinstance(exc, self.inject_failures):
                raise self._error(str(exc)) from exc
            raise
        self.status = "active"
        self.save()

    def undo(self) -> None:
        """Remove the fault's effect. Safe to call again, and after a crash
        (from the journal), whatever became of the targets meanwhile."""
        if self.status in ("new", "undone"):
            return
        try:
            self._undo()
        except self.undo_failures as exc:
            raise self._error(f"undo: {exc}") from exc
        self.status = "undone"
        self.save()

    @property
    def active(self) -> bool:
        return self.status in ("injecting", "active")

    def to_record(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "status": self.status,
            "description": self.describe(),
            "params": self.params(),
            "state": self.state,
        }

    @classmethod
    def from_record(cls, runtime: R, record: dict[str, Any]) -> Fault[R]:
        fault = cls(runtime, fault_id=record["id"], **record["params"])
        fault.state = dict(record.get("state") or {})
        fault.status = str(record.get("status", "active"))
        return fault

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id} {self.status}: {self.describe()}>"


class FaultJournal:
    """The faults in force, as JSON at ``path`` (written atomically on every
    change). An entry leaves the journal when its fault is undone."""

    def __init__(self, path: Path | str, runtime: str = "") -> None:
        self.path = Path(path)
        self.runtime = runtime

    def records(self) -> list[dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            raise FaultError(
                "journal", self.runtime or "lab", f"cannot read {self.path}: {exc}"
            ) from exc
        return list(data.get("faults", []))

    def put(self, fault: Fault[Any]) -> None:
        records = [r for r in self.records() if r["id"] != fault.id]
        if fault.status != "undone":
            records.append(fault.to_record())
        doc = {"version": 1, "runtime": fault.runtime_name, "faults": records}
        data = json.dumps(doc, indent=2).encode()
        write_atomically(self.path, data, mode=0o644, make_parents=True)


class FaultRegistry(Generic[R]):
    """Creates, injects, undoes and heals a runtime's faults (``kinds``: the
    fault classes by kind), journalling each one.

    Built on a journal that holds faults (left by a crashed orchestrator),
    it takes them over: :meth:`heal` undoes them too. As a context manager it
    heals everything on exit.
    """

    def __init__(
        self,
        runtime: R,
        journal: Path | str | None,
        *,
        kinds: Mapping[str, type[Fault[R]]],
        runtime_name: str,
    ) -> None:
        self.runtime = runtime
        self.kinds = kinds
        self.runtime_name = runtime_name
        self.journal = FaultJournal(journal, runtime_name) if journal is not None else None
        self._faults: dict[str, Fault[R]] = {}
        if self.journal is not None:
            for record in self.journal.records():
                cls = kinds.get(record.get("kind", ""))
                if cls is None:
                    raise FaultError(
                        str(record.get("kind")), runtime_name, "unknown kind in the journal"
                    )
                self._adopt(cls.from_record(runtime, record))

    def _adopt(self, fault: Fault[R]) -> Fault[R]:
        if self.journal is not None:
            fault.listener = self.journal.put
        self._faults[fault.id] = fault
        return fault

    def create(self, kind: str, targets: Sequence[str], **params: Any) -> Fault[R]:
        """A fault of ``kind`` (the drill file's names), not yet injected."""
        cls = self.kinds.get(kind)
        if cls is None:
            raise FaultError(
                kind,
                self.runtime_name,
                f"not a {self.runtime_name} fault; this runtime can do: {', '.join(self.kinds)}",
            )
        try:
            return cls(self.runtime, targets, **params)
        except TypeError as exc:
            raise FaultError(
                kind, self.runtime_name, f"bad parameters {sorted(params)}: {exc}"
            ) from exc

    def inject(self, fault: Fault[R]) -> Fault[R]:
        self._adopt(fault)
        fault.inject()
        return fault

    def get(self, fault_id: str) -> Fault[R] | None:
        return self._faults.get(fault_id)

    def undo(self, fault: Fault[R] | str) -> None:
        found = self._faults.get(fault) if isinstance(fault, str) else fault
        if found is not None:
            found.undo()

    def heal_one(self, fault_id: str) -> Fault[R] | None:
        """Undo the fault ``fault_id`` if it is in force: the fault undone, or
        None (an unknown or healed id: undo is idempotent)."""
        fault = self._faults.get(fault_id)
        if fault is None or not fault.active:
            return None
        fault.undo()
        return fault

    def active(self) -> list[Fault[R]]:
        return [f for f in self._faults.values() if f.active]

    def __iter__(self) -> Iterator[Fault[R]]:
        return iter(list(self._faults.values()))

    def heal(self) -> list[FaultError]:
        """Undo every fault in force, newest first; a fault that fails is
        tried again after the others (a paused container may have blocked
        it). Returns what still failed; those stay in the journal."""
        pending = [f for f in reversed(list(self._faults.values())) if f.active]
        errors: list[FaultError] = []
        for _attempt in range(2):
            failed: list[Fault[R]] = []
            errors = []
            for fault in pending:
                try:
                    fault.undo()
                except FaultError as exc:
                    failed.append(fault)
                    errors.append(exc)
            pending = failed
            if not pending:
                break
        return errors

    def heal_or_raise(self) -> None:
        """:meth:`heal`, raising one FaultError that names what could not be undone."""
        raise_heal_errors(self.heal(), self.runtime_name)

    def __enter__(self) -> FaultRegistry[R]:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        errors = self.heal()
        if exc is None:
            raise_heal_errors(errors, self.runtime_name)


def raise_heal_errors(errors: Sequence[FaultError], runtime: str) -> None:
    if errors:
        raise FaultError("heal", runtime, "; ".join(f"{e.fault}: {e.message}" for e in errors))


def journal_path(state_dir: Path | str) -> Path:
    """Where a lab's faults are journalled: ``<state_dir>/faults.json``."""
    return Path(state_dir) / "faults.json"

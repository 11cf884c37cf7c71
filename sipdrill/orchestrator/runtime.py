"""What a lab runtime is: the :class:`Runtime` protocol that the local
runtime (:class:`~sipdrill.orchestrator.local_runtime.LocalRuntime`,
processes on loopback addresses) and the docker runtime
(:class:`~sipdrill.orchestrator.docker_lab.DockerLab`, a Compose project)
both implement, and that ``sipdrill lab``, ``sipdrill drill run`` and the
drill engine's :class:`~sipdrill.orchestrator.live.LiveLab` use.

Faults go through the fault model (:mod:`sipdrill.orchestrator.fault_model`):
:func:`~sipdrill.orchestrator.fault_model.parse_fault_request` checks a
request, :meth:`Runtime.apply` injects it (journalled before it takes
effect), :meth:`Runtime.undo` and :meth:`Runtime.heal_all` undo it, on every
exit path.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, NotRequired, Protocol, TypedDict

from sipdrill.orchestrator.fault_model import FaultKind, FaultRequest
from sipdrill.orchestrator.plan import RuntimeKind, ServiceSpec


class InjectedFault(TypedDict):
    """A fault in force: ``id`` is the handle for :meth:`Runtime.undo`."""

    id: str
    kind: FaultKind
    target: str
    containers: NotRequired[list[str]]  # docker: the containers it acts on


class Runtime(Protocol):
    """A lab runtime: its services' lifecycle and their faults."""

    kind: RuntimeKind
    lab: str
    state_dir: Path

    @property
    def token(self) -> str:
        """The bearer token of the lab's control APIs."""
        ...

    def up(self, specs: list[ServiceSpec], timeout: float = ...) -> None:
        """Start every service and wait until each is healthy."""
        ...

    def down(self) -> list[str]:
        """Heal every fault, stop everything, forget the lab; the services stopped."""
        ...

    def status(self) -> list[dict[str, Any]]:
        """A row per service: name, role, address, health (pid or container)."""
        ...

    def live_specs(self, planned: Sequence[ServiceSpec]) -> list[ServiceSpec]:
        """The services as a drill reaches them (``planned``: what ``up`` was given)."""
        ...

    def inject(self, kind: str, target: str, **params: Any) -> InjectedFault:
        """Parse and apply a fault request (the drill file's names)."""
        ...

    def apply(self, request: FaultRequest) -> InjectedFault:
        """Inject a checked fault; it is journalled before it takes effect."""
        ...

    def undo(self, fault_id: str) -> None:
        """Undo a fault; an unknown or healed id does nothing."""
        ...

    def heal_all(self) -> None:
        """Undo every fault of the lab (also those a crashed orchestrator left)."""
        ...

    def leftovers(self) -> list[str]:
        """Look for faults still in place, whatever the journal says: one line
        per thing found (a fault in the journal, a stopped or paused service, a
        fault's iptables chain or qdisc, a DNS fault); empty when there is none."""
        ...

"""Faults for the local runtime, with the discipline of the docker ones
(:class:`~sipdrill.orchestrator.fault_model.Fault`): journalled in
``<state dir>/faults.json`` before they take effect, undone by ``undo()``
(idempotent) or by a new process from the journal (``sipdrill lab down``).

==============  =============================================================
``cut``         SIGSTOP: the sockets stay open, the kernel still accepts,
                nothing answers (a silent drop); undo sends SIGCONT.
``crash``       SIGKILL; undo starts the process again.
``restart``     SIGTERM, start again, wait until healthy; nothing to undo.
``dns-outage``  the DNS server drops queries or answers SERVFAIL, through its
                control API; undo clears it (if the server still runs).
==============  =============================================================

A fault acts on a list of processes (the services' names), so a site fault
is one fault.
"""

from __future__ import annotations

import subprocess
from abc import abstractmethod
from collections.abc import Sequence
from typing import Any, Protocol

import httpx

from sipdrill.orchestrator.fault_model import (
    DnsOutageMode,
    Fault,
    FaultKind,
    check_dns_outage_mode,
)
from sipdrill.orchestrator.plan import RuntimeKind


class Processes(Protocol):
    """The local runtime's processes, by service name, as the faults act on them."""

    def alive(self, name: str) -> bool: ...
    def suspend(self, name: str) -> None: ...  # SIGSTOP
    def resume(self, name: str) -> None: ...  # SIGCONT, if alive
    def kill(self, name: str) -> None: ...  # SIGKILL, and collect it
    def revive(self, name: str) -> None: ...  # start it again unless alive
    def restart(self, name: str) -> None: ...  # SIGTERM, start, wait until healthy
    def dns_outage(self, name: str, mode: DnsOutageMode | None) -> None: ...  # None: clear


class LocalFault(Fault[Processes]):
    """A fault on one or more of the local runtime's processes."""

    runtime_name = RuntimeKind.LOCAL.value
    target_noun = "process"
    targets_param = "processes"
    # What inject raises goes out as it is; undo's failures become FaultError,
    # so that healing goes on with the other faults.
    undo_failures = (OSError, subprocess.SubprocessError, httpx.HTTPError)

    def __init__(
        self, runtime: Processes, processes: Sequence[str], *, fault_id: str | None = None
    ) -> None:
        super().__init__(runtime, processes, fault_id=fault_id)

    def _inject(self) -> None:
        for name in self.targets:
            self._inject_one(name)

    def _undo(self) -> None:
        for name in self.targets:
            self._undo_one(name)

    @abstractmethod
    def _inject_one(self, name: str) -> None: ...

    @abstractmethod
    def _undo_one(self, name: str) -> None: ...


class LocalCut(LocalFault):
    kind = FaultKind.CUT

    def describe(self) -> str:
        return f"cut {', '.join(self.targets)} (SIGSTOP)"

    def _inject_one(self, name: str) -> None:
        self.runtime.suspend(name)

    def _undo_one(self, name: str) -> None:
        self.runtime.resume(name)


class LocalCrash(LocalFault):
    kind = FaultKind.CRASH

    def _inject_one(self, name: str) -> None:
        self.runtime.kill(name)

    def _undo_one(self, name: str) -> None:
        self.runtime.revive(name)


class LocalRestart(LocalFault):
    kind = FaultKind.RESTART

    def _inject_one(self, name: str) -> None:
        self.runtime.restart(name)

    def _undo_one(self, name: str) -> None:
        pass  # it is over when inject returns


class LocalDnsOutage(LocalFault):
    kind = FaultKind.DNS_OUTAGE

    def __init__(
        self,
        runtime: Processes,
        processes: Sequence[str],
        *,
        mode: str = "drop",
        fault_id: str | None = None,
    ) -> None:
        super().__init__(runtime, processes, fault_id=fault_id)
        self.mode = check_dns_outage_mode(mode, self.runtime_name)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "mode": self.mode}

    def describe(self) -> str:
        return f"dns-outage ({self.mode}) on {', '.join(self.targets)}"

    def _inject_one(self, name: str) -> None:
        self.runtime.dns_outage(name, self.mode)

    def _undo_one(self, name: str) -> None:
        if self.runtime.alive(name):  # else the fault died with it
            self.runtime.dns_outage(name, None)


#: The local runtime's faults by kind (what its journal may hold).
LOCAL_FAULT_KINDS: dict[str, type[LocalFault]] = {
    cls.kind: cls for cls in (LocalCut, LocalCrash, LocalRestart, LocalDnsOutage)
}

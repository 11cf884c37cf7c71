"""The local runtime: every role of the lab as a subprocess on its own
127.77.k.x address, for machines without Docker and for fast tests; one
implementation of the :class:`~sipdrill.orchestrator.runtime.Runtime`
protocol (the docker runtime is the other).

State lives in ``<state_dir>/lab.json`` (pids, specs) and the faults in
force in ``<state_dir>/faults.json`` (:mod:`sipdrill.orchestrator.local_faults`),
each written before any change takes effect, so ``lab down`` after a crash of
the orchestrator still finds and heals everything it started.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from sipdrill.control.files import write_atomically
from sipdrill.errors import FaultError, OperationError
from sipdrill.orchestrator.fault_model import (
    SITE_FAULTS,
    DnsOutageMode,
    FaultJournal,
    FaultKind,
    FaultRegistry,
    FaultRequest,
    journal_path,
    parse_fault_request,
    pool_target,
)
from sipdrill.orchestrator.local_faults import (
    LOCAL_FAULT_KINDS,
    LocalDnsOutage,
    Processes,
)
from sipdrill.orchestrator.plan import Role, RuntimeKind, ServiceSpec, pool_targets
from sipdrill.orchestrator.runtime import InjectedFault

Progress = Callable[[str], None]


#: Children started by this process, shared by every LocalRuntime object: a
#: runtime object made after another one failed must still reap its children.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def _quiet(_: str) -> None:
    pass


@dataclass
class ProcessRecord:
    spec: dict[str, Any]
    pid: int | None = None
    log: str = ""
    stopped: bool = False


@dataclass
class LabState:
    lab: str
    runtime: str
    token: str
    processes: dict[str, ProcessRecord] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> LabState | None:
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise OperationError(
                "bad-lab-state", f"{path}: unreadable lab state ({exc}); {_STATE_FIX}", 409
            ) from None
        try:
            procs = {k: ProcessRecord(**v) for k, v in raw.pop("processes", {}).items()}
            raw.pop("faults", None)  # where older versions kept them (now faults.json)
            return cls(processes=procs, **raw)
        except (TypeError, AttributeError) as exc:
            raise OperationError(
                "bad-lab-state", f"{path}: not a lab state ({exc}); {_STATE_FIX}", 409
            ) from None

    def save(self, path: Path) -> None:
        write_atomically(path, json.dumps(asdict(self), indent=2).encode(), mode=0o644)


_STATE_FIX = "stop any process it started by hand (see its logs/ folder), then remove the file"


def spec_from_dict(d: dict[str, Any]) -> ServiceSpec:
    return ServiceSpec(
        name=d["name"],
        role=Role(d["role"]),
        network=d["network"],
        address=d["address"],
        args=tuple(d["args"]),
        depends_on=tuple(d["depends_on"]),
        control_port=d["control_port"],
        pool=d["pool"],
        front_end=d.get("front_end"),
        env=tuple((str(k), str(v)) for k, v in d["env"]),
    )


def _alive(pid: int | None) -> bool:
    """True if ``pid`` is a live sipdrill process (pids get reused)."""
    if pid is None:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return b"sipdrill" in cmdline and state != "Z"


class LocalRuntime:
    kind = RuntimeKind.LOCAL

    def __init__(self, lab: str, state_dir: Path, progress: Progress = _quiet) -> None:
        self.lab = lab
        self.state_dir = state_dir
        self.state_path = state_dir / "lab.json"
        self.journal = journal_path(state_dir)
        self.progress = progress

    # --- state ------------------------------------------------------------

    def _state(self) -> LabState:
        state = LabState.load(self.state_path)
        if state is None:
            raise OperationError(
                "lab-not-up", f"no local lab {self.lab!r} in {self.state_dir}", 404
            )
        return state

    @property
    def token(self) -> str:
        return self._state().token

    # --- lifecycle --------------------------------------------------------

    def up(self, specs: list[ServiceSpec], timeout: float = 60.0) -> None:
        """Start every process in dependency order and wait until each is healthy."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        existing = LabState.load(self.state_path)
        if existing and any(_alive(p.pid) for p in existing.processes.values()):
            raise OperationError(
                "lab-already-up",
                f"lab {self.lab!r} is already running from {self.state_dir}: "
                "run `sipdrill lab down` first",
            )
        state = LabState(lab=self.lab, runtime=self.kind.value, token=secrets.token_urlsafe(24))
        state.save(self.state_path)
        self.journal.unlink(missing_ok=True)  # a dead lab's: its processes are gone
        # One run's logs: the previous run's are kept once, as *.log.1 (a restart
        # fault appends to the running lab's log; only a new lab starts anew).
        for log in (self.state_dir / "logs").glob("*.log"):
            log.replace(log.with_name(log.name + ".1"))
        try:
            for spec in _ordered(specs):
                self._start(state, spec)
                self._wait_healthy(spec, state.token, timeout)
        except BaseException:
            self.progress("start failed: stopping what was started")
            self.down()
            raise

    def _start(self, state: LabState, spec: ServiceSpec) -> None:
        log = self.state_dir / "logs" / f"{spec.name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "SIPDRILL_CONTROL_TOKEN": state.token,
            "SIPDRILL_DNS_TOKEN": state.token,
            **dict(spec.env),
        }
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "sipdrill", *spec.args],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                # Its own session: a Ctrl-C aimed at the orchestrator must not
                # reach the lab before the orchestrator has healed its faults.
                start_new_session=True,
            )
        _CHILDREN[proc.pid] = proc
        state.processes[spec.name] = ProcessRecord(spec=asdict(spec), pid=proc.pid, log=str(log))
        state.save(self.state_path)
        self.progress(f"started {spec.name} ({spec.role.value}) on {spec.address} pid {proc.pid}")

    def _wait_healthy(self, spec: ServiceSpec, token: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        url = f"{spec.control_url}/health"
        last = "no answer yet"
        with httpx.Client(timeout=2.0, headers={"Authorization": f"Bearer {token}"}) as http:
            while time.monotonic() < deadline:
                record = self._state().processes[spec.name]
                if not _alive(record.pid):
                    raise OperationError(
                        "start-failed",
                        f"{spec.name} exited during start-up; see {record.log}:\n"
                        + _tail(Path(record.log)),
                        500,
                    )
                try:
                    r = http.get(url)
                    if r.status_code == 200:
                        self.progress(f"{spec.name} healthy")
                        return
                    last = f"HTTP {r.status_code}"
                except httpx.HTTPError as exc:
                    last = type(exc).__name__
                time.sleep(0.1)
        raise OperationError(
            "start-timeout",
            f"{spec.name} not healthy at {url} after {timeout:g} s ({last}); "
            f"see {self._state().processes[spec.name].log}",
            504,
        )

    def down(self) -> list[str]:
        """Heal every fault, stop every process, and forget the lab. Returns
        what was stopped. Safe to call twice and after a crash."""
        state = LabState.load(self.state_path)
        if state is None:
            return []
        self.heal_all()
        state = self._state()
        stopped = []
        for name, record in state.processes.items():
            if record.pid is not None and _alive(record.pid):
                _terminate(record.pid)
                stopped.append(name)
            elif record.pid is not None:
                _reap(record.pid)  # it exited by itself: collect it
        self.journal.unlink(missing_ok=True)
        self.state_path.unlink(missing_ok=True)
        return stopped

    def status(self) -> list[dict[str, Any]]:
        state = LabState.load(self.state_path)
        if state is None:
            return []
        rows = []
        with httpx.Client(timeout=1.0, headers={"Authorization": f"Bearer {state.token}"}) as http:
            for name, record in state.processes.items():
                spec = spec_from_dict(record.spec)
                health = "down"
                if record.stopped:
                    health = "cut (SIGSTOP)"
                elif _alive(record.pid):
                    try:
                        r = http.get(f"{spec.control_url}/health")
                        health = "healthy" if r.status_code == 200 else f"HTTP {r.status_code}"
                    except httpx.HTTPError:
                        health = "not answering"
                rows.append(
                    {
                        "name": name,
                        "role": spec.role.value,
                        "address": spec.address,
                        "pid": record.pid,
                        "health": health,
                    }
                )
        return rows

    def live_specs(self, planned: Sequence[ServiceSpec]) -> list[ServiceSpec]:
        """The plan as a drill reaches it: what ``up`` was given."""
        return list(planned)

    # --- faults -----------------------------------------------------------

    def _registry(self) -> FaultRegistry[Processes]:
        return FaultRegistry(
            self, self.journal, kinds=LOCAL_FAULT_KINDS, runtime_name=self.kind.value
        )

    def inject(self, kind: str, target: str, **params: Any) -> InjectedFault:
        """Parse and inject a fault; it is journalled before it takes effect."""
        return self.apply(parse_fault_request(kind, target, params, self.kind))

    def apply(self, request: FaultRequest) -> InjectedFault:
        """Inject a fault on a service, or (cut, crash) on every process of a
        site, as one fault; it is journalled before it takes effect."""
        kind, target = request.kind, request.target
        processes = self._targets(self._state(), request)
        cls = LOCAL_FAULT_KINDS[kind]
        fault = (
            LocalDnsOutage(self, processes, mode=request.mode)
            if cls is LocalDnsOutage
            else cls(self, processes)
        )
        registry = self._registry()
        registry.inject(fault)
        if kind is FaultKind.RESTART:
            registry.undo(fault)  # it is over: nothing to undo, it leaves the journal
        else:
            self.progress(f"fault {kind} on {target} injected ({fault.id})")
        return {"id": fault.id, "kind": kind, "target": target}

    def _targets(self, state: LabState, request: FaultRequest) -> list[str]:
        kind, target = request.kind, request.target
        specs = [spec_from_dict(r.spec) for r in state.processes.values()]
        if target not in state.processes:
            names = pool_target(specs, target, kind, self.kind)
            if names is not None:
                return names
        members = [n for n, r in state.processes.items() if r.spec["network"] == target]
        if target not in state.processes and members and kind in SITE_FAULTS:
            return members  # a site: the fault hits every process in it
        if target not in state.processes:
            sites = sorted({r.spec["network"] for r in state.processes.values()} - {"core"})
            raise FaultError(
                kind,
                self.kind,
                f"unknown target {target!r}; services: {', '.join(state.processes)}; "
                f"pools and front ends: {', '.join(pool_targets(specs))}; "
                f"sites ({', '.join(SITE_FAULTS)}): {', '.join(sites)}",
            )
        spec = spec_from_dict(state.processes[target].spec)
        if kind is FaultKind.DNS_OUTAGE and spec.role is not Role.DNS:
            raise FaultError(kind, self.kind, f"{target} is not the DNS server")
        return [target]

    def undo(self, fault_id: str) -> None:
        """Undo a fault (idempotent: an unknown or healed id does nothing)."""
        fault = self._registry().heal_one(fault_id)
        if fault is not None:
            self.progress(f"fault {fault.describe()} healed ({fault_id})")

    def heal_all(self) -> None:
        state = LabState.load(self.state_path)
        if state is None:
            return
        with contextlib.suppress(Exception):
            self._registry().heal()  # what it cannot undo stays in the journal
        # Belt and braces: nothing may stay stopped, whatever the journal says.
        state = self._state()
        for record in state.processes.values():
            if _alive(record.pid):
                _signal(record.pid, signal.SIGCONT)
            record.stopped = False
        state.save(self.state_path)

    def leftovers(self) -> list[str]:
        """Faults still in place: the journal's, processes stopped (SIGSTOP) or
        not running, a DNS server with a fault set."""
        state = LabState.load(self.state_path)
        if state is None:
            return []
        found = [
            f"fault {r.get('id')} ({r.get('description') or r.get('kind')}) still in the journal"
            for r in FaultJournal(self.journal, self.kind.value).records()
        ]
        with httpx.Client(timeout=3.0, headers={"Authorization": f"Bearer {state.token}"}) as http:
            for name, record in state.processes.items():
                spec = spec_from_dict(record.spec)
                if not _alive(record.pid):
                    found.append(f"{name}: not running")
                    continue
                if record.stopped or _stopped(record.pid):
                    found.append(f"{name}: stopped (SIGSTOP)")
                    continue
                if spec.role is Role.DNS:
                    try:
                        r = http.get(f"{spec.control_url}/faults")
                        faults = r.json() if r.status_code == 200 else {}
                    except (httpx.HTTPError, ValueError) as exc:
                        # A SIGSTOP lands asynchronously: one sent just before this
                        # probe shows only now, and is then what kept it from answering.
                        if _stopped(record.pid):
                            found.append(f"{name}: stopped (SIGSTOP)")
                        else:
                            found.append(
                                f"{name}: its faults cannot be read ({type(exc).__name__})"
                            )
                        continue
                    found += [f"{name}: DNS fault {k}={v}" for k, v in faults.items() if v]
        return found

    # --- what the faults do to processes (local_faults.Processes) ----------

    def alive(self, name: str) -> bool:
        return _alive(self._state().processes[name].pid)

    def suspend(self, name: str) -> None:
        state = self._state()
        record = state.processes[name]
        _signal(record.pid, signal.SIGSTOP)
        record.stopped = True
        state.save(self.state_path)

    def resume(self, name: str) -> None:
        state = self._state()
        record = state.processes[name]
        if _alive(record.pid):
            _signal(record.pid, signal.SIGCONT)
        record.stopped = False
        state.save(self.state_path)

    def kill(self, name: str) -> None:
        pid = self._state().processes[name].pid
        _signal(pid, signal.SIGKILL)
        if pid is not None:
            _reap(pid)

    def revive(self, name: str) -> None:
        state = self._state()
        record = state.processes[name]
        if not _alive(record.pid):
            self._start(state, spec_from_dict(record.spec))

    def restart(self, name: str) -> None:
        state = self._state()
        record = state.processes[name]
        if _alive(record.pid):
            assert record.pid is not None
            _terminate(record.pid)
        spec = spec_from_dict(record.spec)
        self._start(state, spec)
        self._wait_healthy(spec, state.token, 60.0)

    def dns_outage(self, name: str, mode: DnsOutageMode | None) -> None:
        state = self._state()
        record = state.processes[name]
        spec = spec_from_dict(record.spec)
        if record.stopped or _stopped(record.pid):
            raise FaultError(
                FaultKind.DNS_OUTAGE, self.kind,
                f"{name} is stopped (a cut on it is in place): heal that first",
            )
        # A crash's heal starts the server again without waiting for it (a chaos
        # schedule may cut it again at once), so it may still be starting up now.
        try:
            self._wait_healthy(spec, state.token, 30.0)
        except OperationError as exc:
            raise FaultError(FaultKind.DNS_OUTAGE, self.kind, exc.message) from exc
        headers = {"Authorization": f"Bearer {state.token}"}
        with httpx.Client(timeout=5.0, headers=headers) as http:
            if mode is None:
                r = http.delete(f"{spec.control_url}/faults")
            else:
                r = http.put(f"{spec.control_url}/faults", json={mode: True})
            if r.status_code >= 300:
                raise FaultError(
                    FaultKind.DNS_OUTAGE, self.kind, f"the DNS control API said {r.status_code}"
                )


def _stopped(pid: int | None) -> bool:
    """True if ``pid`` is stopped by a signal (state T in /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] in ("T", "t")


def _ordered(specs: list[ServiceSpec]) -> Iterator[ServiceSpec]:
    done: set[str] = set()
    pending = list(specs)
    while pending:
        ready = [s for s in pending if set(s.depends_on) <= done]
        if not ready:
            raise OperationError(
                "plan-cycle", f"dependency cycle among {[s.name for s in pending]}"
            )
        for s in ready:
            pending.remove(s)
            done.add(s.name)
            yield s


def _signal(pid: int | None, sig: signal.Signals) -> None:
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _terminate(pid: int, grace: float = 5.0) -> None:
    _signal(pid, signal.SIGCONT)  # a stopped process cannot handle SIGTERM
    _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.05)
    if _alive(pid):
        _signal(pid, signal.SIGKILL)
    _reap(pid)


def _reap(pid: int) -> None:
    child = _CHILDREN.pop(pid, None)
    if child is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=10)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"

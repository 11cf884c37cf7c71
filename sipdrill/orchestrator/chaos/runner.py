"""Runs a chaos schedule on a running lab and records the history.

The runner is thin: the schedule comes from :mod:`.nemesis`, the verdict from
:mod:`.checker`. What it does:

1. waits until every client is in full service (``clients-ready``);
2. starts one writer per pool: users homed there add contacts with values
   unique to the run (``sip:chaos-<seed>-<n>@<domain>``), through their home
   pool or its backup pool (the other one after a refusal or no answer); every
   write is an invoke and its ok (with the ``seq`` the pool acknowledged), fail
   or info;
3. applies the schedule at its times (faults through the runtime, heals,
   ``Invoke-CsManagementServerFailover -Force``, pool failovers and
   failbacks as ``sipdrill admin`` runs them);
4. stops the writers, heals everything (``heal-all``), fails back any pool
   still failed over, waits up to the bound for every client home in full
   service (``clients-home``), syncs each pool's Backup Service, reads the
   final contact lists from the pools (``final-state``) and probes the runtime
   for leftover faults (``leftovers``);
5. runs the checker.

Every fault is healed on every exit path: a signal (Ctrl-C, SIGTERM) stops
the run where it is, and the heal runs with later signals deferred.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from sipdrill.errors import OperationError
from sipdrill.orchestrator.chaos.checker import Verdict, check
from sipdrill.orchestrator.chaos.history import History, HistoryOp, OpType
from sipdrill.orchestrator.chaos.nemesis import (
    LabShape,
    NemesisConfig,
    NemesisOp,
    NemesisOpKind,
    schedule,
)
from sipdrill.orchestrator.drill import AdminStep, FaultStep
from sipdrill.orchestrator.engine import ClientCount, DrillInterrupted, deferred_interrupts
from sipdrill.orchestrator.plan import RuntimeKind, short_name
from sipdrill.topology import Topology

#: Tries of an undo that fails before the run goes on without it.
HEAL_ATTEMPTS = 3

WriteOutcome = tuple[Literal["ok", "fail", "info"], dict[str, Any]]


class ChaosLab(Protocol):
    """What the runner needs of a lab (:class:`~sipdrill.orchestrator.live.LiveLab`)."""

    def clock(self) -> float: ...
    def wall(self) -> float: ...
    def sleep(self, seconds: float) -> None: ...
    def client_counts(self) -> list[ClientCount]: ...
    def inject(self, fault: FaultStep) -> str: ...
    def undo(self, handle: str) -> None: ...
    def heal_all(self) -> None: ...
    def admin(self, op: AdminStep) -> dict[str, Any]: ...
    #: ``("ok", {"seq": n})``, ``("fail", {"error": ...})`` (certainly not
    #: written) or ``("info", {"error": ...})`` (no answer: maybe written).
    def add_contact(self, pool: str, user: str, contact: str, timeout: float) -> WriteOutcome: ...
    #: The user's record on ``pool``: ``serving_pool`` and ``contacts``.
    def user_data(self, pool: str, user: str) -> dict[str, Any]: ...
    def leftovers(self) -> list[str]: ...


@dataclass(frozen=True)
class ChaosSettings:
    seed: int
    nemesis: NemesisConfig
    #: Pause between one writer's writes, and how long a write may take.
    write_interval: float = 0.2
    write_timeout: float = 2.0
    #: From the end of the nemesis to every client home in full service.
    home_bound: float = 180.0
    #: How long to wait for every client in full service before the nemesis starts.
    ready_timeout: float = 180.0
    #: How long a failback is retried while its pool is still coming back.
    failback_retry: float = 60.0
    #: Users per pool the writers write for (drawn with the seed); 0: all of them.
    users_per_pool: int = 20


@dataclass
class ChaosResult:
    status: Literal["valid", "invalid", "error", "interrupted"]
    verdict: Verdict | None
    history: list[HistoryOp]
    schedule: list[NemesisOp]
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return {"valid": 0, "invalid": 1, "error": 2, "interrupted": 130}[self.status]


def contact_prefix(seed: int) -> str:
    return f"sip:chaos-{seed}-"


class ChaosRunner:
    def __init__(
        self,
        lab: ChaosLab,
        topology: Topology,
        runtime: RuntimeKind,
        settings: ChaosSettings,
        history: History,
        progress: Callable[[str], None] = lambda _m: None,
    ) -> None:
        self.lab = lab
        self.topology = topology
        self.runtime = runtime
        self.settings = settings
        self.history = history
        self.progress = progress
        self.shape = LabShape.from_topology(topology)
        self.schedule = schedule(settings.seed, self.shape, settings.nemesis, runtime)
        self._handles: dict[str, str] = {}
        self._stop_writers = threading.Event()
        self._writers: list[threading.Thread] = []
        self._failed_over: set[str] = set()  # as the admin operations that succeeded say

    # --- the run ------------------------------------------------------------------

    def run(self) -> ChaosResult:
        s = self.settings
        self.history.add(
            "nemesis", OpType.META, "meta",
            seed=s.seed, topology=self.topology.name, runtime=self.runtime.value,
            nemesis=s.nemesis.to_json(), home_bound=s.home_bound,
            contact_prefix=contact_prefix(s.seed), write_interval=s.write_interval,
            write_timeout=s.write_timeout,
            schedule=[op.to_json() for op in self.schedule],
        )
        status: Literal["valid", "invalid", "error", "interrupted"] = "valid"
        error: str | None = None
        try:
            self._ready()
            self._start_writers()
            self._nemesis()
        except DrillInterrupted as exc:
            status, error = "interrupted", str(exc)
        except Exception as exc:  # a lab that broke under us: still heal, still a history
            status, error = "error", f"{type(exc).__name__}: {exc}"
        finally:
            with deferred_interrupts():
                self._stop()
                self._heal_all()
        if status != "valid":
            self.progress(f"[{status}] {error}: every fault healed")
            return ChaosResult(status, None, list(self.history.ops), self.schedule, error)
        try:
            self._final()
        except DrillInterrupted as exc:
            with deferred_interrupts():
                self._heal_all()
            return ChaosResult(
                "interrupted", None, list(self.history.ops), self.schedule, str(exc)
            )
        verdict = check(self.history.ops)
        return ChaosResult(
            "valid" if verdict.valid else "invalid", verdict, list(self.history.ops),
            self.schedule,
        )

    # --- phases --------------------------------------------------------------------

    def _ready(self) -> None:
        self.progress("waiting for every client in full service")
        inv = self.history.invoke("nemesis", "clients-ready")
        deadline = self.lab.clock() + self.settings.ready_timeout
        while True:
            total, full = self._home_full()
            if total and full >= total:
                self.history.complete(inv, OpType.OK, total=total, home_full=full)
                return
            if self.lab.clock() >= deadline:
                self.history.complete(inv, OpType.FAIL, total=total, home_full=full)
                raise OperationError(
                    "clients-not-ready",
                    f"{full} of {total} clients in full service at home after "
                    f"{self.settings.ready_timeout:g} s: the lab is not ready for chaos",
                    504,
                )
            self.lab.sleep(0.5)

    def _home_full(self) -> tuple[int, int]:
        counts = self.lab.client_counts()
        total = sum(c.count for c in counts)
        full = sum(c.count for c in counts if c.mode == "full" and c.pool == c.home_pool)
        return total, full

    def _nemesis(self) -> None:
        start = self.lab.clock()
        n = len(self.schedule)
        for i, op in enumerate(self.schedule):
            while (left := start + op.at - self.lab.clock()) > 0:
                self.lab.sleep(min(left, 1.0))
            self.progress(f"[{i + 1}/{n}] {op.at:6.1f} s  {op.describe()}")
            self._apply(op)

    def _apply(self, op: NemesisOp) -> None:
        h = self.history
        if op.op is NemesisOpKind.FAULT:
            assert op.kind is not None and op.target is not None and op.fault_id is not None
            inv = h.invoke("nemesis", "fault", id=op.fault_id, kind=op.kind.value,
                           target=op.target, params=dict(op.params))
            try:
                fault = FaultStep(kind=op.kind, target=op.target, **dict(op.params))
                self._handles[op.fault_id] = self.lab.inject(fault)
            except Exception as exc:
                h.complete(inv, OpType.FAIL, error=f"{type(exc).__name__}: {exc}")
                return
            h.complete(inv, OpType.OK, handle=self._handles[op.fault_id])
        elif op.op is NemesisOpKind.HEAL:
            assert op.fault_id is not None
            handle = self._handles.pop(op.fault_id, None)
            if handle is None:
                return  # its injection failed: nothing to heal
            inv = h.invoke("nemesis", "heal", id=op.fault_id)
            for attempt in range(1, HEAL_ATTEMPTS + 1):
                try:
                    self.lab.undo(handle)
                except Exception as exc:
                    if attempt < HEAL_ATTEMPTS:  # a runtime's hiccup: the nemesis needs it healed
                        self.lab.sleep(2.0)
                        continue
                    # Heal-all at the end tries again, and the probe says what stayed.
                    h.complete(inv, OpType.FAIL, error=f"{type(exc).__name__}: {exc}",
                               attempts=attempt)
                    self.progress(f"  heal {op.fault_id} failed: {exc}")
                    return
                h.complete(inv, OpType.OK, attempts=attempt)
                return
        elif op.op is NemesisOpKind.CMS_FAILOVER:
            self._admin(AdminStep(op="cms-failover", force=True))
        elif op.op is NemesisOpKind.POOL_FAILOVER:
            assert op.pool is not None
            step = AdminStep(op="pool-failover", pool=op.pool, disaster_mode=op.disaster_mode)
            if self._admin(step):
                self._failed_over.add(op.pool)
        elif op.op is NemesisOpKind.POOL_FAILBACK:
            assert op.pool is not None
            if self._admin(AdminStep(op="pool-failback", pool=op.pool),
                           retry_for=self.settings.failback_retry):
                self._failed_over.discard(op.pool)

    def _admin(self, step: AdminStep, *, retry_for: float = 0.0, process: str = "nemesis") -> bool:
        """Run an administrator operation; retried for ``retry_for`` seconds
        while a pool it needs does not answer yet (503)."""
        inv = self.history.invoke(
            process, step.op, pool=step.pool, disaster_mode=step.disaster_mode, force=step.force
        )
        deadline = self.lab.clock() + retry_for
        attempts = 0
        while True:
            attempts += 1
            try:
                result = self.lab.admin(step)
            except OperationError as exc:
                if exc.http_status in (503, 504) and self.lab.clock() < deadline:
                    self.lab.sleep(2.0)
                    continue
                self.history.complete(inv, OpType.FAIL, error=str(exc), code=exc.code,
                                      attempts=attempts)
                self.progress(f"  {step.op} {step.pool or ''} refused: {exc}")
                return False
            except Exception as exc:
                if self.lab.clock() < deadline:
                    self.lab.sleep(2.0)
                    continue
                self.history.complete(inv, OpType.INFO, error=f"{type(exc).__name__}: {exc}",
                                      attempts=attempts)
                self.progress(f"  {step.op} {step.pool or ''} failed: {exc}")
                return False
            self.history.complete(inv, OpType.OK, result=result, attempts=attempts)
            return True

    # --- writers -------------------------------------------------------------------

    def _start_writers(self) -> None:
        users: dict[str, list[str]] = {}
        for u in self.topology.all_users():
            users.setdefault(u.home_pool, []).append(u.uri)
        for pool in sorted(users):
            name = f"writer-{short_name(pool)}"
            chosen = sorted(users[pool])
            n = self.settings.users_per_pool
            if 0 < n < len(chosen):
                chosen = sorted(random.Random(f"{self.settings.seed}/{pool}").sample(chosen, n))
            thread = threading.Thread(
                target=self._writer, args=(name, pool, chosen), name=name,
                daemon=True,
            )
            self._writers.append(thread)
            thread.start()

    def _writer(self, name: str, home: str, users: list[str]) -> None:
        s = self.settings
        rng = random.Random(f"{s.seed}/{name}")
        backup = self.shape.partner(home)
        route = home
        prefix = contact_prefix(s.seed)
        domain = self.topology.domain
        n = 0
        while not self._stop_writers.is_set():
            n += 1
            user = users[rng.randrange(len(users))]
            contact = f"{prefix}{short_name(home)}-{n}@{domain}"
            inv = self.history.invoke(name, "write", user=user, contact=contact, pool=route)
            try:
                outcome, detail = self.lab.add_contact(route, user, contact, s.write_timeout)
            except Exception as exc:  # a bug in the driver: unknown, so info
                outcome, detail = "info", {"error": f"{type(exc).__name__}: {exc}"}
            self.history.complete(inv, OpType(outcome), **detail)
            if outcome != "ok" and backup is not None:
                # Refused or no answer: the users may be served by the other pool now.
                route = backup if route == home else home
            self._stop_writers.wait(s.write_interval)

    def _stop(self) -> None:
        self._stop_writers.set()
        for thread in self._writers:
            thread.join(timeout=self.settings.write_timeout + 10)
        self._writers = []

    # --- the end -------------------------------------------------------------------

    def _heal_all(self) -> None:
        inv = self.history.invoke("final", "heal-all")
        for attempt in range(1, HEAL_ATTEMPTS + 1):
            try:
                self.lab.heal_all()
            except Exception as exc:
                if attempt < HEAL_ATTEMPTS:
                    self.lab.sleep(2.0)
                    continue
                self.history.complete(inv, OpType.FAIL, error=f"{type(exc).__name__}: {exc}",
                                      attempts=attempt)
                self.progress(f"heal-all failed: {exc}")
                return
            self._handles.clear()
            self.history.complete(inv, OpType.OK, attempts=attempt)
            return

    def _final(self) -> None:
        s = self.settings
        for pool in sorted(self._failed_over):
            self.progress(f"failing back {pool}, still failed over")
            if self._admin(AdminStep(op="pool-failback", pool=pool),
                           retry_for=s.failback_retry, process="final"):
                self._failed_over.discard(pool)
        self.progress(f"waiting up to {s.home_bound:g} s for every client home in full service")
        start = self.lab.clock()
        inv = self.history.invoke("final", "clients-home", bound=s.home_bound)
        while True:
            total, full = self._home_full()
            waited = self.lab.clock() - start
            if total and full >= total:
                self.history.complete(inv, OpType.OK, total=total, home_full=full, waited=waited)
                break
            if waited >= s.home_bound:
                self.history.complete(inv, OpType.FAIL, total=total, home_full=full,
                                      waited=waited)
                break
            self.lab.sleep(0.5)
        for paired in self.topology.pools:
            if paired.backup:
                self._admin(AdminStep(op="backup-sync", pool=paired.fqdn), retry_for=10.0,
                            process="final")
        self._final_state()
        inv = self.history.invoke("final", "leftovers")
        try:
            found = self.lab.leftovers()
        except Exception as exc:
            self.history.complete(inv, OpType.FAIL, error=f"{type(exc).__name__}: {exc}")
        else:
            self.history.complete(inv, OpType.OK, found=found)

    def _final_state(self) -> None:
        written = sorted({
            str(op.value["user"]) for op in self.history.ops
            if op.f == "write" and op.type is OpType.INVOKE
        })
        homes = {u.uri: u.home_pool for u in self.topology.all_users()}
        prefix = contact_prefix(self.settings.seed)
        inv = self.history.invoke("final", "final-state", users=len(written))
        users: dict[str, Any] = {}
        try:
            for uri in written:
                home = homes[uri]
                record = self.lab.user_data(home, uri)
                serving = str(record.get("serving_pool") or home)
                lists = {home: [c for c in record.get("contacts", []) if c.startswith(prefix)]}
                other = self.shape.partner(home)
                for pool in {serving, other} - {home, None}:
                    assert pool is not None
                    data = self.lab.user_data(pool, uri)
                    lists[pool] = [c for c in data.get("contacts", []) if c.startswith(prefix)]
                users[uri] = {"serving": serving, "lists": lists}
        except Exception as exc:
            self.history.complete(inv, OpType.FAIL, error=f"{type(exc).__name__}: {exc}")
            return
        self.history.complete(inv, OpType.OK, users=users)

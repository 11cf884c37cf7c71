"""The checker: a verdict over a chaos run's history (a pure function).

Its inputs are all in the history (:mod:`.history`): the writes with their
acknowledgements (``seq``: the change's position in the acknowledging pool's
feed), the administrator operations with their reports (a failover's
``takeover_position``: how far the backup pool had applied the failed pool's
feed, i.e. the last completed sync; ``lost_writes``: its RPO count), the
clients' last observation, the final state read from the pools, and the
runtime's leftover-fault probe. The rules (docs/chaos.md):

``lost-synced-write``  an acknowledged write that a disaster-mode operation
                       should have kept (at or below its takeover position:
                       older than the last completed sync) is missing
``lost-write``         an acknowledged write is missing and no disaster-mode
                       operation explains it (lost outside the RPO)
``rpo-undercount``     an operation lost more of the run's writes than its RPO
                       count says (or never counted them)
``duplicate``          a contact twice in one user's list, or one write
                       acknowledged twice
``phantom-write``      a contact of this run in the final state that no write
                       asked for
``not-home``           clients not all home in full service, or not within the bound
``leftover-fault``     the probe found a fault still in place (iptables, tc,
                       paused containers, stopped processes, DNS faults, the journal)
``incomplete-history`` the final state, the clients' observation or the probe
                       is missing (the run stopped early): nothing can be said
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from sipdrill.orchestrator.chaos.history import HistoryOp, OpType


class Rule(StrEnum):
    LOST_SYNCED_WRITE = "lost-synced-write"
    LOST_WRITE = "lost-write"
    RPO_UNDERCOUNT = "rpo-undercount"
    DUPLICATE = "duplicate"
    PHANTOM = "phantom-write"
    NOT_HOME = "not-home"
    LEFTOVER_FAULT = "leftover-fault"
    INCOMPLETE = "incomplete-history"


@dataclass(frozen=True)
class Violation:
    rule: Rule
    message: str
    #: The history lines involved (their ``index``).
    ops: tuple[int, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"rule": self.rule.value, "message": self.message, "ops": list(self.ops)}


@dataclass(frozen=True)
class ChaosFigures:
    faults_injected: int = 0
    faults_refused: int = 0
    faults_healed: int = 0
    cms_failovers: int = 0
    pool_failovers: int = 0
    pool_failbacks: int = 0
    admin_refused: int = 0
    writes_invoked: int = 0
    writes_acknowledged: int = 0
    writes_refused: int = 0
    writes_indeterminate: int = 0
    #: Acknowledged writes looked for in the final state.
    writes_checked: int = 0
    writes_lost: int = 0
    lost_within_rpo: int = 0
    lost_outside_rpo: int = 0
    #: Acknowledged writes above a disaster-mode operation's takeover position:
    #: what the RPO puts at risk (they may come back with the pool that holds them).
    writes_at_risk: int = 0
    #: The operations' own RPO counts, summed (every change above the position).
    rpo_writes_reported: int = 0
    duplicates: int = 0
    leftovers: int = 0
    #: From the end of the nemesis to every client home in full service.
    clients_home_seconds: float | None = None


@dataclass(frozen=True)
class Verdict:
    valid: bool
    violations: tuple[Violation, ...]
    figures: ChaosFigures
    notes: tuple[str, ...] = ()

    def by_rule(self) -> dict[Rule, list[Violation]]:
        out: dict[Rule, list[Violation]] = {}
        for v in self.violations:
            out.setdefault(v.rule, []).append(v)
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "valid": self.valid,
            "violations": [v.to_json() for v in self.violations],
            "figures": asdict(self.figures),
            "notes": list(self.notes),
        }


@dataclass(frozen=True)
class _Write:
    invoke: HistoryOp
    done: HistoryOp | None

    @property
    def user(self) -> str:
        return str(self.invoke.value["user"])

    @property
    def contact(self) -> str:
        return str(self.invoke.value["contact"])

    @property
    def pool(self) -> str:
        return str((self.done or self.invoke).value.get("pool", ""))

    @property
    def seq(self) -> int | None:
        seq = self.done.value.get("seq") if self.done is not None else None
        return int(seq) if seq is not None else None


@dataclass
class _Lossy:
    """A disaster-mode operation: the writes ``pool`` acknowledged above
    ``position`` before it ended are not on the pool that serves afterwards."""

    op: HistoryOp
    pool: str
    home_pool: str
    position: int | None
    reported: int | None
    lost: list[_Write] = field(default_factory=list)


def _pair(ops: Sequence[HistoryOp]) -> list[tuple[HistoryOp, HistoryOp | None]]:
    """Each invoke with its completion (the next line of the same process and f)."""
    open_: dict[tuple[str, str], HistoryOp] = {}
    out: list[tuple[HistoryOp, HistoryOp | None]] = []
    for op in ops:
        key = (op.process, op.f)
        if op.type is OpType.INVOKE:
            if key in open_:
                out.append((open_[key], None))
            open_[key] = op
        elif op.type in (OpType.OK, OpType.FAIL, OpType.INFO):
            invoked = open_.pop(key, None)
            if invoked is None:
                invoked = op  # a completion with no invoke: take it as its own
            out.append((invoked, op))
    out.extend((inv, None) for inv in open_.values())
    out.sort(key=lambda pair: pair[0].index)
    return out


def _lossy_operations(pairs: Sequence[tuple[HistoryOp, HistoryOp | None]]) -> list[_Lossy]:
    lossy: list[_Lossy] = []
    admin = [
        (inv, done) for inv, done in pairs
        if inv.f in ("pool-failover", "pool-failback")
        and done is not None and done.type is OpType.OK
    ]
    for i, (_inv, done) in enumerate(admin):
        assert done is not None
        result = done.value.get("result") or {}
        if not result.get("disaster_mode"):
            continue
        home = str(result.get("home_pool", ""))
        position = result.get("takeover_position")
        reported = result.get("lost_writes")
        if done.f == "pool-failover":
            if reported is None:
                # Counted when the pool came back: the next failback of this pool.
                for _i2, later in admin[i + 1 :]:
                    assert later is not None
                    r = later.value.get("result") or {}
                    if later.f == "pool-failback" and r.get("home_pool") == home:
                        reported = r.get("failover_lost_writes")
                        break
            lossy.append(_Lossy(done, home, home, position, reported))
        elif reported != 0 and position is not None:
            lossy.append(_Lossy(done, str(result.get("backup_pool", "")), home, position, reported))
    return lossy


def _last(pairs: Sequence[tuple[HistoryOp, HistoryOp | None]], f: str) -> HistoryOp | None:
    found = [done for inv, done in pairs if inv.f == f and done is not None]
    return found[-1] if found else None


def check(ops: Sequence[HistoryOp], *, home_bound: float | None = None) -> Verdict:
    """The verdict over a history. ``home_bound`` (seconds from the end of the
    nemesis to every client home in full service) defaults to the header's."""
    meta = next((o for o in ops if o.type is OpType.META), None)
    header: Mapping[str, Any] = meta.value if meta is not None else {}
    if home_bound is None:
        home_bound = header.get("home_bound")
    prefix = str(header.get("contact_prefix", ""))
    pairs = _pair([o for o in ops if o.type is not OpType.META])
    violations: list[Violation] = []
    notes: list[str] = []

    def done_of(f: str, type_: OpType) -> int:
        return sum(1 for inv, d in pairs if inv.f == f and d is not None and d.type is type_)

    writes = [_Write(inv, done) for inv, done in pairs if inv.f == "write"]
    acked = [w for w in writes if w.done is not None and w.done.type is OpType.OK]

    # --- duplicates among the acknowledgements -------------------------------------
    for contact, n in Counter(w.contact for w in acked).items():
        if n > 1:
            violations.append(Violation(
                Rule.DUPLICATE, f"{contact} acknowledged {n} times",
                tuple(w.invoke.index for w in acked if w.contact == contact),
            ))

    # --- the final state -------------------------------------------------------------
    final = _last(pairs, "final-state")
    lists: dict[str, list[str]] = {}
    if final is None or final.type is not OpType.OK:
        violations.append(Violation(
            Rule.INCOMPLETE,
            "no final state was read from the pools: lost writes cannot be checked"
            + (f" ({final.value.get('error')})" if final is not None else ""),
            (final.index,) if final is not None else (),
        ))
    else:
        for user, row in (final.value.get("users") or {}).items():
            serving = row.get("serving")
            got = (row.get("lists") or {}).get(serving)
            if got is None:
                violations.append(Violation(
                    Rule.INCOMPLETE, f"{user}: no contact list from {serving}", (final.index,)
                ))
                continue
            lists[user] = list(got)
            for contact, n in Counter(got).items():
                if n > 1:
                    violations.append(Violation(
                        Rule.DUPLICATE, f"{user} has {contact} {n} times on {serving}",
                        (final.index,),
                    ))

    invoked = {w.contact for w in writes}
    if prefix:
        for user, got in lists.items():
            for contact in sorted(set(got)):
                if contact.startswith(prefix) and contact not in invoked:
                    violations.append(Violation(
                        Rule.PHANTOM, f"{user} has {contact}, which no write asked for",
                        (final.index,) if final is not None else (),
                    ))

    # --- lost writes, and the RPO --------------------------------------------------
    lossy = _lossy_operations(pairs)
    at_risk = 0
    for w in acked:
        assert w.done is not None
        ack_t = w.done.t
        cover = next((L for L in lossy if L.pool == w.pool and L.op.t >= ack_t), None)
        if cover is not None and cover.position is not None and (w.seq or 0) > cover.position:
            at_risk += 1
    lost: list[_Write] = []
    within = 0
    outside = 0
    checked = 0
    if final is not None and final.type is OpType.OK:
        for w in acked:
            if w.user not in lists:
                continue  # said above: no list for this user
            checked += 1
            if w.contact in lists[w.user]:
                continue
            lost.append(w)
            assert w.done is not None
            cover = next((L for L in lossy if L.pool == w.pool and L.op.t >= w.done.t), None)
            where = f"{w.contact} (seq {w.seq} on {w.pool}, acknowledged at {w.done.t:.1f} s)"
            if cover is None:
                outside += 1
                violations.append(Violation(
                    Rule.LOST_WRITE,
                    f"{w.user} lost {where}: no disaster-mode operation explains it",
                    (w.invoke.index, w.done.index),
                ))
            elif cover.position is None or w.seq is None or w.seq <= cover.position:
                outside += 1
                violations.append(Violation(
                    Rule.LOST_SYNCED_WRITE,
                    f"{w.user} lost {where}, older than the last completed sync before "
                    f"{cover.op.f} of {cover.home_pool} at {cover.op.t:.1f} s "
                    f"(takeover position {cover.position})",
                    (w.invoke.index, w.done.index, cover.op.index),
                ))
            else:
                within += 1
                cover.lost.append(w)
    reported_total = 0
    for L in lossy:
        if L.reported is not None:
            reported_total += int(L.reported)
        if not L.lost:
            continue
        if L.reported is None:
            violations.append(Violation(
                Rule.RPO_UNDERCOUNT,
                f"{L.op.f} of {L.home_pool} at {L.op.t:.1f} s lost {len(L.lost)} write(s) "
                "and never counted them",
                (L.op.index, *(w.invoke.index for w in L.lost)),
            ))
        elif len(L.lost) > int(L.reported):
            violations.append(Violation(
                Rule.RPO_UNDERCOUNT,
                f"{L.op.f} of {L.home_pool} at {L.op.t:.1f} s lost {len(L.lost)} write(s); "
                f"its RPO count says {L.reported}",
                (L.op.index, *(w.invoke.index for w in L.lost)),
            ))

    # --- the clients ---------------------------------------------------------------
    home = _last(pairs, "clients-home")
    home_seconds: float | None = None
    if home is None:
        violations.append(Violation(Rule.INCOMPLETE, "the clients were never observed at the end"))
    else:
        total, full = int(home.value.get("total", 0)), int(home.value.get("home_full", 0))
        waited = home.value.get("waited")
        if home.type is OpType.OK and full >= total:
            home_seconds = float(waited) if waited is not None else None
        if home.type is not OpType.OK or full < total:
            violations.append(Violation(
                Rule.NOT_HOME,
                f"{full} of {total} clients home in full service after "
                f"{float(waited or 0):.1f} s",
                (home.index,),
            ))
        elif home_bound is not None and home_seconds is not None and home_seconds > home_bound:
            violations.append(Violation(
                Rule.NOT_HOME,
                f"every client home in full service after {home_seconds:.1f} s, "
                f"beyond the bound of {home_bound:g} s",
                (home.index,),
            ))

    # --- faults left behind ------------------------------------------------------------
    probe = _last(pairs, "leftovers")
    found: list[str] = []
    if probe is None or probe.type is not OpType.OK:
        violations.append(Violation(
            Rule.INCOMPLETE, "the runtime was not probed for leftover faults",
            (probe.index,) if probe is not None else (),
        ))
    else:
        found = [str(x) for x in probe.value.get("found") or []]
        violations.extend(Violation(Rule.LEFTOVER_FAULT, what, (probe.index,)) for what in found)
    heal_all = _last(pairs, "heal-all")
    if heal_all is not None and heal_all.type is not OpType.OK:
        notes.append(f"heal-all failed: {heal_all.value.get('error')}")

    figures = ChaosFigures(
        faults_injected=done_of("fault", OpType.OK),
        faults_refused=done_of("fault", OpType.FAIL) + done_of("fault", OpType.INFO),
        faults_healed=done_of("heal", OpType.OK),
        cms_failovers=done_of("cms-failover", OpType.OK),
        pool_failovers=done_of("pool-failover", OpType.OK),
        pool_failbacks=done_of("pool-failback", OpType.OK),
        admin_refused=sum(
            done_of(f, OpType.FAIL) + done_of(f, OpType.INFO)
            for f in ("cms-failover", "pool-failover", "pool-failback")
        ),
        writes_invoked=len(writes),
        writes_acknowledged=len(acked),
        writes_refused=sum(1 for w in writes if w.done is not None and w.done.type is OpType.FAIL),
        writes_indeterminate=sum(
            1 for w in writes if w.done is None or w.done.type is OpType.INFO
        ),
        writes_checked=checked,
        writes_lost=len(lost),
        lost_within_rpo=within,
        lost_outside_rpo=outside,
        writes_at_risk=at_risk,
        rpo_writes_reported=reported_total,
        duplicates=sum(1 for v in violations if v.rule is Rule.DUPLICATE),
        leftovers=len(found),
        clients_home_seconds=home_seconds,
    )
    return Verdict(not violations, tuple(violations), figures, tuple(notes))

"""The chaos checker on histories built by hand: a clean one passes; a planted
loss, a planted duplicate and a planted leftover fault are each caught."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from sipdrill.cli import app
from sipdrill.orchestrator.chaos.checker import Rule, check
from sipdrill.orchestrator.chaos.history import (
    History,
    HistoryOp,
    OpType,
    dump_history,
    load_history,
)

P1, P2 = "pool1.lab.local", "pool2.lab.local"
PREFIX = "sip:chaos-1-"
ALICE, BOB = "sip:alice@lab.local", "sip:bob@lab.local"


class Builder:
    """A history on a fake clock: each call moves time on by one second."""

    def __init__(self) -> None:
        self.now = 0.0
        self.h = History(None, lambda: self.now, lambda: 1_700_000_000 + self.now)
        self.n = itertools.count(1)
        self.h.add("nemesis", OpType.META, "meta", seed=1, contact_prefix=PREFIX, home_bound=60)
        self.final: dict[str, dict[str, Any]] = {}

    def tick(self) -> None:
        self.now += 1.0

    def write(self, user: str, pool: str, seq: int | None, outcome: OpType = OpType.OK) -> str:
        contact = f"{PREFIX}{next(self.n)}@lab.local"
        inv = self.h.invoke(f"writer-{pool[:5]}", "write", user=user, contact=contact, pool=pool)
        self.tick()
        result: dict[str, Any] = {"seq": seq} if outcome is OpType.OK else {"error": "x"}
        self.h.complete(inv, outcome, **result)
        self.tick()
        return contact

    def admin(self, f: str, **result: Any) -> None:
        inv = self.h.invoke("nemesis", f, pool=result.get("home_pool"))
        self.tick()
        self.h.complete(inv, OpType.OK, result=result)
        self.tick()

    def fault(self, kind: str, target: str) -> None:
        inv = self.h.invoke("nemesis", "fault", id="f001", kind=kind, target=target)
        self.h.complete(inv, OpType.OK, handle="abcd1234")
        self.tick()
        inv = self.h.invoke("nemesis", "heal", id="f001")
        self.h.complete(inv, OpType.OK)
        self.tick()

    def has(self, user: str, *contacts: str, serving: str = P1) -> None:
        row = self.final.setdefault(user, {"serving": serving, "lists": {serving: []}})
        row["lists"][serving].extend(contacts)

    def end(self, leftovers: tuple[str, ...] = (), home_full: int = 10, waited: float = 12.0
            ) -> list[HistoryOp]:
        inv = self.h.invoke("final", "heal-all")
        self.h.complete(inv, OpType.OK)
        inv = self.h.invoke("final", "clients-home", bound=60)
        self.h.complete(inv, OpType.OK if home_full == 10 else OpType.FAIL,
                        total=10, home_full=home_full, waited=waited)
        inv = self.h.invoke("final", "final-state")
        self.h.complete(inv, OpType.OK, users=self.final)
        inv = self.h.invoke("final", "leftovers")
        self.h.complete(inv, OpType.OK, found=list(leftovers))
        return self.h.ops


def disaster_run(b: Builder) -> tuple[str, str, str]:
    """Two writes synced (seq 1, 2), one after the last sync (seq 3), then
    pool1 cut and failed over in disaster mode (takeover at 2, RPO 1), a
    write on pool2, the heal and the failback."""
    a = b.write(ALICE, P1, 1)
    c = b.write(ALICE, P1, 2)
    late = b.write(ALICE, P1, 3)
    b.fault("cut", "pool1")
    b.admin("pool-failover", home_pool=P1, backup_pool=P2, disaster_mode=True,
            takeover_position=2, lost_writes=None)
    b.write(BOB, P2, 7)
    b.admin("pool-failback", home_pool=P1, backup_pool=P2, disaster_mode=False,
            failover_lost_writes=1, lost_writes=0)
    return a, c, late


def test_a_clean_history_is_valid() -> None:
    b = Builder()
    a, c, late = disaster_run(b)
    bob = [op.value["contact"] for op in b.h.ops if op.f == "write" and op.value["user"] == BOB]
    b.has(ALICE, a, c, late)
    b.has(BOB, bob[0])
    verdict = check(b.end())
    assert verdict.valid, verdict.violations
    f = verdict.figures
    assert (f.writes_acknowledged, f.writes_checked, f.writes_lost) == (4, 4, 0)
    assert f.pool_failovers == 1 and f.pool_failbacks == 1 and f.faults_injected == 1
    assert f.writes_at_risk == 1  # seq 3, above the takeover position
    assert f.rpo_writes_reported == 1 and f.clients_home_seconds == 12.0


def test_a_write_lost_after_the_last_sync_is_within_the_rpo() -> None:
    b = Builder()
    a, c, _late = disaster_run(b)
    b.has(ALICE, a, c)  # seq 3 never came back: counted by the failback (1)
    b.has(BOB, *[op.value["contact"] for op in b.h.ops if op.value.get("user") == BOB][:1])
    verdict = check(b.end())
    assert verdict.valid, verdict.violations
    assert verdict.figures.lost_within_rpo == 1 and verdict.figures.lost_outside_rpo == 0


def test_planted_loss_of_a_synced_write_is_caught() -> None:
    b = Builder()
    a, _c, late = disaster_run(b)
    b.has(ALICE, a, late)  # seq 2 was synced before the failover: it may not go
    b.has(BOB, *[op.value["contact"] for op in b.h.ops if op.value.get("user") == BOB][:1])
    verdict = check(b.end())
    assert not verdict.valid
    assert [v.rule for v in verdict.violations] == [Rule.LOST_SYNCED_WRITE]
    assert "seq 2" in verdict.violations[0].message
    assert verdict.figures.lost_outside_rpo == 1


def test_planted_loss_with_no_failover_is_caught() -> None:
    b = Builder()
    kept = b.write(ALICE, P1, 1)
    b.write(ALICE, P1, 2)
    b.has(ALICE, kept)
    verdict = check(b.end())
    assert [v.rule for v in verdict.violations] == [Rule.LOST_WRITE]


def test_losses_beyond_the_rpo_count_are_caught() -> None:
    b = Builder()
    a = b.write(ALICE, P1, 1)
    b.write(ALICE, P1, 2)
    b.write(ALICE, P1, 3)
    b.admin("pool-failover", home_pool=P1, backup_pool=P2, disaster_mode=True,
            takeover_position=1, lost_writes=1)
    b.has(ALICE, a)  # two lost above the position, the operation counted one
    verdict = check(b.end())
    assert [v.rule for v in verdict.violations] == [Rule.RPO_UNDERCOUNT]


def test_planted_duplicate_is_caught() -> None:
    b = Builder()
    a, c, late = disaster_run(b)
    b.has(ALICE, a, c, late, c)
    b.has(BOB, *[op.value["contact"] for op in b.h.ops if op.value.get("user") == BOB][:1])
    verdict = check(b.end())
    assert [v.rule for v in verdict.violations] == [Rule.DUPLICATE]
    assert verdict.figures.duplicates == 1


def test_a_write_acknowledged_twice_is_a_duplicate() -> None:
    b = Builder()
    a = b.write(ALICE, P1, 1)
    inv = b.h.invoke("writer-pool1", "write", user=ALICE, contact=a, pool=P1)
    b.h.complete(inv, OpType.OK, seq=2)
    b.has(ALICE, a)
    assert [v.rule for v in check(b.end()).violations] == [Rule.DUPLICATE]


def test_planted_leftover_fault_is_caught() -> None:
    b = Builder()
    a = b.write(ALICE, P1, 1)
    b.has(ALICE, a)
    verdict = check(b.end(leftovers=("pool1: stopped (SIGSTOP)", "pool2: iptables chain x")))
    assert [v.rule for v in verdict.violations] == [Rule.LEFTOVER_FAULT] * 2
    assert verdict.figures.leftovers == 2


def test_a_phantom_write_is_caught() -> None:
    b = Builder()
    a = b.write(ALICE, P1, 1)
    b.has(ALICE, a, f"{PREFIX}999@lab.local", "sip:carol@lab.local")
    assert [v.rule for v in check(b.end()).violations] == [Rule.PHANTOM]


def test_indeterminate_writes_may_or_may_not_be_there() -> None:
    b = Builder()
    maybe = b.write(ALICE, P1, None, OpType.INFO)
    b.write(ALICE, P1, None, OpType.INFO)
    refused = b.write(ALICE, P1, None, OpType.FAIL)
    b.has(ALICE, maybe)
    verdict = check(b.end())
    assert verdict.valid, verdict.violations
    assert verdict.figures.writes_indeterminate == 2 and verdict.figures.writes_refused == 1
    assert refused not in maybe


def test_clients_not_home_or_late_are_caught() -> None:
    b = Builder()
    assert [v.rule for v in check(b.end(home_full=7, waited=60.0)).violations] == [Rule.NOT_HOME]
    b = Builder()
    verdict = check(b.end(waited=75.0))  # the header's bound is 60 s
    assert [v.rule for v in verdict.violations] == [Rule.NOT_HOME]
    assert check(b.h.ops, home_bound=80).valid


def test_a_history_cut_short_says_so() -> None:
    b = Builder()
    b.write(ALICE, P1, 1)
    verdict = check(b.h.ops)
    assert not verdict.valid
    assert {v.rule for v in verdict.violations} == {Rule.INCOMPLETE}


def test_the_history_file_round_trips_and_chaos_check_reads_it(tmp_path: Path) -> None:
    b = Builder()
    a = b.write(ALICE, P1, 1)
    lost = b.write(ALICE, P1, 2)
    b.has(ALICE, a)
    ops = b.end()
    path = tmp_path / "history.jsonl"
    dump_history(ops, path)
    assert load_history(path) == ops
    result = CliRunner().invoke(app, ["chaos", "check", str(path)])
    assert result.exit_code == 1, result.output
    assert "lost-write" in result.output and lost in result.output
    (tmp_path / "bad.jsonl").write_text('{"index": 0}\n')
    result = CliRunner().invoke(app, ["chaos", "check", str(tmp_path / "bad.jsonl")])
    # Unwrapped: rich breaks the line at 80 columns, and where depends on the
    # length of tmp_path (longer under an xdist worker: .../popen-gw1/...).
    assert result.exit_code == 2 and "bad.jsonl:1" in result.output.replace("\n", "")


@pytest.mark.parametrize("rule", list(Rule))
def test_every_rule_is_documented(rule: Rule) -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs/chaos.md").read_text()
    assert f"`{rule.value}`" in doc

"""The nemesis: a pure, seeded schedule; the same seed gives the same
operations, and every schedule keeps the ordering rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from sipdrill.orchestrator.chaos.nemesis import (
    DOWN_KINDS,
    LabShape,
    NemesisConfig,
    NemesisOp,
    NemesisOpKind,
    fault_kinds,
    ordering_problems,
    schedule,
)
from sipdrill.orchestrator.fault_model import RUNTIME_FAULTS, FaultKind
from sipdrill.orchestrator.plan import RuntimeKind
from sipdrill.topology import load_topology

ROOT = Path(__file__).resolve().parents[2]
SHAPE = LabShape.from_topology(load_topology(ROOT / "topologies/paired-pools.yaml").topology)
P1, P2 = "pool1.lab.local", "pool2.lab.local"


def test_shape_of_paired_pools() -> None:
    assert SHAPE.partner(P1) == P2 and SHAPE.partner(P2) == P1
    assert SHAPE.members("site1") == {"pool1", "backup-pool1"}
    assert SHAPE.pools_down(FaultKind.CUT, "site1") == {P1}
    assert SHAPE.pools_down(FaultKind.CUT, "backup-pool1") == frozenset()
    assert SHAPE.pools_down(FaultKind.DEGRADE, "pool1") == frozenset()
    assert SHAPE.cms_active == P1


@pytest.mark.parametrize("runtime", list(RuntimeKind))
def test_the_same_seed_gives_the_same_schedule(runtime: RuntimeKind) -> None:
    config = NemesisConfig(duration=300)
    first = schedule(42, SHAPE, config, runtime)
    assert first == schedule(42, SHAPE, config, runtime)
    assert first != schedule(43, SHAPE, config, runtime)
    assert [op.to_json() for op in first] == [op.to_json() for op in schedule(42, SHAPE, config,
                                                                              runtime)]


@pytest.mark.parametrize("runtime", list(RuntimeKind))
@pytest.mark.parametrize("concurrent", [1, 2, 3])
def test_every_schedule_keeps_the_rules(runtime: RuntimeKind, concurrent: int) -> None:
    config = NemesisConfig(duration=400, max_concurrent=concurrent, failover_probability=0.9)
    failovers = 0
    for seed in range(60):
        ops = schedule(seed, SHAPE, config, runtime)
        assert ordering_problems(ops, SHAPE) == [], seed
        assert [op.at for op in ops] == sorted(op.at for op in ops)
        faults = [op for op in ops if op.op is NemesisOpKind.FAULT]
        heals = {op.fault_id: op.at for op in ops if op.op is NemesisOpKind.HEAL}
        for f in faults:
            assert f.kind in RUNTIME_FAULTS[runtime]
            assert not (f.target or "").startswith("clients")
            assert f.fault_id in heals and heals[f.fault_id] <= config.duration
        failovers += sum(op.op is NemesisOpKind.POOL_FAILOVER for op in ops)
    assert failovers > 20  # the rule leaves room for failovers


def test_a_failover_only_for_a_pool_that_is_down_and_always_failed_back() -> None:
    config = NemesisConfig(duration=600, max_concurrent=1, failover_probability=1.0)
    ops = schedule(5, SHAPE, config, RuntimeKind.DOCKER)
    active: dict[str, NemesisOp] = {}
    failed_over: set[str] = set()
    for op in ops:
        if op.op is NemesisOpKind.FAULT:
            active[op.fault_id or ""] = op
        elif op.op is NemesisOpKind.HEAL:
            active.pop(op.fault_id or "")
        elif op.op is NemesisOpKind.POOL_FAILOVER:
            down = {p for f in active.values() for p in SHAPE.pools_down(f.kind, f.target)}  # type: ignore[arg-type]
            assert op.pool in down and op.disaster_mode
            failed_over.add(op.pool or "")
        elif op.op is NemesisOpKind.POOL_FAILBACK:
            failed_over.remove(op.pool or "")
    assert not failed_over and not active


def test_the_cms_fails_over_first_when_its_master_is_down() -> None:
    config = NemesisConfig(duration=600, failover_probability=1.0, kinds=(FaultKind.CUT,))
    ops = schedule(1, SHAPE, config, RuntimeKind.LOCAL)
    first = next(i for i, op in enumerate(ops) if op.op is NemesisOpKind.POOL_FAILOVER)
    if ops[first].pool == P1:  # the CMS master starts on pool1
        assert ops[first - 1].op is NemesisOpKind.CMS_FAILOVER


def test_max_faults_and_kinds() -> None:
    config = NemesisConfig(duration=10_000, max_faults=100, kinds=(FaultKind.CRASH,))
    ops = schedule(3, SHAPE, config, RuntimeKind.LOCAL)
    faults = [op for op in ops if op.op is NemesisOpKind.FAULT]
    assert len(faults) == 100
    assert {f.kind for f in faults} == {FaultKind.CRASH}
    with pytest.raises(ValueError, match="cannot do partition"):
        fault_kinds(RuntimeKind.LOCAL, [FaultKind.PARTITION])
    assert set(fault_kinds(RuntimeKind.DOCKER)) == set(FaultKind)


def test_ordering_problems_catches_a_schedule_that_breaks_the_rule() -> None:
    bad = [
        NemesisOp(1, NemesisOpKind.FAULT, "a", FaultKind.CUT, "site1"),
        NemesisOp(2, NemesisOpKind.FAULT, "b", FaultKind.CUT, "pool2"),
        # pool2 (pool1's backup) is down: nowhere to fail pool1 over to
        NemesisOp(3, NemesisOpKind.POOL_FAILOVER, pool=P1, disaster_mode=True),
        NemesisOp(4, NemesisOpKind.HEAL, "a"),
    ]
    problems = ordering_problems(bad, SHAPE)
    assert any("breaks the ordering rule" in p for p in problems)
    assert any("never healed: b" in p for p in problems)
    assert any("never failed back" in p for p in problems)


def test_faults_that_take_a_pool_down() -> None:
    assert {FaultKind.CUT, FaultKind.CRASH, FaultKind.PAUSE} <= DOWN_KINDS
    assert FaultKind.DNS_OUTAGE not in DOWN_KINDS and FaultKind.RESTART not in DOWN_KINDS


def test_bad_configs_are_refused() -> None:
    with pytest.raises(ValueError, match="gap"):
        NemesisConfig(gap=(5, 1))
    with pytest.raises(ValueError, match="max_concurrent"):
        NemesisConfig(max_concurrent=0)

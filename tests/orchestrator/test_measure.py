"""Per-client measurements on synthetic timelines: exact numbers, edge cases."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sipdrill.orchestrator.measure import (
    cdf_points,
    distribution,
    is_known_metric,
    measure,
    percentile,
)
from sipdrill.orchestrator.timeline import EventCollector, MarkKind, Timeline

P1, P2 = "pool1.lab.local", "pool2.lab.local"
A, B, C = "sip:a@lab.local", "sip:b@lab.local", "sip:c@lab.local"
T0 = 1_800_000_000.0


def line(user: str, t: float, event: str, **fields: Any) -> str:
    return json.dumps({"event": event, "seq": 0, "user": user, "wall": T0 + t, **fields})


def mode(user: str, t: float, old: str, new: str, pool: str | None = None) -> str:
    return line(user, t, "ModeChanged", old=old, new=new, pool=pool, trigger="x")


def signed_in(user: str, pool: str, t: float = 1.0) -> list[str]:
    return [
        mode(user, t - 0.5, "SignedOut", "Discovering"),
        mode(user, t - 0.2, "Discovering", "SigningIn", pool),
        mode(user, t, "SigningIn", "FullService", pool),
        line(user, t, "Registered", pool=pool, mode="FullService", refresh=False),
    ]


def timeline(homes: dict[str, str] | None = None) -> Timeline:
    return Timeline(T0, homes or {A: P1, B: P1, C: P2}, io.StringIO())


def fault(tl: Timeline, t: float, fid: str = "site1-loss") -> None:
    tl.mark(MarkKind.FAULT, t, T0 + t, "cut site1", id=fid, kind="cut", target="site1")


def heal(tl: Timeline, t: float, fid: str = "site1-loss") -> None:
    tl.mark(MarkKind.HEAL, t, T0 + t, f"heal {fid}", id=fid, kind="cut", target="site1")


def admin(tl: Timeline, start: float, end: float, op: str, **result: Any) -> None:
    tl.mark(
        MarkKind.ADMIN,
        end,
        T0 + end,
        op,
        op=op,
        pool=P1,
        start=start,
        end=end,
        ok=True,
        result=result,
    )


def site_loss(tl: Timeline) -> None:
    """A recovers through a pool failover and goes home; B never recovers; C
    (pool2) never notices."""
    tl.ingest("clients-1", signed_in(A, P1) + signed_in(B, P1) + signed_in(C, P2))
    fault(tl, 10.0)
    tl.ingest(
        "clients-1",
        [
            line(A, 20.0, "TargetFailed", pool=P1, failure="pong-timeout"),
            mode(A, 20.0, "FullService", "Discovering", P1),
            mode(A, 20.0, "Discovering", "SigningIn", P1),
            mode(B, 22.0, "FullService", "Discovering", P1),
            line(A, 25.0, "TargetFailed", pool=P1, failure="connect-timeout"),
            line(A, 26.0, "Redirected", pool=P2, status_code=301, targets=[P1, P2]),
            line(A, 26.0, "RetryScheduled", pool=P2, delay=30.0, failures=1),
            mode(A, 26.0, "SigningIn", "BackingOff", P2),
            mode(B, 26.0, "Discovering", "BackingOff"),
            mode(A, 56.0, "BackingOff", "Discovering", P2),
            mode(A, 56.0, "Discovering", "SigningIn", P2),
            mode(A, 60.0, "SigningIn", "ResiliencyMode", P2),
            line(A, 60.0, "Registered", pool=P2, mode="ResiliencyMode", refresh=False),
            line(A, 70.0, "Registered", pool=P2, mode="ResiliencyMode", refresh=True),
        ],
    )
    admin(tl, 70.0, 80.0, "pool-failover", lost_writes=None)
    tl.ingest("clients-1", [mode(A, 85.0, "ResiliencyMode", "FullService", P2)])
    heal(tl, 100.0)
    admin(tl, 110.0, 120.0, "pool-failback", failover_lost_writes=2)
    tl.ingest(
        "clients-1",
        [
            mode(A, 130.0, "FullService", "Discovering", P2),
            mode(A, 130.5, "Discovering", "SigningIn", P1),
            mode(A, 131.0, "SigningIn", "FullService", P1),
        ],
    )


def test_site_loss_per_client_times_are_exact() -> None:
    tl = timeline()
    site_loss(tl)
    m = measure(tl, 140.0)
    rows = {r.user: r for r in m.rows}
    a = rows[A]
    assert a.affected and a.mode_before == "FullService" and a.lost_at == 20.0
    assert a.detect == 10.0
    assert a.reconnect == 50.0 and a.first_pool == P2
    assert a.resiliency == 50.0
    assert a.full_service == 75.0 and a.full_pool == P2
    assert a.full_after_failover == 15.0  # from the failover's start (70)
    assert a.home == 31.0
    assert a.home_after_failback == 21.0  # from the failback's start (110)
    # failed P1, failed P1, redirected by P2, registered on P2: the refresh is no attempt.
    assert (a.attempts, a.redirects, a.backoffs, a.backoff) == (4, 1, 1, 30.0)
    # Lost service at the cut, and again for a moment when sent home after the failback.
    assert a.pools_tried == (P1, P2) and a.losses == 2
    b = rows[B]
    assert b.affected and b.detect == 12.0 and b.reconnect is None and b.full_service is None
    assert b.home is None
    assert not rows[C].affected
    (f,) = m.faults
    assert (f.clients, f.affected, f.unaffected, f.not_recovered) == (3, 2, 1, 1)
    assert f.rto is None and m.rto is None  # B never got full service
    d = m.distributions
    assert (d["reconnect"].count, d["reconnect"].missing, d["reconnect"].max) == (1, 1, 50.0)
    assert (d["detect"].count, d["detect"].min, d["detect"].max) == (2, 10.0, 12.0)
    assert d["full_after_failover"].count == 1 and d["full_after_failover"].missing == 0
    assert m.value("reconnect.p95") == 50.0 and m.value("detect.missing") == 0
    assert m.value("rto") is None and m.value("bogus.p50") is None
    assert set(f.by_pool) == {P1}


def test_rto_is_the_last_client_in_full_service() -> None:
    tl = timeline()
    site_loss(tl)
    tl.ingest("clients-1", [mode(B, 90.0, "BackingOff", "FullService", P2)])
    m = measure(tl, 140.0)
    assert m.rto == 80.0  # B: full service at 90, the fault at 10
    assert m.faults[0].not_recovered == 0


def test_rpo_counts_what_the_failback_told_and_the_age_of_the_oldest() -> None:
    tl = timeline()
    tl.acknowledged_writes(P1, [T0 + 2.0, T0 + 3.0, T0 + 4.0, T0 + 5.0])
    site_loss(tl)
    m = measure(tl, 140.0)
    # The failover could not tell (P1 unreachable); the failback counted 2 lost:
    # the two newest acknowledged writes (4 s and 5 s), the oldest 6 s old at the fault.
    assert m.rpo_writes == 2 and m.rpo_seconds == 6.0
    assert any("2 acknowledged write(s)" in n for n in m.rpo_notes)


def test_rpo_unknown_when_the_pool_never_told() -> None:
    tl = timeline()
    tl.ingest("clients-1", signed_in(A, P1))
    fault(tl, 10.0)
    admin(tl, 20.0, 30.0, "pool-failover", lost_writes=None)
    m = measure(tl, 40.0)
    assert m.rpo_writes is None and "never came back" in m.rpo_notes[0]


def test_no_failover_loses_nothing() -> None:
    tl = timeline()
    tl.ingest("clients-1", signed_in(A, P1))
    m = measure(tl, 40.0)
    assert (m.rpo_writes, m.rpo_seconds, m.rto, m.faults) == (0, 0.0, None, [])


def budget_dr(tl: Timeline, export_seq: int, *, imported: bool = True) -> None:
    """Seed 001: writes on pool1 (seqs 101..105 acknowledged at 2..6 s), the
    site cut at 10 s, every user of pool1 force-moved to pool2 at 30 s and the
    export of pool1 at ``export_seq`` imported there at 40 s."""
    tl.acknowledged_writes(P1, [T0 + 2.0 + i for i in range(5)], [101 + i for i in range(5)])
    tl.acknowledged_writes(P2, [T0 + 3.0], [7])  # another pool's: never counted here
    tl.ingest("clients-1", signed_in(A, P1))
    fault(tl, 10.0)
    moved = {"operation": "move-all", "force": True, "source_pool": P1, "target_pool": P2,
             "moved": 202, "contacts_lost": 1616}
    admin(tl, 30.0, 35.0, "user-move", **moved)
    if imported:
        export = {"pool": P1, "seq": export_seq, "created": T0 + 3.5}
        admin(tl, 40.0, 41.0, "user-import", users_restored=202, export=export)


@pytest.mark.parametrize(("export_seq", "lost", "age"), [(102, 3, 6.0), (105, 0, 0.0)])
def test_budget_dr_loses_exactly_the_writes_after_the_restored_export(
    export_seq: int, lost: int, age: float
) -> None:
    tl = timeline()
    budget_dr(tl, export_seq)
    m = measure(tl, 60.0)
    # Seqs 103, 104, 105 (acknowledged at 4, 5, 6 s) are above the export's 102:
    # the oldest was 6 s old when the site was cut at 10 s.
    assert (m.rpo_writes, m.rpo_seconds) == (lost, age)
    (note,) = m.rpo_notes
    assert f"as of seq {export_seq}: {lost} acknowledged write(s) of the drill lost" in note


def test_budget_dr_counts_by_time_when_the_seqs_are_unknown() -> None:
    tl = timeline()
    tl.acknowledged_writes(P1, [T0 + 2.0, T0 + 3.0, T0 + 4.0])
    fault(tl, 10.0)
    admin(tl, 40.0, 41.0, "user-import", export={"pool": P1, "seq": 1, "created": T0 + 2.5})
    m = measure(tl, 60.0)
    assert (m.rpo_writes, m.rpo_seconds) == (2, 7.0)
    assert "by time" in m.rpo_notes[0]


def test_a_forced_move_with_no_import_loses_every_write() -> None:
    tl = timeline()
    budget_dr(tl, 0, imported=False)
    m = measure(tl, 60.0)
    assert (m.rpo_writes, m.rpo_seconds) == (5, 8.0)
    assert "no export of pool1.lab.local was imported" in m.rpo_notes[0]
    assert "1616 contacts counted by the move" in m.rpo_notes[0]


def test_a_flapping_client_counts_from_its_first_loss() -> None:
    tl = timeline({A: P1})
    tl.ingest("clients-1", signed_in(A, P1))
    fault(tl, 10.0)
    tl.ingest(
        "clients-1",
        [
            mode(A, 15.0, "FullService", "Discovering", P1),
            mode(A, 30.0, "Discovering", "ResiliencyMode", P2),
            mode(A, 40.0, "ResiliencyMode", "Discovering", P2),
            mode(A, 50.0, "Discovering", "ResiliencyMode", P2),
            mode(A, 70.0, "ResiliencyMode", "FullService", P2),
        ],
    )
    (row,) = measure(tl, 80.0).rows
    assert (row.detect, row.reconnect, row.resiliency, row.full_service) == (5.0, 20.0, 20.0, 60.0)
    assert row.losses == 2


def test_a_fault_healed_before_anyone_noticed_affects_nobody() -> None:
    tl = timeline({A: P1})
    tl.ingest("clients-1", signed_in(A, P1))
    fault(tl, 10.0)
    heal(tl, 12.0)
    tl.ingest("clients-1", [line(A, 20.0, "Registered", pool=P1, mode="FullService", refresh=True)])
    m = measure(tl, 30.0)
    (f,) = m.faults
    assert (f.affected, f.unaffected, f.rto) == (0, 1, 0.0)
    assert m.rto == 0.0 and m.distributions["reconnect"].count == 0


def test_already_home_at_the_heal_is_home_at_once() -> None:
    tl = timeline({A: P1})
    tl.ingest("clients-1", signed_in(A, P1))
    fault(tl, 10.0, "dns")
    tl.ingest(
        "clients-1",
        [
            mode(A, 15.0, "FullService", "Discovering", P1),
            mode(A, 18.0, "SigningIn", "FullService", P1),
        ],
    )
    heal(tl, 30.0, "dns")
    (row,) = measure(tl, 40.0).rows
    assert row.full_service == 8.0 and row.home == 0.0


def test_each_fault_has_its_window() -> None:
    tl = timeline({A: P1})
    tl.ingest("clients-1", signed_in(A, P1))
    fault(tl, 10.0, "one")
    tl.ingest(
        "clients-1",
        [
            mode(A, 12.0, "FullService", "Discovering", P1),
            mode(A, 14.0, "SigningIn", "FullService", P1),
        ],
    )
    fault(tl, 50.0, "two")
    tl.ingest(
        "clients-1",
        [
            mode(A, 53.0, "FullService", "Discovering", P1),
            mode(A, 60.0, "SigningIn", "FullService", P1),
        ],
    )
    m = measure(tl, 70.0)
    assert [(r.fault, r.detect, r.full_service) for r in m.rows] == [
        ("one", 2.0, 4.0),
        ("two", 3.0, 10.0),
    ]
    assert m.rto == 10.0 and [f.rto for f in m.faults] == [4.0, 10.0]


def test_curve_counts_every_client_at_every_sample() -> None:
    tl = timeline()
    site_loss(tl)
    curve = measure(tl, 140.0).curve
    n = len(curve["t"])
    assert 2 <= n <= 600 and curve["t"][-1] == pytest.approx(140.0)
    for k in range(n):
        assert sum(col[k] for col in curve["series"].values()) == 3
    last = {key: col[-1] for key, col in curve["series"].items()}
    assert last[f"full@{P1}"] == 1 and last[f"full@{P2}"] == 1 and last["backing-off"] == 1


def test_slowest_clients_come_with_their_history() -> None:
    tl = timeline()
    site_loss(tl)
    slowest = measure(tl, 140.0).slowest
    assert [s["user"] for s in slowest] == [B, A]  # never first
    whats = [h["what"] for h in slowest[1]["history"]]
    assert "failed: pong-timeout" in whats and "redirected" in whats
    assert "backing off 30.0 s" in whats


def test_events_are_written_to_the_timeline_file_as_they_come() -> None:
    tl = timeline()
    site_loss(tl)
    assert isinstance(tl.stream, io.StringIO)
    lines = [json.loads(x) for x in tl.stream.getvalue().splitlines()]
    assert lines[0]["process"] == "clients-1" and lines[0]["t"] == pytest.approx(0.5)
    faults = [x for x in lines if x["event"] == "FaultInjected"]
    assert faults[0]["t"] == 10.0 and faults[0]["process"] == "orchestrator"
    assert tl.events == sum(1 for x in lines if x["process"] == "clients-1")


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 11)]
    assert [percentile(values, q) for q in (0.5, 0.9, 0.95, 0.99)] == [5.0, 9.0, 10.0, 10.0]
    assert percentile([7.0], 0.5) == 7.0
    with pytest.raises(ValueError):
        percentile([], 0.5)
    d = distribution([3.0, None, 1.0, 2.0])
    assert (d.count, d.missing, d.min, d.p50, d.max, d.mean) == (3, 1, 1.0, 2.0, 3.0, 2.0)


@given(st.lists(st.floats(min_value=0, max_value=1e6), min_size=1, max_size=200))
def test_percentiles_are_ordered_measured_values(values: list[float]) -> None:
    d = distribution(values)
    stats = [d.min, d.p50, d.p90, d.p95, d.p99, d.max]
    assert stats == sorted(stats)  # type: ignore[type-var]
    assert all(v in values for v in stats)


def test_cdf_is_downsampled_and_stops_short_of_the_missing() -> None:
    pts = cdf_points([float(i) for i in range(1000)], 2000, points=100)
    assert len(pts) == 100 and pts[0] == [0.0, 0.0005] and pts[-1] == [999.0, 0.5]


def test_known_metric_names() -> None:
    assert is_known_metric("rto") and is_known_metric("reconnect.p95")
    assert not is_known_metric("reconnect") and not is_known_metric("reconnect.p42")


def test_collector_reads_each_event_once_and_counts_what_a_process_dropped() -> None:
    tl = timeline()

    def seq(n: int, text: str) -> str:
        return text.replace('"seq": 0', f'"seq": {n}')

    pages = {
        0: ([seq(1, line(A, 1.0, "ModeChanged", old="SignedOut", new="Discovering"))], 1, 1),
        1: ([], 1, 1),
    }
    calls: list[int] = []

    def fetch(url: str, after: int) -> tuple[list[str], int, int]:
        calls.append(after)
        if after in pages:
            return pages[after]
        return [], 1, 1

    col = EventCollector(tl, {"clients-1": "http://x"}, fetch)
    assert col.poll() == 1 and col.poll() == 0
    assert calls == [0, 1] and tl.events == 1 and tl.events_lost == 0
    # The process's ring buffer moved on: seqs 2..4 are gone, 5 and 6 arrive.
    nudge = line(A, 2.0, "Nudged", method="NOTIFY")
    pages[1] = ([seq(5, nudge), seq(6, nudge)], 5, 6)
    assert col.poll() == 2 and tl.events_lost == 3 and col.after["clients-1"] == 6
    # The headers say 4, the lines 6 (the buffer moved in between): the lines win.
    pages[6] = ([seq(9, nudge)], 4, 9)
    assert col.poll() == 1 and tl.events_lost == 5 and col.after["clients-1"] == 9
    # The process restarted: its seqs start again from 1 (seen from the lines, even
    # when it has already passed our position).
    pages[9] = ([seq(n, nudge) for n in range(1, 11)], 1, 10)
    assert col.poll() == 10 and col.after["clients-1"] == 10 and tl.events_lost == 5


def test_a_heal_before_the_client_noticed_counts_home_from_the_heal() -> None:
    tl = timeline({A: P1})
    tl.ingest("clients-1", signed_in(A, P1))
    fault(tl, 10.0)
    heal(tl, 15.0)
    tl.ingest(
        "clients-1",
        [
            mode(A, 20.0, "FullService", "Discovering", P1),
            mode(A, 21.0, "SigningIn", "FullService", P1),
        ],
    )
    (row,) = measure(tl, 30.0).rows
    assert row.affected and row.full_service == 11.0
    assert row.home == 6.0  # from the heal at 15 to home at 21; it was not home "at once"

"""The event log behind GET /events and the JSONL stream."""

from __future__ import annotations

import io
import json
from dataclasses import fields

from hypothesis import example, given
from hypothesis import strategies as st

from sipdrill.clients.events import (
    ClientEvent,
    Failure,
    Mode,
    ModeChanged,
    TargetFailed,
    event_to_dict,
    event_to_json,
)
from sipdrill.clients.metrics import EventLog


def _changed(i: int, user: str = "sip:a@lab.local") -> ModeChanged:
    return ModeChanged(
        user=user,
        wall=1000.0 + i,
        monotonic=float(i),
        reason=f"step {i}",
        old=Mode.SIGNED_OUT,
        new=Mode.DISCOVERING,
        trigger="sign-in",
    )


def test_paging_since_and_filters_over_a_bounded_buffer() -> None:
    stream = io.StringIO()
    log = EventLog(capacity=5, stream=stream)
    for i in range(8):
        log.append(_changed(i, "sip:a@lab.local" if i % 2 else "sip:b@lab.local"))
    log.append(
        TargetFailed(user="sip:a@lab.local", wall=1008.0, monotonic=8.0, failure=Failure.REFUSED)
    )
    assert len(log) == 5 and log.seq == 9
    assert [e["seq"] for e in log.query()] == [5, 6, 7, 8, 9]  # the oldest were dropped
    assert [e["seq"] for e in log.query(after=6)] == [7, 8, 9]
    assert [e["seq"] for e in log.query(after=1)] == [5, 6, 7, 8, 9]
    assert log.query(after=9) == []
    assert [e["seq"] for e in log.query(since=1006.0)] == [7, 8, 9]
    assert [e["seq"] for e in log.query(since=1006.0, after=7, limit=1)] == [8]
    assert [e["seq"] for e in log.query(user="sip:a@lab.local")] == [6, 8, 9]
    assert [e["event"] for e in log.query(kind="TargetFailed")] == ["TargetFailed"]
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) == 9 and lines[-1]["failure"] == "refused"
    assert lines[0] == event_to_dict(_changed(0, "sip:b@lab.local"), 1)
    assert lines[0]["old"] == "SignedOut" and lines[0]["pool"] is None


class _SmallBlocks(EventLog):
    BLOCK = 4


def test_compressed_blocks_answer_like_a_plain_buffer() -> None:
    """Every query over sealed blocks and the open one equals the same query on a list."""
    for capacity in (1, 3, 4, 7, 10):
        for count in (0, 1, 3, 4, 5, 9, 17, 30):
            log = _SmallBlocks(capacity=capacity)
            for i in range(count):
                log.append(_changed(i // 2, "sip:a@lab.local" if i % 3 else "sip:b@lab.local"))
            kept = [
                event_to_dict(
                    _changed(i // 2, "sip:a@lab.local" if i % 3 else "sip:b@lab.local"), i + 1
                )
                for i in range(count)
            ][-capacity:]
            assert len(log) == len(kept)
            assert log.query(limit=1000) == kept
            for after in range(count + 2):
                assert log.query(after=after) == [e for e in kept if e["seq"] > after]
                assert log.query(after=after, limit=2) == [e for e in kept if e["seq"] > after][:2]
            for since in (999.0, 1000.0, 1001.5, 1003.0, 1014.0, 1020.0):
                assert log.query(since=since) == [e for e in kept if e["wall"] >= since]
            assert log.query(user="sip:b@lab.local") == [
                e for e in kept if e["user"] == "sip:b@lab.local"
            ]
            # The raw lines an orchestrator ingests are the same events, unparsed.
            for after in range(count + 2):
                raw = [json.loads(line) for line in log.lines(after, 1000)]
                assert raw == [e for e in kept if e["seq"] > after]
            assert [json.loads(x)["seq"] for x in log.lines(0, 2)] == [e["seq"] for e in kept][:2]
            assert log.first_seq() == (kept[0]["seq"] if kept else 1)
    # Old blocks are let go, not just skipped.
    assert len(log._blocks) <= 10 // _SmallBlocks.BLOCK + 2


_ANY = st.one_of(
    st.none(),
    st.text(max_size=8),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(),
    st.booleans(),
    st.sampled_from(list(Mode)),
    st.sampled_from(list(Failure)),
    st.tuples(st.text(max_size=4), st.sampled_from(list(Mode))),
)
_KINDS = ClientEvent.__subclasses__()


@example(cls=ModeChanged, values=[float("nan"), float("-inf"), True, *[None] * 13], seq=None)
@given(
    cls=st.sampled_from(_KINDS),
    values=st.lists(_ANY, min_size=16, max_size=16),
    seq=st.none() | st.integers(min_value=0),
)
def test_the_per_class_encoder_writes_what_the_generic_encoder_writes(
    cls: type[ClientEvent], values: list[object], seq: int | None
) -> None:
    # Any value in any field, of its declared type or not: the same JSON text.
    event = cls(**{f.name: v for f, v in zip(fields(cls), values, strict=False)})
    generic = json.dumps(event_to_dict(event, seq), separators=(",", ":"))
    assert event_to_json(event, seq) == generic

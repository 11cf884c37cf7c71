"""The pool's control API fuzzed from its OpenAPI (tests/apifuzz.py): pool1
of the two-pool loopback lab, its partner up, in process."""

from __future__ import annotations

from pathlib import Path

from apifuzz import LoopThread, fuzz
from pool_harness import P1, TOKEN, two_pools

#: Run last: their documented examples (delete alice, fail pool1 over, make
#: its store read-only) would take away what the other operations' examples use.
LAST = {"DELETE /users/{uri}", "PUT /replication/read-only", "POST /failover/state"}


def test_pool_control_api_survives_fuzzing(tmp_path: Path) -> None:
    with LoopThread() as loop:
        lab = loop.enter(two_pools(tmp_path))
        app = lab.pools[P1].control_app
        assert app is not None
        failures = fuzz(loop, app, TOKEN, skip=lambda label: label in LAST)
        failures += fuzz(loop, app, TOKEN, skip=lambda label: label not in LAST)
    assert not failures, "\n\n".join(failures)

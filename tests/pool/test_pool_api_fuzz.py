"""The pool's control API fuzzed from its OpenAPI (tests/apifuzz.py): pool1
of the two-pool loopback lab, its partner up, in process."""

from __future__ import annotations

from pathlib import Path

from apifuzz import LoopThread, fuzz
from pool_harness import P1, TOKEN, two_pools


def test_pool_control_api_survives_fuzzing(tmp_path: Path) -> None:
    with LoopThread() as loop:
        lab = loop.enter(two_pools(tmp_path))
        app = lab.pools[P1].control_app
        assert app is not None
        failures = fuzz(loop, app, TOKEN)
    assert not failures, "\n\n".join(failures)

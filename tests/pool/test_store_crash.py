"""Crash safety: a writer killed with SIGKILL at random points loses nothing it
acknowledged, and its half-done transactions leave no trace.

The child prints a line only after a write method has returned (committed);
every printed line is an acknowledged write the reopened store must hold.
SIGKILL tests process crashes; power loss is what ``synchronous=FULL`` is for
and cannot be tested here.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from labkit import P1

from sipdrill.pool.store import UserStore

_WRITER = """
import sys
from sipdrill.pool.store import UserStore

path, run = sys.argv[1], sys.argv[2]
with UserStore(path, "pool1.lab.local") as store:
    i = 0
    while True:
        uri = f"sip:r{run}u{i}@lab.local"
        seq = store.upsert_user(uri, home_pool="pool1.lab.local", settings={"i": i})
        print("user", uri, seq, flush=True)
        # Two rows, one transaction: after a crash, both or neither.
        with store.batch():
            store.add_contact(uri, "sip:buddy@lab.local")
            seq = store.schedule_conference(uri, "m", subject="s", content=b"x" * 512)
        print("batch", uri, seq, flush=True)
        i += 1
"""

RUNS = 6


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_loses_no_acknowledged_write(tmp_path: Path) -> None:
    path = tmp_path / "crash.db"
    rng = random.Random(os.urandom(8))
    acked: list[tuple[str, str, int]] = []
    for run in range(RUNS):
        proc = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(path), str(run)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            # Some kills land while the child is still starting or creating
            # the schema, most inside the write loop.
            time.sleep(rng.uniform(0.05, 0.6))
        finally:
            proc.send_signal(signal.SIGKILL)
            out, err = proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL, err.decode()
        for line in out.decode().splitlines(keepends=True):
            if line.endswith("\n"):  # a line cut by the kill was not acknowledged
                kind, uri, seq = line.split()
                acked.append((kind, uri, int(seq)))

        with UserStore(path, P1) as store:
            feed = store.changes_since(0, 1_000_000)
            assert [c.seq for c in feed] == list(range(1, len(feed) + 1))
            assert store.high_water_mark() >= max((s for _, _, s in acked), default=0)
            for kind, uri, seq in acked:
                assert store.get_user(uri) is not None, (kind, uri, seq)
                if kind == "batch":
                    assert store.contacts(uri) == ["sip:buddy@lab.local"]
            for user in store.users():
                # The batch is atomic: a contact without its meeting (or the
                # reverse) would be a half-applied transaction.
                assert len(store.contacts(user.uri)) == len(store.conferences(user.uri))
    assert any(kind == "batch" for kind, _, _ in acked), "the writer never got going"

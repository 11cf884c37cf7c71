"""`serve clients --slots`: the replicas of a scaled clients service each claim
their own block of users; a replica past the last user stays up, idle."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from procutil import free_port

from sipdrill.clients.slots import claim_slot, slot_users
from sipdrill.topology import load_topology

ROOT = Path(__file__).resolve().parents[2]
TOPOLOGY = ROOT / "topologies/paired-pools.yaml"


def test_a_slot_is_a_block_of_users_what_is_left_of_it_or_nothing() -> None:
    users = list(range(10))
    full = slot_users(users, 1, 4)
    assert full.users == [4, 5, 6, 7] and not full.idle
    assert full.note == "clients replica 1: users 5 to 8"
    last = slot_users(users, 2, 4)
    assert last.users == [8, 9]
    assert last.note == "clients replica 2: users 9 to 10 (2 of 4: the last users of the topology)"
    past = slot_users(users, 3, 4)
    assert past.users == [] and past.idle
    assert past.note == (
        "clients replica 3: no users left (the 10 users are taken by replicas 0 to 2, "
        "4 each): idle; scale the clients down to 3"
    )
    assert slot_users(users, 0, 4, offset=8).users == [8, 9]


CLAIM = """
import sys
from pathlib import Path
from sipdrill.clients.slots import claim_slot
print(claim_slot(Path(sys.argv[1])).number, flush=True)
sys.stdin.read()
"""


def test_live_processes_never_share_a_slot_and_a_freed_one_is_taken_again(
    tmp_path: Path,
) -> None:
    def start() -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-c", CLAIM, str(tmp_path / "slots")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    procs = [start(), start()]
    slots = {}
    for proc in procs:
        assert proc.stdout is not None
        slots[proc.stdout.readline().strip()] = proc
    assert sorted(slots) == ["0", "1"]
    slots["0"].communicate("")  # it exits: its lock goes with it
    third = start()
    assert third.stdout is not None
    assert third.stdout.readline().strip() == "0"  # the lowest free one, not 2
    for proc in (slots["1"], third):
        proc.communicate("")


def test_a_replica_past_the_last_user_stays_up_idle_and_says_so(tmp_path: Path) -> None:
    """Slot 0 is held (by this test), so the replica gets slot 1; with --count
    as large as the topology, slot 1 has no users: it serves its control API,
    /health says `idle` and why, and it exits cleanly on SIGTERM."""
    users = len(load_topology(TOPOLOGY).topology.all_users())
    held = claim_slot(tmp_path / "slots")
    assert held.number == 0
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "sipdrill", "serve", "clients", "--topology", str(TOPOLOGY),
            "--count", str(users), "--slots", str(tmp_path / "slots"),
            "--transport", "udp", "--registrar", "127.0.0.1:9", "--no-start",
            "--control", f"127.0.0.1:{port}", "--events", "none",
        ],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        health = None
        deadline = time.monotonic() + 20
        while health is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).json()
            except httpx.HTTPError:
                time.sleep(0.1)
        assert health is not None, f"no control API (exit {proc.poll()})"
        assert health["status"] == "idle" and health["endpoints"] == 0
        assert health["note"].startswith("clients replica 1: no users left")
        assert "scale the clients down to 1" in health["note"]
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=15)
        os.close(held.fd)
    assert proc.returncode == 0, err
    assert err.count("clients replica 1: no users left") == 1, err  # one clear line

"""``pool-state.json`` in the pool's state directory: what a pool keeps
across a restart besides its user store. The failover state of every
pairing as this pool saw it, the last failover event, the users
Move-CsUser re-homed, and clean-ups still owed to a pool that was down.
Saved whole and atomically, under :attr:`PoolStateFile.lock`.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from sipdrill.control.files import write_atomically
from sipdrill.errors import OperationError
from sipdrill.pool.state import FailoverState, PoolFailoverStates

STATE_FILE = "pool-state.json"
STATE_VERSION = 1


class PoolStateFile:
    """The state of the pool ``fqdn`` in ``state_dir``; ``failover`` is
    restored in place on :meth:`load`."""

    def __init__(self, state_dir: Path, fqdn: str, failover: PoolFailoverStates) -> None:
        self.path = state_dir / STATE_FILE
        self.fqdn = fqdn
        self.failover = failover
        #: Users Move-CsUser re-homed away from the topology's answer.
        self.moves: dict[str, str] = {}
        #: Accounts a moved user left on a pool that was down: deleted when it answers.
        self.pending_deletes: dict[str, dict[str, str]] = {}
        self.last_failover_event: dict[str, Any] | None = None
        #: Held by whoever changes the state and saves it.
        self.lock = asyncio.Lock()

    def load(self) -> None:
        """Read the file, if there is one (a blocking read: run it in a thread)."""
        path = self.path
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            raise OperationError("bad-state", f"{path}: unreadable ({exc})", 500) from None
        if doc.get("version") != STATE_VERSION:
            raise OperationError("bad-state", f"{path}: version {doc.get('version')}", 500)
        states = {home: FailoverState(v) for home, v in doc.get("failover", {}).items()}
        try:
            self.failover.restore(states)
        except ValueError as exc:
            raise OperationError("bad-state", f"{path}: {exc} (topology changed?)", 500) from None
        self.moves = dict(doc.get("moves", {}))
        self.pending_deletes = dict(doc.get("pending_deletes", {}))
        self.last_failover_event = doc.get("last_failover_event")

    async def save(self) -> None:
        doc = {
            "version": STATE_VERSION,
            "pool": self.fqdn,
            "failover": {h: s.value for h, s in self.failover.snapshot().items()},
            "moves": self.moves,
            "pending_deletes": self.pending_deletes,
            "last_failover_event": self.last_failover_event,
        }
        data = (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()
        await asyncio.to_thread(write_atomically, self.path, data)

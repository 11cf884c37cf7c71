"""Slots: how the replicas of one clients service share a topology's users.

Each replica (``docker-compose up --scale clients=N``) claims the lowest free
slot in a directory they all see (the lab's shared volume): slot ``k`` is a
file ``k`` locked with ``flock`` for as long as the process lives, so a
replica that restarts, or one started after another stopped, takes a free
slot back, and two live replicas never hold the same one. Slot ``k``
simulates users ``k*count`` to ``k*count + count - 1`` of those matching
``--users``, so replicas never share a user.

A slot past the last user is not an error: the replica has no users and
says so (:attr:`SlotUsers.note`), but stays up and healthy, so that
``--scale`` past the topology's users leaves a working lab with idle
replicas rather than a service that keeps failing (docs/decisions.md).
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

__all__ = ["Slot", "SlotUsers", "claim_slot", "slot_users"]

T = TypeVar("T")


@dataclass(frozen=True)
class Slot:
    """A claimed slot: ``number``, and the descriptor whose lock holds it
    (released when the process exits, however it exits)."""

    number: int
    fd: int


def claim_slot(directory: Path) -> Slot:
    """The lowest slot of ``directory`` no live process holds."""
    directory.mkdir(parents=True, exist_ok=True)
    number = 0
    while True:
        fd = os.open(directory / str(number), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            number += 1
            continue
        return Slot(number, fd)


@dataclass(frozen=True)
class SlotUsers(Generic[T]):
    """The users of one slot, and the line that says which."""

    users: list[T]
    note: str  # one line for the log and the health endpoint

    @property
    def idle(self) -> bool:
        return not self.users


def slot_users(matching: list[T], slot: int, count: int, offset: int = 0) -> SlotUsers[T]:
    """Slot ``slot``'s block of ``count`` users among ``matching`` (after
    the first ``offset``): the full block, what is left of it, or none."""
    first = offset + slot * count
    users = matching[first : first + count]
    total = len(matching) - offset
    if not users:
        taken = -(-total // count) if total > 0 else 0
        return SlotUsers(
            users,
            f"clients replica {slot}: no users left (the {max(total, 0)} users are taken by "
            f"replicas 0 to {taken - 1}, {count} each): idle; scale the clients down to {taken}"
            if taken
            else f"clients replica {slot}: no users to simulate: idle",
        )
    last = first - offset + len(users)
    note = f"clients replica {slot}: users {first - offset + 1} to {last}"
    if len(users) < count:
        note += f" ({len(users)} of {count}: the last users of the topology)"
    return SlotUsers(users, note)

"""The history of a chaos run: one JSON line per operation, written as it
happens (a run killed half-way still leaves what it did).

The first line is the run's header (``"type": "meta"``: seed, topology,
runtime, the nemesis's configuration and its whole schedule). Then, Jepsen's
way, every operation is an ``invoke`` followed by its completion: ``ok``,
``fail`` (it certainly did not happen) or ``info`` (nobody knows: a write
whose answer never came may still have been committed). Each line has:

``index``    position in the file
``process``  who did it: ``nemesis``, ``writer-<pool>``, ``final``
``type``     meta, invoke, ok, fail, info
``f``        what: fault, heal, heal-all, pool-failover, pool-failback,
             cms-failover, write, backup-sync, clients-home, final-state,
             leftovers
``t``        seconds since the run started (the orchestrator's monotonic clock)
``wall``     Unix time
``value``    the operation's arguments and, on completion, its result

See docs/chaos.md for each ``f``'s value.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import IO, Any

from sipdrill.errors import OperationError


class OpType(StrEnum):
    META = "meta"
    INVOKE = "invoke"
    OK = "ok"
    FAIL = "fail"
    INFO = "info"


@dataclass(frozen=True)
class HistoryOp:
    """One line of the history."""

    index: int
    process: str
    type: OpType
    f: str
    t: float
    wall: float = 0.0
    value: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "process": self.process,
            "type": self.type.value,
            "f": self.f,
            "t": round(self.t, 6),
            "wall": self.wall,
            "value": dict(self.value),
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> HistoryOp:
        return cls(
            index=int(raw["index"]),
            process=str(raw["process"]),
            type=OpType(raw["type"]),
            f=str(raw["f"]),
            t=float(raw["t"]),
            wall=float(raw.get("wall", 0.0)),
            value=MappingProxyType(dict(raw.get("value") or {})),
        )


class History:
    """Appends operations to a history file (and keeps them), from any thread."""

    def __init__(self, stream: IO[str] | None, clock: Any, wall: Any) -> None:
        self.stream = stream
        self.clock = clock  # () -> seconds since the run started
        self.wall = wall  # () -> Unix time
        self.ops: list[HistoryOp] = []
        self._lock = threading.Lock()

    def add(self, process: str, type_: OpType, f: str, **value: Any) -> HistoryOp:
        with self._lock:
            op = HistoryOp(
                len(self.ops), process, type_, f, self.clock(), self.wall(),
                MappingProxyType(value),
            )
            self.ops.append(op)
            if self.stream is not None:
                # One line at a time, flushed: the file is the record, not memory.
                self.stream.write(json.dumps(op.to_json(), default=str) + "\n")
                self.stream.flush()
        return op

    def invoke(self, process: str, f: str, **value: Any) -> HistoryOp:
        return self.add(process, OpType.INVOKE, f, **value)

    def complete(self, invoked: HistoryOp, type_: OpType, **result: Any) -> HistoryOp:
        """The completion of ``invoked``: its arguments and ``result``."""
        return self.add(invoked.process, type_, invoked.f, **{**invoked.value, **result})


def load_history(path: Path | str) -> list[HistoryOp]:
    """The operations of a history file, or OperationError naming the bad line."""
    ops: list[HistoryOp] = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise OperationError("bad-history", f"cannot read {path}: {exc.strerror}", 400) from None
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            ops.append(HistoryOp.from_json(json.loads(line)))
        except (ValueError, KeyError, TypeError) as exc:
            raise OperationError(
                "bad-history",
                f"{path}:{n}: not a history line ({type(exc).__name__}: {exc}); "
                "give the history.jsonl a chaos run wrote",
                400,
            ) from None
    return ops


def dump_history(ops: Iterable[HistoryOp], path: Path | str) -> None:
    with open(path, "w", encoding="utf-8") as out:
        for op in ops:
            out.write(json.dumps(op.to_json(), default=str) + "\n")

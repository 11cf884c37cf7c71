"""RFC 2782 SRV target ordering: the order in which a client tries its servers.

A pure function with an injected RNG, so a test can pin the order a Lync
client would try the primary and backup pools in, and a statistical test
can check that weights share the load as the RFC says.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import groupby

__all__ = ["SrvRecord", "order_srv"]


@dataclass(frozen=True)
class SrvRecord:
    priority: int
    weight: int
    port: int
    target: str

    @property
    def host(self) -> str:
        """The target without the trailing dot of a fully qualified DNS name."""
        return self.target.removesuffix(".")


def order_srv(
    records: Iterable[SrvRecord | tuple[int, int, int, str]], rng: random.Random
) -> list[SrvRecord]:
    """Every record once, in the order to try them (RFC 2782, "Usage rules").

    Lowest priority first. Within one priority, repeatedly: put the weight-0
    records first (otherwise keeping the given order), compute running sums
    of the weights, draw N uniformly from the integers 0..total inclusive,
    take the first record whose running sum is >= N, and remove it. A lone
    record with target "." means the service is decidedly not available:
    the result is empty.
    """
    rrs = [r if isinstance(r, SrvRecord) else SrvRecord(*r) for r in records]
    if len(rrs) == 1 and rrs[0].target in (".", ""):
        return []
    # "." only means something alone; next to real targets it is noise.
    rrs = [r for r in rrs if r.target not in (".", "")]
    ordered: list[SrvRecord] = []
    # sorted() is stable, so equal priorities keep the caller's order.
    for _, group in groupby(sorted(rrs, key=lambda r: r.priority), key=lambda r: r.priority):
        remaining = list(group)
        while remaining:
            remaining = [r for r in remaining if r.weight == 0] + [
                r for r in remaining if r.weight != 0
            ]
            total = sum(r.weight for r in remaining)
            pick = rng.randint(0, total)
            running = 0
            for index, record in enumerate(remaining):
                running += record.weight
                if running >= pick:
                    ordered.append(remaining.pop(index))
                    break
    return ordered

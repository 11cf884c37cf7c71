"""Who the simulated clients are: users picked from a topology, and their settings.

``--users`` patterns are ``POOL:GLOB``: ``pool1.lab.local:*`` is every user
homed on pool1, ``*:p1u00*`` every user whose name (the part before the @)
or URI matches the glob, whatever the pool. Several patterns add up, without
duplicates.

The users chosen are drawn across their home pools in proportion to how many
of the matching users each pool homes (:func:`proportional_order`): the first
40 of a lab with 151 users on pool1 and 152 on pool2 are 20 and 20, not the
38 of pool1 that topology order gave (its explicit users and pool1's group
come first). Within a pool, topology order. Any prefix of the order is
proportional too, so clients processes that split the users by ``--offset``
draw the same users as one process would.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from sipdrill.clients.endpoint import ClientProfile, UserSpec, WorkloadKind
from sipdrill.errors import SipdrillError
from sipdrill.sip.keepalive import KeepAliveConfig
from sipdrill.sip.transport import Kind
from sipdrill.topology import Topology, User

__all__ = [
    "CONFERENCE_URI",
    "CallSettings",
    "PopulationError",
    "conference_uri",
    "parse_workload",
    "profile_for",
    "proportional_order",
    "select_users",
]

#: How a Lync conference (focus) URI looks: the organiser's AoR with the
#: conference id in the opaque parameter.
CONFERENCE_URI = "sip:{organizer}@{domain};gruu;opaque=app:conf:focus:id:{conference}"
#: At most this many conferences per user to join in the workload.
MAX_CONFERENCES = 4


@dataclass
class PopulationError(SipdrillError):
    """The users asked for cannot be found in the topology."""

    message: str

    def __str__(self) -> str:
        return self.message


def conference_uri(organizer_uri: str, conference_id: str, domain: str) -> str:
    user = organizer_uri.partition(":")[2].partition("@")[0]
    return CONFERENCE_URI.format(organizer=user, domain=domain, conference=conference_id)


def _matches(user: User, pool_glob: str, user_glob: str) -> bool:
    if not fnmatch.fnmatchcase(user.home_pool, pool_glob):
        return False
    local = user.uri.partition(":")[2].partition("@")[0]
    return fnmatch.fnmatchcase(local, user_glob) or fnmatch.fnmatchcase(user.uri, user_glob)


def _matcher(parsed: Sequence[tuple[str, str]]) -> Callable[[User], bool]:
    """Whether a user matches any of ``parsed``. A pattern without wildcards
    (what a clients replica is given: one per user of its slot, thousands) is
    a set lookup: matching every user against every pattern made a replica of
    2,500 users in a 50,000-user topology spend minutes of CPU before it
    started (125 million fnmatch calls)."""
    literal: dict[str, set[str]] = {}
    globs: list[tuple[str, str]] = []
    for pool, glob in parsed:
        if any(c in glob for c in "*?["):
            globs.append((pool, glob))
        else:
            literal.setdefault(pool, set()).add(glob)

    def wanted(user: User) -> bool:
        if literal:
            local = user.uri.partition(":")[2].partition("@")[0]
            for pool, names in literal.items():
                if (local in names or user.uri in names) and fnmatch.fnmatchcase(
                    user.home_pool, pool
                ):
                    return True
        return any(_matches(user, pool, glob) for pool, glob in globs)

    return wanted


def parse_patterns(patterns: Iterable[str]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for pattern in patterns:
        for part in pattern.split(","):
            part = part.strip()
            if not part:
                continue
            pool, sep, glob = part.rpartition(":")
            if not sep or not pool or not glob:
                raise PopulationError(
                    f"--users {part!r}: expected POOL:GLOB, e.g. pool1.lab.local:*"
                )
            out.append((pool.lower(), glob))
    if not out:
        raise PopulationError("--users: no pattern given")
    return out


def proportional_order(users: Sequence[User]) -> list[User]:
    """``users`` interleaved across their home pools so that every prefix holds
    each pool's share of them within two users, about one in practice (pools
    in order of first appearance, users of a pool in their given order).

    The m-th user comes from the pool furthest behind its share of m (pool k,
    with w_k of the n users, is owed m * w_k / n), ties to the earlier pool:
    the largest-deficit rule. It is not Tijdeman's optimal sequence: a pool
    may be a little over one user off its share (sizes 1, 1, 1, 11, 11 at the
    16th user: 1.04), never two, as the tests check.
    """
    by_pool: dict[str, list[User]] = {}
    for user in users:
        by_pool.setdefault(user.home_pool, []).append(user)
    pools = list(by_pool.values())
    n = len(users)
    taken = [0] * len(pools)
    order: list[User] = []
    for m in range(1, n + 1):
        # Integers: deficit_k * n = m * w_k - taken_k * n.
        k = max(
            (i for i in range(len(pools)) if taken[i] < len(pools[i])),
            key=lambda i: (m * len(pools[i]) - taken[i] * n, -i),
        )
        order.append(pools[k][taken[k]])
        taken[k] += 1
    return order


def select_users(
    topology: Topology, patterns: Sequence[str], count: int | None = None
) -> list[UserSpec]:
    """``count`` users matching ``patterns`` (all if None), drawn across home
    pools in proportion (:func:`proportional_order`), with contacts and the
    conferences they may join (their own and their contacts')."""
    parsed = parse_patterns(patterns)
    pools = {p.fqdn for p in topology.pools}
    for pool, _ in parsed:
        if not any(fnmatch.fnmatchcase(fqdn, pool) for fqdn in pools):
            raise PopulationError(
                f"--users {pool}: no such pool (pools: {', '.join(sorted(pools))})"
            )
    everyone = topology.all_users()
    wanted = _matcher(parsed)
    matching = [u for u in everyone if wanted(u)]
    chosen = proportional_order(matching)
    if count is not None:
        chosen = chosen[:count]
    if count is not None and len(chosen) < count:
        raise PopulationError(
            f"--count {count}: only {len(chosen)} users match {', '.join(patterns)}; "
            "add users (user_groups) to the topology or widen --users"
        )
    if not chosen:
        raise PopulationError(f"no user matches {', '.join(patterns)}")
    by_uri = {u.uri: u for u in everyone}
    domain = topology.domain
    specs = []
    for user in chosen:
        conferences = [conference_uri(user.uri, c.id, domain) for c in user.conferences]
        for contact in user.contacts:
            other = by_uri.get(contact)
            if other is not None:
                conferences += [conference_uri(other.uri, c.id, domain) for c in other.conferences]
        specs.append(
            UserSpec(
                uri=user.uri,
                home_pool=user.home_pool,
                contacts=tuple(user.contacts),
                conferences=tuple(conferences[:MAX_CONFERENCES]),
            )
        )
    return specs


@dataclass(frozen=True)
class CallSettings:
    """The call workload: ``fraction`` of the users place calls, each one every
    ``interval`` seconds on average (+-50 %), held ``hold`` seconds. The call
    rate of a process is ``fraction * users / interval`` calls per second."""

    fraction: float = 0.25
    interval: float = 30.0
    hold: float = 3.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction <= 1.0:
            raise PopulationError(f"--call-fraction {self.fraction:g}: give a share of 0 to 1")
        if self.interval <= 0:
            raise PopulationError(f"--call-interval {self.interval:g}: give seconds above 0")
        if self.hold < 0:
            raise PopulationError(f"--call-hold {self.hold:g}: give seconds, 0 or more")


def parse_workload(text: str | None) -> tuple[WorkloadKind, ...]:
    if not text:
        return ()
    kinds = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        try:
            kinds.append(WorkloadKind(part))
        except ValueError:
            raise PopulationError(
                f"--workload {part!r}: use some of {', '.join(k.value for k in WorkloadKind)}"
            ) from None
    return tuple(dict.fromkeys(kinds))


def profile_for(
    topology: Topology,
    *,
    transport: Kind = Kind.TLS,
    allow_tcp: bool = False,
    workload: tuple[WorkloadKind, ...] = (),
    workload_interval: float = 60.0,
    calls: CallSettings | None = None,
    call_targets: tuple[str, ...] = (),
) -> ClientProfile:
    """The client settings a topology implies: domain, registration expiry,
    keep-alive interval (pings at 80-100 % of it) and pong timeout; the call
    workload's settings and whom callers call (``call_targets``)."""
    calls = calls or CallSettings()
    timers = topology.timers
    interval = timers.keepalive_interval
    return ClientProfile(
        domain=topology.domain,
        transport=transport,
        allow_tcp=allow_tcp or transport is Kind.TCP,
        expires=timers.registration_expiry.default,
        keepalive=KeepAliveConfig(
            pong_timeout=timers.keepalive_pong_timeout,
            default_interval=(0.8 * interval, interval),
        ),
        workload=workload,
        workload_interval=workload_interval,
        call_fraction=calls.fraction,
        call_interval=calls.interval,
        call_hold=calls.hold,
        call_targets=call_targets,
    )

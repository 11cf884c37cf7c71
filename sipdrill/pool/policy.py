"""The registrar's decision per user, and what resiliency mode allows.

Pure functions: the SIP registrar (``sipdrill.sip``) calls
:func:`registrar_decision` from its per-AoR policy hook and turns the result
into a response; nothing here knows about messages.

Who serves a user (docs/reference.md, "Backup registrar behaviour"):

- the *serving pool* is the home pool, or its backup pool from the start of
  an administrator's pool failover until its failback completes;
- the serving pool gives full service, except that during the failover and
  failback cmdlets (data on the move) the backup pool only gives resiliency
  mode;
- the backup pool of a home pool that its partner monitor declared down (or
  not yet back for the failback interval) accepts the users in resiliency
  mode;
- any other registrar answers 301 with two Contacts: the serving pool at
  q=0.7 and that pool's backup at q=0.3.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

from sipdrill.errors import SipError
from sipdrill.pool.state import FailoverState, PartnerState, serving_pool

if TYPE_CHECKING:
    from sipdrill.topology import Topology

#: q values of the 301's Contacts (docs/reference.md): primary, then backup.
PRIMARY_Q = 0.7
BACKUP_Q = 0.3
#: A pool without a backup pool is the only Contact; RFC 3261's default q.
SOLE_Q = 1.0


class ServiceMode(Enum):
    FULL = "full"
    RESILIENCY = "resiliency"


@dataclass(frozen=True)
class Serve:
    """Register the user here, in ``mode``."""

    mode: ServiceMode
    pool: str


@dataclass(frozen=True)
class RedirectTarget:
    pool: str
    q: float


@dataclass(frozen=True)
class Redirect:
    """Answer 301 Moved Permanently with ``targets`` as Contacts, best first."""

    targets: tuple[RedirectTarget, ...]
    status_code: int = 301
    reason: str = "Moved Permanently"


@dataclass(frozen=True)
class Refusal:
    """Answer ``status_code reason``; never parse ``reason``, branch on the
    code (and on ``feature`` for the feature matrix)."""

    status_code: int
    reason: str
    feature: Feature | None = None

    def to_sip_error(self) -> SipError:
        return SipError(self.reason, self.status_code)


RegistrarDecision = Serve | Redirect | Refusal

USER_NOT_FOUND = Refusal(404, "Not Found: no such user is enabled for SIP")
HOME_POOL_UNKNOWN = Refusal(503, "Service Unavailable: the user's home pool is unknown here")


def backups_from_topology(topology: Topology) -> dict[str, str | None]:
    """Each pool of ``topology`` mapped to its backup pool (or None)."""
    return {p.fqdn: p.backup for p in topology.pools}


def _redirect(primary: str, backups: Mapping[str, str | None]) -> Redirect:
    backup = backups.get(primary)
    if backup is None:
        return Redirect((RedirectTarget(primary, SOLE_Q),))
    return Redirect((RedirectTarget(primary, PRIMARY_Q), RedirectTarget(backup, BACKUP_Q)))


def registrar_decision(
    *,
    user_home: str | None,
    this_pool: str,
    backups: Mapping[str, str | None],
    partner_state: PartnerState | None,
    failover_state: FailoverState,
) -> RegistrarDecision:
    """What the registrar of ``this_pool`` does with a REGISTER from a user.

    - ``user_home``: the user's home pool, ``None`` for an unknown user;
    - ``backups``: every known pool mapped to its backup pool (or ``None``);
    - ``partner_state``: this pool's partner monitor (``None`` when this
      pool has no partner, or automatic registrar failover is off);
    - ``failover_state``: the state of the user's home pool's failover.

    Pool FQDNs are expected lower-case.
    """
    if user_home is None:
        return USER_NOT_FOUND
    if user_home not in backups:
        # Neither served here nor anywhere this registrar could send them.
        return HOME_POOL_UNKNOWN
    backup = backups[user_home]
    serving = user_home if backup is None else serving_pool(failover_state, user_home, backup)
    if this_pool == serving:
        if serving == user_home or failover_state is FailoverState.FAILED_OVER:
            return Serve(ServiceMode.FULL, this_pool)
        # Failover or failback cmdlet in progress: the user data is moving,
        # so no persistent change may be made here.
        return Serve(ServiceMode.RESILIENCY, this_pool)
    if (
        this_pool == backup
        and serving == user_home
        and partner_state in (PartnerState.DOWN, PartnerState.RETURNING)
    ):
        return Serve(ServiceMode.RESILIENCY, this_pool)
    return _redirect(serving, backups)


# --- the resiliency-mode feature matrix --------------------------------------


class Feature(Enum):
    CONTACT_LIST_READ = "contact-list-read"
    ADD_CONTACT = "add-contact"
    PRESENCE_PUBLISH = "presence-publish"
    PRESENCE_SUBSCRIBE = "presence-subscribe"
    SCHEDULE_MEETING = "schedule-meeting"
    ADHOC_CONFERENCE = "adhoc-conference"
    #: Joining a conference; allowed whatever the mode if its pool is up.
    JOIN_CONFERENCE = "join-conference"
    P2P_IM = "p2p-im"
    P2P_AV = "p2p-av"
    #: Calls, with hold and transfer.
    CALL = "call"
    CALL_PARK = "call-park"
    RESPONSE_GROUP = "response-group"
    ADDRESS_BOOK_SEARCH = "address-book-search"
    #: Any other persistent change (settings, delegates, call forwarding).
    PERSISTENT_CHANGE = "persistent-change"


_LIMITED = "Limited functionality"

#: What resiliency mode refuses (docs/reference.md, "Limited functionality").
#: 403 for operations on the user's own data and services, which live on the
#: unreachable home pool; 488 for sessions the backup registrar cannot host.
#: Never 503: RFC 3263 clients treat a 503 as a failed server and fail over.
RESILIENCY_REFUSALS: Mapping[Feature, Refusal] = {
    f: Refusal(code, f"{_LIMITED}: {what} in resiliency mode", f)
    for f, code, what in (
        (Feature.CONTACT_LIST_READ, 403, "contact list unavailable"),
        (Feature.ADD_CONTACT, 403, "contact list changes unavailable"),
        (Feature.PRESENCE_PUBLISH, 403, "presence unavailable"),
        (Feature.PRESENCE_SUBSCRIBE, 403, "presence unavailable"),
        (Feature.SCHEDULE_MEETING, 403, "meeting scheduling unavailable"),
        (Feature.ADHOC_CONFERENCE, 488, "ad-hoc conferences unavailable"),
        (Feature.CALL_PARK, 488, "call park unavailable"),
        (Feature.RESPONSE_GROUP, 488, "Response Group unavailable"),
        (Feature.ADDRESS_BOOK_SEARCH, 403, "Address Book search unavailable"),
        (Feature.PERSISTENT_CHANGE, 403, "changes to user data unavailable"),
    )
}

#: Works in resiliency mode (the rest of :class:`Feature` is refused).
RESILIENCY_ALLOWED = frozenset(Feature) - frozenset(RESILIENCY_REFUSALS)

CONFERENCE_POOL_DOWN = Refusal(
    480, "Temporarily Unavailable: the conference's pool is down", Feature.JOIN_CONFERENCE
)


def check_feature(
    feature: Feature, mode: ServiceMode, *, conference_pool_up: bool = True
) -> Refusal | None:
    """``None`` if a user in ``mode`` may use ``feature``, else the refusal
    to send.

    ``conference_pool_up`` matters for :attr:`Feature.JOIN_CONFERENCE` only:
    a conference lives on its organiser's pool, so the conferences a user in
    resiliency mode organised are on the down home pool and end this way.
    """
    if feature is Feature.JOIN_CONFERENCE and not conference_pool_up:
        return CONFERENCE_POOL_DOWN
    if mode is ServiceMode.RESILIENCY:
        return RESILIENCY_REFUSALS.get(feature)
    return None

"""Conferences hosted by a Front End pool: URIs and the active-conference table.

A conference lives on its organiser's pool (the pool that serves the
organiser), as in Lync. Its URI is Lync's focus URI::

    sip:alice@lab.local;gruu;opaque=app:conf:focus:id:weekly

(organiser ``sip:alice@lab.local``, conference id ``weekly``). A client joins
with an INVITE to that URI from any pool; the pool routes it to the
organiser's serving pool, which answers 200 (no media: the lab signals only)
and keeps the participant until its BYE. An INVITE by the organiser to an id
that is not scheduled starts an ad-hoc conference, which ends when its last
participant leaves.

Everything here is sans-IO; the pool sends the BYEs that end a conference.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from sipmessage import URI

FOCUS_PREFIX = "app:conf:focus:id:"
_CONF_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True)
class ConferenceRef:
    organiser: str  # the organiser's AoR, sip:user@domain (lower case)
    conf_id: str

    @property
    def uri(self) -> str:
        return conference_uri(self.organiser, self.conf_id)


def conference_uri(organiser: str, conf_id: str) -> str:
    """The focus URI of ``organiser``'s conference ``conf_id``."""
    return f"{organiser};gruu;opaque={FOCUS_PREFIX}{conf_id}"


def parse_conference_uri(uri: URI) -> ConferenceRef | None:
    """The conference a Request-URI names, or None if it names no conference."""
    params = uri.parameters
    if "gruu" not in params:
        return None
    opaque = params.get("opaque") or ""
    if not opaque.startswith(FOCUS_PREFIX):
        return None
    conf_id = opaque[len(FOCUS_PREFIX) :]
    if not _CONF_ID_RE.match(conf_id) or not uri.user:
        return None
    return ConferenceRef(f"sip:{uri.user}@{uri.host}".lower(), conf_id)


@dataclass
class Participant:
    """One joined participant: the dialog the focus is in with it.

    ``route`` is the flow to the participant's client when it joined on this
    pool, else None and ``via_pool`` names the pool that relayed its INVITE
    (the BYE that ends the conference goes back through that pool).
    """

    aor: str
    call_id: str
    remote_tag: str
    local_tag: str
    remote_target: str
    joined_at: float
    route: object = None
    via_pool: str | None = None
    cseq: int = 0

    def next_cseq(self) -> int:
        self.cseq += 1
        return self.cseq


@dataclass
class ActiveConference:
    ref: ConferenceRef
    adhoc: bool
    started_at: float
    participants: dict[str, Participant] = field(default_factory=dict)  # by Call-ID


@dataclass
class ConferenceTable:
    active: dict[ConferenceRef, ActiveConference] = field(default_factory=dict)

    def join(self, ref: ConferenceRef, participant: Participant, *, adhoc: bool) -> bool:
        """Add ``participant``; True if this started the conference."""
        conf = self.active.get(ref)
        started = conf is None
        if conf is None:
            conf = self.active[ref] = ActiveConference(ref, adhoc, participant.joined_at)
        conf.participants[participant.call_id] = participant
        return started

    def leave(self, ref: ConferenceRef, call_id: str) -> Participant | None:
        """Remove a participant. A conference is active while someone is in
        it: the last one out ends it (a scheduled one stays in the store)."""
        conf = self.active.get(ref)
        if conf is None:
            return None
        p = conf.participants.pop(call_id, None)
        if not conf.participants:
            del self.active[ref]
        return p

    def end(self, ref: ConferenceRef) -> list[Participant]:
        conf = self.active.pop(ref, None)
        return list(conf.participants.values()) if conf else []

    def participants(self) -> int:
        return sum(len(c.participants) for c in self.active.values())

"""Presence for the Front End pool: PIDF documents and subscription tables, sans-IO.

What a watcher sees of a user (docs/reference.md, "Limited functionality"):

- ``available``: registered with full service (or what they PUBLISHed);
- ``offline``: not registered, and the pool that would serve them says so;
- ``unknown``: registered in resiliency mode, or the pool that holds their
  presence cannot be reached. PIDF's ``<basic>`` has only open and closed, so
  unknown is ``closed`` plus a ``<sd:availability>`` element in sipdrill's
  own namespace that says which of the three it is.

Watchers are clients (NOTIFY goes back on the flow their SUBSCRIBE came on)
or other pools (a pool keeps one back-end subscription per remote user its
own clients watch, and fans the NOTIFYs out locally).
"""

from __future__ import annotations

import heapq
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum

PIDF_NS = "urn:ietf:params:xml:ns:pidf"
SIPDRILL_NS = "urn:sipdrill:params:xml:ns:presence"
PIDF_CONTENT_TYPE = "application/pidf+xml"
#: Lync's contact-list event package; a fetch (Expires: 0) returns the list.
CONTACTS_EVENT = "vnd-microsoft-roaming-contacts"
CONTACTS_CONTENT_TYPE = "application/vnd-microsoft-roaming-contacts+xml"
PRESENCE_EVENT = "presence"

#: Subscription lifetimes (s): RFC 6665 lets the notifier shorten them.
DEFAULT_SUBSCRIPTION_EXPIRES = 600
MAX_SUBSCRIPTION_EXPIRES = 3600

ET.register_namespace("", PIDF_NS)
ET.register_namespace("sd", SIPDRILL_NS)


class Availability(StrEnum):
    AVAILABLE = "available"
    OFFLINE = "offline"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class PresenceState:
    entity: str
    availability: Availability
    note: str = ""

    @property
    def basic(self) -> str:
        return "open" if self.availability is Availability.AVAILABLE else "closed"


def render_pidf(state: PresenceState) -> bytes:
    root = ET.Element(f"{{{PIDF_NS}}}presence", {"entity": state.entity})
    tup = ET.SubElement(root, f"{{{PIDF_NS}}}tuple", {"id": "sipdrill"})
    status = ET.SubElement(tup, f"{{{PIDF_NS}}}status")
    ET.SubElement(status, f"{{{PIDF_NS}}}basic").text = state.basic
    ET.SubElement(root, f"{{{SIPDRILL_NS}}}availability").text = state.availability.value
    if state.note:
        ET.SubElement(root, f"{{{PIDF_NS}}}note").text = state.note
    data: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return data


def parse_pidf(body: bytes) -> PresenceState:
    """The state a PIDF document describes; ``ValueError`` if it is not one.

    Without sipdrill's availability element (a PUBLISH from another
    client), ``open`` reads as available and ``closed`` as offline.
    """
    try:
        root = ET.fromstring(body)
    except ET.ParseError as exc:
        raise ValueError(f"not XML: {exc}") from None
    if root.tag != f"{{{PIDF_NS}}}presence":
        raise ValueError("not a PIDF presence document")
    entity = root.get("entity") or ""
    avail_el = root.find(f"{{{SIPDRILL_NS}}}availability")
    note_el = root.find(f"{{{PIDF_NS}}}note")
    note = (note_el.text or "").strip() if note_el is not None else ""
    if avail_el is not None and avail_el.text:
        try:
            return PresenceState(entity, Availability(avail_el.text.strip()), note)
        except ValueError:
            raise ValueError(f"unknown availability {avail_el.text!r}") from None
    basic_el = root.find(f"{{{PIDF_NS}}}tuple/{{{PIDF_NS}}}status/{{{PIDF_NS}}}basic")
    basic = (basic_el.text or "").strip() if basic_el is not None else ""
    if basic not in ("open", "closed"):
        raise ValueError("PIDF without a basic status")
    avail = Availability.AVAILABLE if basic == "open" else Availability.OFFLINE
    return PresenceState(entity, avail, note)


def render_contact_list(owner: str, contacts: list[str]) -> bytes:
    root = ET.Element("contactList", {"owner": owner, "count": str(len(contacts))})
    for uri in contacts:
        ET.SubElement(root, "contact", {"uri": uri})
    data: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return data


def parse_contact_list(body: bytes) -> list[str]:
    root = ET.fromstring(body)
    return [c.get("uri") or "" for c in root.findall("contact")]


def subscription_expires(requested: int | None) -> int:
    if requested is None:
        return DEFAULT_SUBSCRIPTION_EXPIRES
    return max(0, min(requested, MAX_SUBSCRIPTION_EXPIRES))


@dataclass
class Subscription:
    """One presence subscription this pool is the notifier of.

    ``watcher`` is a client AoR (``pool`` None: NOTIFY on ``route``, the flow
    its SUBSCRIBE came on) or a pool FQDN (``pool`` set: NOTIFY over TLS to
    that pool, which relays to its own watchers).
    """

    call_id: str
    watcher_tag: str
    watcher: str
    presentity: str
    local_tag: str
    remote_target: str
    expires_at: float
    route: object = None
    pool: str | None = None
    cseq: int = 0
    last_sent: PresenceState | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.call_id, self.watcher_tag)

    def next_cseq(self) -> int:
        self.cseq += 1
        return self.cseq


@dataclass
class SubscriptionTable:
    """Subscriptions by dialog and by presentity, with lazy expiry."""

    _by_key: dict[tuple[str, str], Subscription] = field(default_factory=dict)
    _by_presentity: dict[str, dict[tuple[str, str], Subscription]] = field(default_factory=dict)
    _heap: list[tuple[float, int, tuple[str, str]]] = field(default_factory=list)
    _seq: int = 0

    def __len__(self) -> int:
        return len(self._by_key)

    def __iter__(self) -> Iterator[Subscription]:
        return iter(list(self._by_key.values()))

    def get(self, key: tuple[str, str]) -> Subscription | None:
        return self._by_key.get(key)

    def put(self, sub: Subscription) -> None:
        old = self._by_key.get(sub.key)
        if old is not None and old.presentity != sub.presentity:
            self.remove(old.key)
        self._by_key[sub.key] = sub
        self._by_presentity.setdefault(sub.presentity, {})[sub.key] = sub
        self._seq += 1
        heapq.heappush(self._heap, (sub.expires_at, self._seq, sub.key))

    def remove(self, key: tuple[str, str]) -> Subscription | None:
        sub = self._by_key.pop(key, None)
        if sub is None:
            return None
        per = self._by_presentity.get(sub.presentity, {})
        per.pop(key, None)
        if not per:
            self._by_presentity.pop(sub.presentity, None)
        return sub

    def watching(self, presentity: str) -> list[Subscription]:
        return list(self._by_presentity.get(presentity, {}).values())

    def presentities(self) -> list[str]:
        return list(self._by_presentity)

    def expire(self, now: float) -> list[Subscription]:
        gone = []
        while self._heap and self._heap[0][0] <= now:
            deadline, _, key = heapq.heappop(self._heap)
            sub = self._by_key.get(key)
            if sub is not None and sub.expires_at == deadline:
                self.remove(key)
                gone.append(sub)
        return gone

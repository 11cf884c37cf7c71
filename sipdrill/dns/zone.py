"""The lab zone: one immutable version per change, one node map per DNS view.

Readers take :attr:`ZoneStore.current` (a single attribute read, so a query
sees either the old or the new version, never half a change). Writers open a
:meth:`ZoneStore.transaction`, which copies only the nodes it touches and, on
success, publishes a new :class:`ZoneVersion` with the SOA serial bumped.

Views: the topology gives every site with a ``client_subnet`` its own view
(its pools first in the SRV priorities) and everyone else the default view,
which this module calls ``"default"``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import dns.exception
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.SOA
import dns.rrset
from dns.rdatatype import RdataType

from sipdrill.dns.errors import NotInZone, RecordConflict, UnknownView, ZoneChangeError
from sipdrill.topology import DnsRecord, Topology

DEFAULT_VIEW = "default"
IN = dns.rdataclass.IN
SOA = dns.rdatatype.SOA
NS = dns.rdatatype.NS
CNAME = dns.rdatatype.CNAME

Node = Mapping[RdataType, dns.rrset.RRset]
"""The RRsets at one owner name, by rdtype."""


def view_key(view: str | None) -> str:
    """The name of a topology view (``None`` is the default view)."""
    return DEFAULT_VIEW if view is None else view


@dataclass(frozen=True)
class SoaTimers:
    refresh: int = 3600
    retry: int = 600
    expire: int = 86400


@dataclass(frozen=True)
class ViewData:
    nodes: Mapping[dns.name.Name, Node]
    #: Every owner name and each of its ancestors up to the origin: a name in
    #: here without a node is an empty non-terminal (NODATA, not NXDOMAIN).
    names: frozenset[dns.name.Name]


@dataclass(frozen=True)
class ZoneVersion:
    origin: dns.name.Name
    serial: int
    views: Mapping[str, ViewData]
    soa: dns.rrset.RRset
    #: The SOA for negative answers: TTL = min(SOA TTL, SOA MINIMUM) (RFC 2308).
    negative_soa: dns.rrset.RRset

    def view(self, name: str) -> ViewData:
        try:
            return self.views[name]
        except KeyError:
            raise UnknownView(f"unknown DNS view; views: {', '.join(sorted(self.views))}") from None


@contextmanager
def _where(part: str | None) -> Iterator[None]:
    """Say where in a change (or a batch) a refusal happened, so that its
    message need not repeat the text that was refused."""
    try:
        yield
    except ZoneChangeError as exc:
        if part is not None:
            exc.where = f"{part}.{exc.where}" if exc.where else part
        raise


def _why(exc: Exception) -> str:
    """What dnspython found wrong, without the text it was given (its
    messages may quote it; its exception classes say the kind)."""
    doc = type(exc).__doc__ if isinstance(exc, dns.exception.DNSException) else None
    return doc.strip().splitlines()[0].rstrip(".").lower() if doc else "malformed"


def _names_of(origin: dns.name.Name, nodes: Iterable[dns.name.Name]) -> frozenset[dns.name.Name]:
    out: set[dns.name.Name] = set()
    for name in nodes:
        while name not in out and name.is_subdomain(origin):
            out.add(name)
            if name == origin:
                break
            name = name.parent()
    return frozenset(out)


def _rrset(
    name: dns.name.Name, rdtype: RdataType, ttl: int, rdatas: Iterable[dns.rdata.Rdata]
) -> dns.rrset.RRset:
    rrset = dns.rrset.RRset(name, IN, rdtype)
    for rd in rdatas:
        rrset.add(rd)
    rrset.ttl = ttl
    return rrset


class ZoneTransaction:
    """Changes to a zone version; nothing is visible until the transaction commits.

    Every method takes the view it changes; :meth:`ZoneStore.apply` and the
    control API loop over views. Methods return whether they changed anything.
    """

    def __init__(self, store: ZoneStore, base: ZoneVersion) -> None:
        self.store = store
        self.base = base
        self.origin = base.origin
        self._nodes: dict[str, dict[dns.name.Name, Node]] = {}
        self._copied: dict[str, set[dns.name.Name]] = {}
        self.changed = False

    @property
    def views(self) -> list[str]:
        return list(self.base.views)

    # --- reading ---------------------------------------------------------

    def node(self, view: str, name: dns.name.Name) -> Node:
        nodes = self._nodes.get(view)
        source = nodes if nodes is not None else self.base.view(view).nodes
        return source.get(name, {})

    def rrset(self, view: str, name: dns.name.Name, rdtype: RdataType) -> dns.rrset.RRset | None:
        return self.node(view, name).get(rdtype)

    # --- writing ---------------------------------------------------------

    def _writable(self, view: str, name: dns.name.Name) -> dict[RdataType, dns.rrset.RRset]:
        if view not in self._nodes:
            self._nodes[view] = dict(self.base.view(view).nodes)
            self._copied[view] = set()
        nodes = self._nodes[view]
        if name not in self._copied[view]:
            nodes[name] = dict(nodes.get(name, {}))
            self._copied[view].add(name)
        node = nodes[name]
        assert isinstance(node, dict)
        return node

    def _ttl(self, ttl: int | None, old: dns.rrset.RRset | None) -> int:
        if ttl is not None:
            return ttl
        return old.ttl if old is not None else self.store.default_ttl

    def _prune(self, view: str, name: dns.name.Name) -> None:
        if not self._nodes[view].get(name):
            self._nodes[view].pop(name, None)
            self._copied[view].discard(name)

    def check_managed(self, name: dns.name.Name, rdtype: RdataType) -> None:
        """SOA and NS belong to the server: the zone is not delegated and its
        serial is the server's."""
        if rdtype in (SOA, NS):
            raise RecordConflict(
                f"{dns.rdatatype.to_text(rdtype)} records are managed by the server "
                "(the apex SOA and NS; no delegations)"
            )
        if dns.rdatatype.is_metatype(rdtype):
            raise ZoneChangeError(f"{dns.rdatatype.to_text(rdtype)} is not a record type")
        if not name.is_subdomain(self.origin):
            raise NotInZone(f"the name is outside the zone {self.origin}")

    def add(
        self,
        view: str,
        name: dns.name.Name,
        rdtype: RdataType,
        rdatas: Sequence[dns.rdata.Rdata],
        ttl: int | None,
        *,
        on_conflict: Literal["raise", "ignore"] = "raise",
    ) -> bool:
        """Add records to an RRset (a CNAME replaces the name's CNAME)."""
        name = name.canonicalize()  # owner names are stored in lower case
        self.check_managed(name, rdtype)
        node = self.node(view, name)
        conflict = None
        if rdtype == CNAME:
            if len(rdatas) > 1:
                conflict = "a name can have only one CNAME"
            elif any(t != CNAME for t in node) or name == self.origin:
                conflict = "the name has other data, so it cannot have a CNAME"
        elif CNAME in node:
            conflict = "the name is a CNAME, so it cannot have other data"
        if conflict is not None:
            if on_conflict == "raise":
                raise RecordConflict(conflict)
            return False
        old = node.get(rdtype)
        if rdtype == CNAME or old is None:
            merged = list(rdatas)
        else:
            merged = list(old) + [rd for rd in rdatas if rd not in old]
        new_ttl = self._ttl(ttl, old)
        if old is not None and old.ttl == new_ttl and set(old) == set(merged):
            return False
        if not merged:
            return False
        self._writable(view, name)[rdtype] = _rrset(name, rdtype, new_ttl, merged)
        self.changed = True
        return True

    def replace(
        self,
        view: str,
        name: dns.name.Name,
        rdtype: RdataType,
        rdatas: Sequence[dns.rdata.Rdata],
        ttl: int | None,
    ) -> bool:
        """Make the RRset exactly ``rdatas`` (empty: delete it)."""
        name = name.canonicalize()
        self.check_managed(name, rdtype)
        old = self.rrset(view, name, rdtype)
        if not rdatas:
            return self.delete_rrset(view, name, rdtype)
        new_ttl = self._ttl(ttl, old)
        if old is not None and old.ttl == new_ttl and set(old) == set(rdatas):
            return False
        node = self.node(view, name)
        others = [t for t in node if t != rdtype]
        if rdtype == CNAME and (others or len(rdatas) > 1 or name == self.origin):
            raise RecordConflict("the name has other data or several targets: no CNAME possible")
        if rdtype != CNAME and CNAME in node:
            raise RecordConflict("the name is a CNAME, so it cannot have other data")
        self._writable(view, name)[rdtype] = _rrset(name, rdtype, new_ttl, rdatas)
        self.changed = True
        return True

    def delete_rrset(self, view: str, name: dns.name.Name, rdtype: RdataType) -> bool:
        self.check_managed(name, rdtype)
        if self.rrset(view, name, rdtype) is None:
            return False
        del self._writable(view, name)[rdtype]
        self._prune(view, name)
        self.changed = True
        return True

    def delete_rdata(self, view: str, name: dns.name.Name, rdata: dns.rdata.Rdata) -> bool:
        self.check_managed(name, rdata.rdtype)
        old = self.rrset(view, name, rdata.rdtype)
        if old is None or rdata not in old:
            return False
        rest = [rd for rd in old if rd != rdata]
        node = self._writable(view, name)
        if rest:
            node[rdata.rdtype] = _rrset(name, rdata.rdtype, old.ttl, rest)
        else:
            del node[rdata.rdtype]
            self._prune(view, name)
        self.changed = True
        return True

    def delete_name(self, view: str, name: dns.name.Name) -> bool:
        """Delete every RRset at ``name`` (at the apex, all but SOA and NS)."""
        if not name.is_subdomain(self.origin):
            raise NotInZone(f"the name is outside the zone {self.origin}")
        node = self.node(view, name)
        doomed = [t for t in node if not (name == self.origin and t in (SOA, NS))]
        if not doomed:
            return False
        writable = self._writable(view, name)
        for t in doomed:
            del writable[t]
        self._prune(view, name)
        self.changed = True
        return True

    # --- commit ----------------------------------------------------------

    def _version(self) -> ZoneVersion:
        serial = (self.base.serial + 1) & 0xFFFFFFFF
        soa, negative = self.store.make_soa(serial)
        views: dict[str, ViewData] = {}
        for name, data in self.base.views.items():
            nodes = self._nodes.get(name)
            names = data.names if nodes is None else _names_of(self.origin, nodes)
            out = dict(nodes if nodes is not None else data.nodes)
            apex = dict(out[self.origin])
            apex[SOA] = soa
            out[self.origin] = apex
            views[name] = ViewData(out, names)
        return ZoneVersion(self.origin, serial, views, soa, negative)


@dataclass(frozen=True)
class RecordChange:
    """One change in presentation form, as the control API and the orchestrator
    give it.

    ``op``: ``add`` records to an RRset, ``replace`` an RRset (empty ``data``
    deletes it), ``delete`` records (``data`` given), an RRset (``rtype``
    given) or every RRset at the name. ``views``: ``None`` for every view.
    """

    op: Literal["add", "replace", "delete"]
    name: str
    rtype: str | None = None
    data: tuple[str, ...] = ()
    ttl: int | None = None
    views: tuple[str, ...] | None = None


ChangeListener = Callable[[ZoneVersion], None]


class ZoneStore:
    """The zone of one topology, with live, atomic changes.

    ``address_map`` rewrites topology addresses (pass ``topology.loopback_map()``
    for the local runtime). ``serial`` defaults to the current Unix time, so a
    restarted server never goes back in serial.
    """

    def __init__(
        self,
        topology: Topology,
        *,
        address_map: Mapping[str, str] | None = None,
        serial: int | None = None,
        timers: SoaTimers = SoaTimers(),
        hostmaster: str | None = None,
    ) -> None:
        self.topology = topology
        self.address_map = dict(address_map or {})
        self.origin = dns.name.from_text(topology.domain)
        self.default_ttl = topology.dns.ttl
        self.negative_ttl = topology.dns.negative_ttl
        self.timers = timers
        self.mname = dns.name.from_text(topology.nameserver_fqdn)
        self.rname = dns.name.from_text(hostmaster or f"hostmaster.{topology.domain}")
        views = [view_key(v) for v in topology.dns_views()]
        if len(set(views)) != len(views):
            raise ZoneChangeError(
                f"a site is named {DEFAULT_VIEW!r}, the name of the default DNS view: rename it"
            )
        self.view_names = views
        self.warnings: list[str] = []
        self._lock = threading.RLock()
        self._listeners: list[ChangeListener] = []
        first = int(time.time()) & 0xFFFFFFFF if serial is None else serial & 0xFFFFFFFF
        self._current = self._from_topology(first)

    # --- reading ---------------------------------------------------------

    @property
    def current(self) -> ZoneVersion:
        return self._current

    @property
    def serial(self) -> int:
        return self._current.serial

    def name(self, text: str) -> dns.name.Name:
        """An owner name from text: absolute with a trailing dot, or ending in the
        domain, or relative to the domain (``"sip"``, ``"@"``)."""
        t = text.strip()
        domain = self.topology.domain
        try:
            if t in ("", "@"):
                name = self.origin
            elif t.endswith(".") or t.lower() == domain or t.lower().endswith("." + domain):
                name = dns.name.from_text(t if t.endswith(".") else t + ".")
            else:
                name = dns.name.from_text(t, origin=self.origin)
        except (dns.exception.DNSException, ValueError) as exc:
            raise ZoneChangeError(f"not a DNS name ({_why(exc)})") from None
        if not name.is_subdomain(self.origin):
            raise NotInZone(f"the name is outside the zone {self.origin}")
        return name

    def rdtype(self, text: str) -> RdataType:
        try:
            rdtype = dns.rdatatype.from_text(text.strip().upper())
        except (dns.exception.DNSException, ValueError):
            raise ZoneChangeError("unknown record type") from None
        if dns.rdatatype.is_metatype(rdtype):
            raise ZoneChangeError(f"{dns.rdatatype.to_text(rdtype)} is not a record type")
        return rdtype

    def rdata(self, rdtype: RdataType, text: str) -> dns.rdata.Rdata:
        try:
            return dns.rdata.from_text(IN, rdtype, text, origin=self.origin, relativize=False)
        except (dns.exception.DNSException, ValueError) as exc:
            kind = dns.rdatatype.to_text(rdtype)
            raise ZoneChangeError(f"not valid {kind} data ({_why(exc)})") from None

    def records(
        self, view: str = DEFAULT_VIEW, name: str | None = None, rtype: str | None = None
    ) -> list[DnsRecord]:
        """The view's records in presentation form, sorted by name and type."""
        data = self._current.view(view)
        owner = self.name(name) if name is not None else None
        want = self.rdtype(rtype) if rtype is not None else None
        out: list[DnsRecord] = []
        for n in sorted(data.nodes):
            if owner is not None and n != owner:
                continue
            for t in sorted(data.nodes[n]):
                if want is not None and t != want:
                    continue
                rrset = data.nodes[n][t]
                for rd in rrset:
                    out.append(
                        DnsRecord(
                            n.to_text(omit_final_dot=True), dns.rdatatype.to_text(t), rrset.ttl,
                            rd.to_text(),
                        )
                    )
        return out

    # --- writing ---------------------------------------------------------

    def on_change(self, listener: ChangeListener) -> None:
        self._listeners.append(listener)

    @contextmanager
    def transaction(self) -> Iterator[ZoneTransaction]:
        """Serialises writers; publishes the new version only if the block
        succeeds and changed something."""
        with self._lock:
            txn = ZoneTransaction(self, self._current)
            yield txn
            if txn.changed:
                self._publish(txn._version())

    def reset(self) -> ZoneVersion:
        """Back to the topology's records, with a higher serial."""
        with self._lock:
            self._publish(self._from_topology((self._current.serial + 1) & 0xFFFFFFFF))
            return self._current

    def views_for(self, views: Sequence[str] | None) -> list[str]:
        if views is None:
            return list(self.view_names)
        for v in views:
            if v not in self.view_names:
                raise UnknownView(f"unknown DNS view; views: {', '.join(self.view_names)}")
        return list(dict.fromkeys(views))

    def apply(self, changes: Iterable[RecordChange]) -> tuple[ZoneVersion, bool]:
        """Apply ``changes`` atomically: all of them in one new version (one
        serial bump), or none if any is refused (:class:`ZoneChangeError`).
        Returns the current version and whether anything changed."""
        batch = list(changes)
        with self.transaction() as txn:
            for i, change in enumerate(batch):
                with _where(f"changes[{i}]" if len(batch) > 1 else None):
                    self._apply_one(txn, change)
            changed = txn.changed
        return self._current, changed

    def _apply_one(self, txn: ZoneTransaction, change: RecordChange) -> None:
        with _where("name"):
            name = self.name(change.name)
        with _where("views"):
            views = self.views_for(change.views)
        if change.rtype is None:
            if change.op != "delete" or change.data:
                raise ZoneChangeError(f"{change.op} needs a record type")
            for v in views:
                txn.delete_name(v, name)
            return
        with _where("type"):
            rdtype = self.rdtype(change.rtype)
        rdatas = []
        for i, text in enumerate(change.data):
            with _where(f"data[{i}]"):
                rdatas.append(self.rdata(rdtype, text))
        if change.ttl is not None and not 0 <= change.ttl <= 0x7FFFFFFF:
            raise ZoneChangeError("ttl: out of range (0 to 2147483647)")
        for v in views:
            if change.op == "add":
                if not rdatas:
                    raise ZoneChangeError("add needs at least one record")
                txn.add(v, name, rdtype, rdatas, change.ttl)
            elif change.op == "replace":
                txn.replace(v, name, rdtype, rdatas, change.ttl)
            elif change.op == "delete":
                if rdatas:
                    for rd in rdatas:
                        txn.delete_rdata(v, name, rd)
                else:
                    txn.delete_rrset(v, name, rdtype)
            else:
                raise ZoneChangeError("unknown operation (add, replace or delete)")

    def _publish(self, version: ZoneVersion) -> None:
        self._current = version
        for listener in self._listeners:
            listener(version)

    # --- building --------------------------------------------------------

    def make_soa(self, serial: int) -> tuple[dns.rrset.RRset, dns.rrset.RRset]:
        t = self.timers
        rd = dns.rdtypes.ANY.SOA.SOA(  # type: ignore[no-untyped-call]
            IN, SOA, self.mname, self.rname, serial, t.refresh, t.retry, t.expire, self.negative_ttl
        )
        soa = _rrset(self.origin, SOA, self.default_ttl, [rd])
        negative = _rrset(self.origin, SOA, min(self.default_ttl, self.negative_ttl), [rd])
        return soa, negative

    def _from_topology(self, serial: int) -> ZoneVersion:
        soa, negative = self.make_soa(serial)
        ns_rdata = dns.rdata.from_text(IN, NS, str(self.mname))
        ns = _rrset(self.origin, NS, self.default_ttl, [ns_rdata])
        warnings: list[str] = []
        views: dict[str, ViewData] = {}
        for view in self.topology.dns_views():
            nodes: dict[dns.name.Name, dict[RdataType, dns.rrset.RRset]] = {
                self.origin: {SOA: soa, NS: ns}
            }
            for rec in self.topology.dns_records(view, self.address_map):
                problem = self._load_record(nodes, rec)
                if problem and problem not in warnings:
                    warnings.append(problem)
            views[view_key(view)] = ViewData(nodes, _names_of(self.origin, nodes))
        self.warnings = warnings
        return ZoneVersion(self.origin, serial, views, soa, negative)

    def _load_record(
        self, nodes: dict[dns.name.Name, dict[RdataType, dns.rrset.RRset]], rec: DnsRecord
    ) -> str | None:
        try:
            name = dns.name.from_text(rec.name)
            rdtype = dns.rdatatype.from_text(rec.rtype)
            rd = dns.rdata.from_text(IN, rdtype, rec.data, origin=self.origin, relativize=False)
        except (dns.exception.DNSException, ValueError) as exc:
            return f"skipped {rec.name} {rec.rtype} {rec.data!r}: {exc}"
        if not name.is_subdomain(self.origin):
            return f"skipped {rec.name} {rec.rtype}: outside the zone {self.origin}"
        node = nodes.setdefault(name, {})
        if (rdtype == CNAME and any(t != CNAME for t in node)) or (
            rdtype != CNAME and CNAME in node
        ):
            return f"skipped {rec.name} {rec.rtype}: a CNAME cannot share its name with other data"
        old = node.get(rdtype)
        if old is None or rdtype == CNAME:
            node[rdtype] = _rrset(name, rdtype, rec.ttl, [rd])
            return None
        merged = _rrset(name, rdtype, min(old.ttl, rec.ttl), [*old, rd])
        node[rdtype] = merged
        if old.ttl != rec.ttl:
            return f"{rec.name} {rec.rtype}: records with different TTLs, using {merged.ttl}"
        return None

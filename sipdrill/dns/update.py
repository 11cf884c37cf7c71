"""RFC 2136 dynamic UPDATE: zone check, prerequisites, prescan and apply, all
inside one zone transaction, so an update is applied whole or not at all.

Updates apply to every DNS view (the drill repoints DNS for everyone);
prerequisites are checked against the view of the client that sent them.
SOA and NS changes are ignored (RFC 2136 3.4.2.2 lets a server ignore SOA
changes; the server owns the apex NS and serves no delegations).
"""

from __future__ import annotations

from collections import defaultdict

import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import dns.update
from dns.rdatatype import RdataType

from sipdrill.dns.errors import ZoneChangeError
from sipdrill.dns.wire import RRHeader, rr_headers
from sipdrill.dns.zone import NS, SOA, ZoneStore, ZoneTransaction

ANY = dns.rdataclass.ANY
NONE = dns.rdataclass.NONE
#: Types that can never be added or named in a delete (RFC 2136 3.4.1.3).
_NEVER = {
    dns.rdatatype.AXFR, dns.rdatatype.IXFR, dns.rdatatype.MAILA, dns.rdatatype.MAILB,
    dns.rdatatype.OPT, dns.rdatatype.TSIG, dns.rdatatype.TKEY,
}


class _Reject(Exception):
    def __init__(self, rcode: int) -> None:
        super().__init__(rcode)
        self.rcode = rcode


def process_update(
    msg: dns.update.UpdateMessage, wire: bytes, store: ZoneStore, view: str
) -> int:
    """Apply an authenticated UPDATE; return its rcode. Nothing changes unless
    the rcode is NOERROR."""
    if len(msg.zone) != 1:
        return dns.rcode.FORMERR
    zone = msg.zone[0]
    if zone.rdclass != dns.rdataclass.IN or zone.name != store.origin:
        return dns.rcode.NOTAUTH
    headers = rr_headers(wire)
    prereq_headers = [h for h in headers if h.section == 1]
    update_headers = [h for h in headers if h.section == 2]
    if len(prereq_headers) != len(msg.prerequisite) or len(update_headers) != len(msg.update):
        return dns.rcode.FORMERR  # one RR per RRset: the counts must agree
    try:
        with store.transaction() as txn:
            _check_prerequisites(txn, view, msg.prerequisite, prereq_headers)
            _prescan(txn, msg.update, update_headers)
            for rrset in msg.update:
                for v in txn.views:
                    _apply(txn, v, rrset)
    except _Reject as exc:
        return exc.rcode
    except ZoneChangeError as exc:
        return exc.rcode
    return dns.rcode.NOERROR


def _in_use(txn: ZoneTransaction, view: str, name: dns.name.Name) -> bool:
    return bool(txn.node(view, name))


def _check_prerequisites(
    txn: ZoneTransaction, view: str, prereqs: list[dns.rrset.RRset], headers: list[RRHeader]
) -> None:
    """RFC 2136 3.2.5."""
    values: dict[tuple[dns.name.Name, RdataType], set[dns.rdata.Rdata]] = defaultdict(set)
    for rrset, header in zip(prereqs, headers, strict=True):
        if header.ttl != 0:
            raise _Reject(dns.rcode.FORMERR)
        if not rrset.name.is_subdomain(txn.origin):
            raise _Reject(dns.rcode.NOTZONE)
        rdtype = rrset.rdtype
        if rrset.deleting == ANY:
            if header.rdlength != 0:
                raise _Reject(dns.rcode.FORMERR)
            if rdtype == dns.rdatatype.ANY:
                if not _in_use(txn, view, rrset.name):
                    raise _Reject(dns.rcode.NXDOMAIN)
            elif txn.rrset(view, rrset.name, rdtype) is None:
                raise _Reject(dns.rcode.NXRRSET)
        elif rrset.deleting == NONE:
            if header.rdlength != 0:
                raise _Reject(dns.rcode.FORMERR)
            if rdtype == dns.rdatatype.ANY:
                if _in_use(txn, view, rrset.name):
                    raise _Reject(dns.rcode.YXDOMAIN)
            elif txn.rrset(view, rrset.name, rdtype) is not None:
                raise _Reject(dns.rcode.YXRRSET)
        elif rrset.rdclass == dns.rdataclass.IN and rrset.deleting is None:
            if dns.rdatatype.is_metatype(rdtype):
                raise _Reject(dns.rcode.FORMERR)
            values[(rrset.name, rdtype)].update(rrset)
        else:
            raise _Reject(dns.rcode.FORMERR)
    for (owner, vtype), wanted in values.items():
        have = txn.rrset(view, owner, vtype)
        if have is None or set(have) != wanted:
            raise _Reject(dns.rcode.NXRRSET)


def _prescan(txn: ZoneTransaction, updates: list[dns.rrset.RRset], headers: list[RRHeader]) -> None:
    """RFC 2136 3.4.1."""
    for rrset, header in zip(updates, headers, strict=True):
        if not rrset.name.is_subdomain(txn.origin):
            raise _Reject(dns.rcode.NOTZONE)
        rdtype = rrset.rdtype
        if rrset.deleting is None:
            if rrset.rdclass != dns.rdataclass.IN or dns.rdatatype.is_metatype(rdtype):
                raise _Reject(dns.rcode.FORMERR)
        elif rrset.deleting == ANY:
            if header.ttl != 0 or header.rdlength != 0 or rdtype in _NEVER:
                raise _Reject(dns.rcode.FORMERR)
        elif rrset.deleting == NONE:
            if header.ttl != 0 or dns.rdatatype.is_metatype(rdtype):
                raise _Reject(dns.rcode.FORMERR)
        else:
            raise _Reject(dns.rcode.FORMERR)


def _apply(txn: ZoneTransaction, view: str, rrset: dns.rrset.RRset) -> None:
    """RFC 2136 3.4.2, for one RR (updates are parsed one RR per RRset)."""
    name, rdtype = rrset.name, rrset.rdtype
    if rdtype in (SOA, NS):
        return  # server-managed: ignored
    if rrset.deleting is None:
        # A CNAME where other data exists, or other data at a CNAME, is ignored.
        txn.add(view, name, rdtype, list(rrset), rrset.ttl, on_conflict="ignore")
    elif rrset.deleting == ANY:
        if rdtype == dns.rdatatype.ANY:
            txn.delete_name(view, name)
        else:
            txn.delete_rrset(view, name, rdtype)
    else:
        for rd in rrset:
            txn.delete_rdata(view, name, rd)


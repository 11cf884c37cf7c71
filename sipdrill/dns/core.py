"""The sans-IO core of the lab's authoritative DNS server.

:meth:`DnsCore.handle_query` takes the bytes of one DNS message, where it
came from and the time, and returns the bytes to send back, or ``None`` for
no answer. It does no I/O and never raises, so the asyncio adapter
(:mod:`sipdrill.dns.server`), the tests and the fuzzer drive the same code.

What is answered how:

* a message shorter than a header, or a *response* (QR set), gets nothing:
  answering responses lets two servers loop on each other;
* opcodes other than QUERY and UPDATE: NOTIMP;
* anything that does not parse: FORMERR (header only, same ID);
* TSIG: an unknown key or a bad signature gets NOTAUTH with TSIG error
  BADKEY/BADSIG (unsigned, RFC 8945 5.3.2), a bad time NOTAUTH/BADTIME (signed);
  a good signature gets a signed answer;
* EDNS version above 0: BADVERS;
* names outside the zone, classes other than IN, zone transfers: REFUSED;
* otherwise an authoritative answer from the client's view: CNAMEs chased
  inside the zone, A/AAAA of SRV, MX and NS targets in the additional section,
  NXDOMAIN or NODATA with the SOA (TTL min(SOA TTL, MINIMUM)) in authority,
  ANY answered with every RRset at the name;
* over UDP an answer larger than 512 bytes (no EDNS) or the EDNS payload
  (capped by ``max_udp_payload``) is cut to whole RRsets with TC set.

Answers that depend only on the zone version, the view, the transport and
the query bytes after the ID (no TSIG) are cached by those bytes, until the
zone changes: a re-registration storm is thousands of identical questions.
"""

from __future__ import annotations

import ipaddress
import logging
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TSIG
import dns.renderer
import dns.rrset
import dns.tsig
import dns.update

from sipdrill.dns.errors import ConfigError
from sipdrill.dns.metrics import QTYPE_LABELS, DnsMetrics
from sipdrill.dns.tsig import Keyring
from sipdrill.dns.update import process_update
from sipdrill.dns.wire import QR, error_response, rr_headers
from sipdrill.dns.zone import DEFAULT_VIEW, ViewData, ZoneStore, ZoneVersion, view_key

log = logging.getLogger(__name__)

Transport = Literal["udp", "tcp"]
Source = tuple[str, int] | tuple[str, int, int, int] | str | None
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_CNAME_CHAIN = 16
_FORMERR_QTYPES = {dns.rdatatype.OPT, dns.rdatatype.TSIG, dns.rdatatype.TKEY}
_TRANSFER_QTYPES = {dns.rdatatype.AXFR, dns.rdatatype.IXFR}
_GLUE_TYPES = (dns.rdatatype.A, dns.rdatatype.AAAA)
_QR_BYTE = QR >> 8  # QR in the third byte of the header


@dataclass
class Faults:
    """Faults the orchestrator injects: ``drop`` answers nothing, ``servfail``
    answers SERVFAIL, ``latency`` (seconds) delays every answer."""

    drop: bool = False
    servfail: bool = False
    latency: float = 0.0

    def clear(self) -> None:
        self.drop = False
        self.servfail = False
        self.latency = 0.0

    @property
    def active(self) -> bool:
        return self.drop or self.servfail or self.latency > 0


@dataclass
class _Reply:
    wire: bytes
    qtype: str
    rcode: int
    cacheable: bool = True


@dataclass
class _Cache:
    version: ZoneVersion | None = None
    #: (view, transport, query after its ID) -> (answer after its ID, metrics key)
    entries: dict[tuple[str, str, bytes], tuple[bytes, tuple[str, str, str]]] = field(
        default_factory=dict
    )


def qtype_label(rdtype: dns.rdatatype.RdataType) -> str:
    text = dns.rdatatype.to_text(rdtype)
    return text if text in QTYPE_LABELS else "OTHER"


class DnsCore:
    """Answers DNS messages for one :class:`ZoneStore`.

    ``keyring`` holds the TSIG keys allowed to UPDATE the zone (none: UPDATE
    is REFUSED). ``client_views`` maps source networks to views before the
    topology's client subnets are consulted (the local runtime's clients all
    come from 127.0.0.0/8).
    """

    def __init__(
        self,
        zone: ZoneStore,
        *,
        keyring: Keyring | None = None,
        max_udp_payload: int = 1232,
        client_views: Mapping[str, str] | Iterable[tuple[Network, str]] = (),
        answer_cache_size: int = 4096,
        metrics: DnsMetrics | None = None,
    ) -> None:
        self.zone = zone
        self.keyring: Keyring = dict(keyring or {})
        self.max_udp_payload = max(512, min(max_udp_payload, 65535))
        pairs = client_views.items() if isinstance(client_views, Mapping) else client_views
        self.client_views: list[tuple[Network, str]] = []
        for net, view in pairs:
            try:
                network = ipaddress.ip_network(net, strict=False) if isinstance(net, str) else net
            except ValueError:
                raise ConfigError(f"client view {net}={view}: {net} is not a network") from None
            if view not in zone.view_names:
                raise ConfigError(f"client view {net}={view}: views are {zone.view_names}")
            self.client_views.append((network, view))
        self.answer_cache_size = answer_cache_size
        self.metrics = metrics if metrics is not None else DnsMetrics()
        self.faults = Faults()
        self._cache = _Cache()
        self._views: dict[str, str] = {}
        self.metrics.serial.set(zone.serial)
        zone.on_change(lambda version: self.metrics.serial.set(version.serial))
        self.set_faults()

    def set_faults(
        self, *, drop: bool = False, servfail: bool = False, latency: float = 0.0
    ) -> None:
        """Replace the injected faults (no arguments: clear them)."""
        if latency < 0:
            raise ValueError("latency must be >= 0")
        self.faults.drop, self.faults.servfail, self.faults.latency = drop, servfail, latency
        self.metrics.fault.labels("drop").set(int(drop))
        self.metrics.fault.labels("servfail").set(int(servfail))
        self.metrics.fault.labels("latency").set(latency)

    # --- views -----------------------------------------------------------

    def view_for(self, source: Source) -> str:
        """The view for a client address (``(host, port)`` or a host string)."""
        host = source[0] if isinstance(source, tuple) else source
        if host is None:
            return DEFAULT_VIEW
        cached = self._views.get(host)
        if cached is not None:
            return cached
        view = self._view_for(host)
        if len(self._views) > 65536:
            self._views.clear()
        self._views[host] = view
        return view

    def _view_for(self, host: str) -> str:
        try:
            addr = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return DEFAULT_VIEW
        for net, view in self.client_views:
            if addr.version == net.version and addr in net:
                return view
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        if isinstance(addr, ipaddress.IPv4Address):
            return view_key(self.zone.topology.view_for_client(addr))
        return DEFAULT_VIEW

    # --- entry point -----------------------------------------------------

    def handle_query(
        self, wire: bytes, source: Source, now: float, transport: Transport = "udp"
    ) -> bytes | None:
        """Answer one DNS message (any opcode; UPDATE goes to :meth:`handle_update`).

        ``now`` is Unix time (TSIG checks it). Returns ``None`` when nothing
        must be sent. Never raises.
        """
        if len(wire) < 12:
            self.metrics.drop("short")
            return None
        if wire[2] & _QR_BYTE:
            self.metrics.drop("response")
            return None
        faults = self.faults
        if faults.drop:
            self.metrics.drop("fault")
            return None
        host = source[0] if isinstance(source, tuple) else source
        view = self._views.get(host) if host is not None else None
        if view is None:
            view = self.view_for(source)
        key: tuple[str, str, bytes] | None = None
        if self.answer_cache_size > 0 and not faults.servfail:
            # The hit path is what a storm costs: kept to a few dict look-ups.
            cache = self._cache
            version = self.zone.current
            if cache.version is not version:
                cache.entries.clear()
                cache.version = version
            key = (view, transport, wire[2:])
            hit = cache.entries.get(key)
            if hit is not None:
                tail, counter = hit
                counts = self.metrics.query_counts
                counts[counter] = counts.get(counter, 0) + 1
                return wire[:2] + tail
        try:
            reply = self._handle(wire, view, now, transport, faults.servfail)
        except Exception:  # a bug must not take the server down
            log.exception("DNS message could not be answered")
            servfail = error_response(wire, dns.rcode.SERVFAIL)
            reply = _Reply(servfail, "NONE", dns.rcode.SERVFAIL, False)
        rlabel = dns.rcode.to_text(dns.rcode.Rcode.make(reply.rcode))
        if reply.qtype != "UPDATE":
            self.metrics.query(reply.qtype, rlabel, transport)
        if key is not None and reply.cacheable:
            entries = self._cache.entries
            if len(entries) >= self.answer_cache_size:
                entries.clear()
            entries[key] = (reply.wire[2:], (reply.qtype, rlabel, transport))
        return reply.wire

    def handle_update(
        self, wire: bytes, source: Source, now: float, transport: Transport = "udp"
    ) -> bytes | None:
        """Answer an RFC 2136 UPDATE message (FORMERR if ``wire`` is something else)."""
        if len(wire) >= 12 and (wire[2] >> 3) & 0xF != dns.opcode.UPDATE:
            return error_response(wire, dns.rcode.FORMERR)
        return self.handle_query(wire, source, now, transport)

    # --- dispatch --------------------------------------------------------

    def _handle(
        self, wire: bytes, view: str, now: float, transport: Transport, servfail: bool
    ) -> _Reply:
        opcode = (wire[2] >> 3) & 0xF
        if opcode not in (dns.opcode.QUERY, dns.opcode.UPDATE):
            return _Reply(error_response(wire, dns.rcode.NOTIMP), "NONE", dns.rcode.NOTIMP)
        try:
            msg = dns.message.from_wire(wire, keyring=False)
        except Exception:
            return _Reply(error_response(wire, dns.rcode.FORMERR), "NONE", dns.rcode.FORMERR)
        if msg.had_tsig:
            refusal = self._check_tsig(msg, wire, now)
            if refusal is not None:
                return refusal
        if servfail:
            return self._simple(msg, dns.rcode.SERVFAIL, transport, cacheable=False)
        if opcode == dns.opcode.UPDATE:
            assert isinstance(msg, dns.update.UpdateMessage)
            return self._update(msg, wire, view)
        return self._query(msg, view, transport)

    def _limit(self, msg: dns.message.Message, transport: Transport) -> int:
        if transport == "tcp":
            return 65535
        if msg.edns >= 0:
            return max(512, min(msg.payload, self.max_udp_payload))
        return 512

    def _response(self, msg: dns.message.Message) -> dns.message.Message:
        resp = dns.message.make_response(msg, our_payload=self.max_udp_payload, pad=0)
        if msg.edns >= 0 and msg.ednsflags & dns.flags.DO:
            resp.ednsflags |= dns.flags.DO
        return resp

    def _render(
        self, resp: dns.message.Message, msg: dns.message.Message, transport: Transport
    ) -> bytes:
        # Records in a stable order: answers are a pure function of the query,
        # so they can be cached (clients randomise, RFC 2782 and Lync's DNS LB).
        return resp.to_wire(
            max_size=self._limit(msg, transport), prefer_truncation=True, want_shuffle=False
        )

    def _simple(
        self, msg: dns.message.Message, rcode: int, transport: Transport, *, cacheable: bool = True
    ) -> _Reply:
        resp = self._response(msg)
        resp.set_rcode(dns.rcode.Rcode.make(rcode))
        label = "UPDATE" if msg.opcode() == dns.opcode.UPDATE else self._qlabel(msg)
        out = self._render(resp, msg, transport)
        return _Reply(out, label, rcode, cacheable and not msg.had_tsig)

    @staticmethod
    def _qlabel(msg: dns.message.Message) -> str:
        return qtype_label(msg.question[0].rdtype) if len(msg.question) == 1 else "NONE"

    # --- TSIG ------------------------------------------------------------

    def _check_tsig(self, msg: dns.message.Message, wire: bytes, now: float) -> _Reply | None:
        assert msg.tsig is not None
        rd = msg.tsig[0]
        assert isinstance(rd, dns.rdtypes.ANY.TSIG.TSIG)
        keyname = msg.tsig.name
        key = self.keyring.get(keyname)
        if key is None or key.algorithm != rd.algorithm:
            return self._tsig_refusal(msg, keyname, rd, dns.rcode.BADKEY)
        tsig_start = rr_headers(wire)[-1].offset
        try:
            dns.tsig.validate(  # type: ignore[no-untyped-call]
                wire, key, keyname, rd, int(now), b"", tsig_start
            )
        except dns.tsig.BadTime:
            msg.keyring = key
            resp = dns.message.make_response(msg)
            signed_at = int(now)
            other = struct.pack("!HI", (signed_at >> 32) & 0xFFFF, signed_at & 0xFFFFFFFF)
            resp.use_tsig(key, fudge=rd.fudge, tsig_error=dns.rcode.BADTIME, other_data=other)
            resp.request_mac = rd.mac
            resp.set_rcode(dns.rcode.NOTAUTH)
            return _Reply(resp.to_wire(), self._label(msg), dns.rcode.NOTAUTH, False)
        except dns.exception.FormError:
            return _Reply(error_response(wire, dns.rcode.FORMERR), "NONE", dns.rcode.FORMERR, False)
        except Exception:
            return self._tsig_refusal(msg, keyname, rd, dns.rcode.BADSIG)
        msg.keyring = key
        return None

    def _label(self, msg: dns.message.Message) -> str:
        return "UPDATE" if msg.opcode() == dns.opcode.UPDATE else self._qlabel(msg)

    def _tsig_refusal(
        self, msg: dns.message.Message, keyname: dns.name.Name, rd: dns.rdtypes.ANY.TSIG.TSIG,
        error: int,
    ) -> _Reply:
        """NOTAUTH with an unsigned TSIG carrying ``error`` (RFC 8945 5.3.2)."""
        resp = dns.message.make_response(msg)
        resp.set_rcode(dns.rcode.NOTAUTH)
        tsig = dns.rdtypes.ANY.TSIG.TSIG(  # type: ignore[no-untyped-call]
            dns.rdataclass.ANY, dns.rdatatype.TSIG, rd.algorithm, rd.time_signed, rd.fudge,
            b"", msg.id, error, b"",
        )
        resp.tsig = dns.rrset.from_rdata(keyname, 0, tsig)
        if msg.opcode() == dns.opcode.UPDATE:
            self.metrics.updates.labels("wire", "NOTAUTH").inc()
        return _Reply(resp.to_wire(), self._label(msg), dns.rcode.NOTAUTH, False)

    # --- UPDATE ----------------------------------------------------------

    def _update(self, msg: dns.update.UpdateMessage, wire: bytes, view: str) -> _Reply:
        # Only TSIG-signed updates with a configured key change the zone.
        rcode = process_update(msg, wire, self.zone, view) if msg.had_tsig else dns.rcode.REFUSED
        self.metrics.updates.labels("wire", dns.rcode.to_text(dns.rcode.Rcode.make(rcode))).inc()
        resp = dns.message.make_response(msg)
        resp.set_rcode(dns.rcode.Rcode.make(rcode))
        return _Reply(resp.to_wire(), "UPDATE", rcode, False)

    # --- QUERY -----------------------------------------------------------

    def _query(self, msg: dns.message.Message, view: str, transport: Transport) -> _Reply:
        if msg.edns > 0:
            return self._simple(msg, dns.rcode.BADVERS, transport)
        if len(msg.question) != 1:
            return self._simple(msg, dns.rcode.FORMERR, transport)
        q = msg.question[0]
        qtype = q.rdtype
        if qtype in _FORMERR_QTYPES:
            return self._simple(msg, dns.rcode.FORMERR, transport)
        version = self.zone.current
        if q.rdclass not in (dns.rdataclass.IN, dns.rdataclass.ANY):
            return self._simple(msg, dns.rcode.REFUSED, transport)
        if not q.name.is_subdomain(version.origin) or qtype in _TRANSFER_QTYPES:
            return self._simple(msg, dns.rcode.REFUSED, transport)
        if dns.rdatatype.is_metatype(qtype) and qtype != dns.rdatatype.ANY:
            return self._simple(msg, dns.rcode.NOTIMP, transport)
        resp = self._response(msg)
        resp.flags |= dns.flags.AA
        rcode = self._resolve(resp, version, version.view(view), q.name, qtype)
        resp.set_rcode(dns.rcode.Rcode.make(rcode))
        if msg.had_tsig or q.name.canonicalize().labels == q.name.labels:
            out = self._render(resp, msg, transport)
        else:
            out = self._render_respelled(resp, self._limit(msg, transport))
        return _Reply(out, qtype_label(qtype), rcode, not msg.had_tsig)

    @staticmethod
    def _render_respelled(resp: dns.message.Message, limit: int) -> bytes:
        """Render an unsigned answer whose question is not in lower case.

        dnspython compresses names case-insensitively, so answer names would
        point into the question and take the client's spelling (``pool1.LAB.local``).
        Here the question is not a compression target: answers keep the
        zone's spelling, the question keeps the client's (0x20 resolvers check it).
        """
        r: Any = dns.renderer.Renderer(resp.id, resp.flags, limit)  # type: ignore[no-untyped-call]
        opt_reserve = 11 if resp.opt is not None else 0  # root name + fixed fields, no options
        r.reserve(opt_reserve)
        q = resp.question[0]
        r.add_question(q.name, q.rdtype, q.rdclass)
        r.compress.clear()
        try:
            for section, rrsets in (
                (dns.renderer.ANSWER, resp.answer),
                (dns.renderer.AUTHORITY, resp.authority),
                (dns.renderer.ADDITIONAL, resp.additional),
            ):
                for rrset in rrsets:
                    r.add_rrset(section, rrset, want_shuffle=False)
        except dns.exception.TooBig:
            if r.section < dns.renderer.ADDITIONAL:
                r.flags |= dns.flags.TC
        r.release_reserved()
        if resp.opt is not None:
            r.add_opt(resp.opt, 0, opt_reserve, 0)
        r.write_header()
        wire: bytes = r.get_wire()
        return wire

    def _resolve(
        self,
        resp: dns.message.Message,
        version: ZoneVersion,
        data: ViewData,
        qname: dns.name.Name,
        qtype: dns.rdatatype.RdataType,
    ) -> int:
        nodes = data.nodes
        name = qname
        seen: set[dns.name.Name] = set()
        for _ in range(MAX_CNAME_CHAIN):
            node = nodes.get(name)
            if node is None:
                resp.authority.append(version.negative_soa)
                # An empty non-terminal exists: NODATA, not NXDOMAIN (RFC 8020).
                return dns.rcode.NOERROR if name in data.names else dns.rcode.NXDOMAIN
            if qtype == dns.rdatatype.ANY:
                resp.answer.extend(node[t] for t in sorted(node))
                break
            rrset = node.get(qtype)
            if rrset is not None:
                resp.answer.append(rrset)
                break
            cname = node.get(dns.rdatatype.CNAME)
            if cname is None:
                resp.authority.append(version.negative_soa)  # NODATA
                break
            resp.answer.append(cname)
            seen.add(name)
            target = cname[0].target
            if target in seen or not target.is_subdomain(version.origin):
                break
            name = target
        self._additional(resp, data)
        return dns.rcode.NOERROR

    @staticmethod
    def _additional(resp: dns.message.Message, data: ViewData) -> None:
        targets: list[dns.name.Name] = []
        for rrset in resp.answer:
            for rd in rrset:
                if rrset.rdtype in (dns.rdatatype.SRV, dns.rdatatype.NS):
                    targets.append(rd.target)
                elif rrset.rdtype == dns.rdatatype.MX:
                    targets.append(rd.exchange)
        present = {(r.name, r.rdtype) for r in resp.answer}
        for target in dict.fromkeys(targets):
            node = data.nodes.get(target)
            if node is None:
                continue
            for t in _GLUE_TYPES:
                glue = node.get(t)
                if glue is not None and (target, t) not in present:
                    resp.additional.append(glue)
                    present.add((target, t))

"""Raw wire-format helpers for what dnspython does not expose: header-only
error replies (for messages that cannot be parsed) and the RR headers of each
section (TTL and RDLENGTH, which RFC 2136 checks and dnspython drops)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

import dns.wire

HEADER = struct.Struct("!HHHHHH")
QR = 0x8000
RD = 0x0100
OPCODE_MASK = 0x7800


def flags_of(wire: bytes) -> int:
    return int.from_bytes(wire[2:4], "big")


def opcode_of(wire: bytes) -> int:
    return (flags_of(wire) & OPCODE_MASK) >> 11


def error_response(wire: bytes, rcode: int) -> bytes:
    """A header-only reply to ``wire`` (at least 12 bytes): same ID and opcode,
    QR set, RD copied, every count zero."""
    qid, flags = struct.unpack_from("!HH", wire)
    out = QR | (flags & OPCODE_MASK) | (flags & RD) | (rcode & 0xF)
    return HEADER.pack(qid, out, 0, 0, 0, 0)


@dataclass(frozen=True)
class RRHeader:
    section: int  # 1 answer/prerequisite, 2 authority/update, 3 additional
    offset: int
    rdtype: int
    rdclass: int
    ttl: int
    rdlength: int


def rr_headers(wire: bytes) -> list[RRHeader]:
    """The header of every RR after the question section, in wire order.

    Only call this on a message dnspython has already parsed.
    """
    parser = dns.wire.Parser(wire)
    counts = HEADER.unpack(parser.get_bytes(12))[2:]
    for _ in range(counts[0]):
        parser.get_name(decompress=True)
        parser.get_struct("!HH")
    out: list[RRHeader] = []
    for section, count in enumerate(counts[1:], start=1):
        for _ in range(count):
            offset = parser.current
            parser.get_name(decompress=True)
            rdtype, rdclass, ttl, rdlength = parser.get_struct("!HHIH")
            parser.seek(parser.current + rdlength)
            out.append(RRHeader(section, offset, rdtype, rdclass, ttl, rdlength))
    return out

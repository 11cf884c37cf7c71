"""A registrar on several cores: UDP requests shared out to worker processes by AoR.

A location service must see every request for an address-of-record (the 200
to a REGISTER lists *all* its bindings, a CSeq is ordered per Call-ID), so
workers cannot simply handle whatever they read, nor split traffic by
source address with SO_REUSEPORT: a SIPp instance sends everything from one
port, and two devices of one user come from two. Instead every worker reads
the one shared listening socket, finds the AoR in the To header of the raw
bytes (no parse), handles the datagram if it owns that AoR and otherwise
passes it to the owner's inbox, a Unix datagram socket; the owner answers
straight from the shared listening socket, so the client sees the address
it sent to. Retransmissions and refreshes carry the same To, so they reach
the same worker and its transactions. With N workers a datagram costs
(N-1)/N of one extra hop, where a separate dispatcher process cost a full
hop for every datagram (about 100 us of CPU per REGISTER, measured).

:func:`aor_key`, :func:`shard_of` and the frame format are pure functions;
the reading and forwarding is ``sipdrill.sip.transport._SharedUdp``. An AoR
spelled with percent escapes in one request
and without in another can land on two workers (the key is not unescaped);
SIP user agents repeat their To byte for byte, so this stays theoretical.
"""

from __future__ import annotations

import re
import zlib

__all__ = ["aor_key", "pack", "shard_of", "unpack"]

# The To header (or its compact form t) at the start of a line, up to the line end.
_TO_RE = re.compile(rb"\n(?:to|t)[ \t]*:[ \t]*([^\r\n]*)", re.IGNORECASE)


def aor_key(data: bytes) -> bytes:
    """The To URI's AoR as ``registrar.aor_of`` spells it (``sip:user@host``), or b"".

    Never raises: bytes without a usable To give b"" (they all go to one
    worker, which answers them 400 as a lone registrar would).
    """
    end = data.find(b"\r\n\r\n")
    m = _TO_RE.search(data, 0, len(data) if end < 0 else end + 2)
    if m is None:
        return b""
    value = m.group(1)
    lt = value.find(b"<")
    if lt >= 0:
        gt = value.find(b">", lt)
        uri = value[lt + 1 : gt if gt >= 0 else len(value)]
    else:
        uri = value.split(b";", 1)[0]
    scheme, colon, rest = uri.strip().partition(b":")
    if not colon:
        return b""
    scheme = scheme.lower()
    if scheme == b"sips":
        scheme = b"sip"
    user, at, hostport = rest.rpartition(b"@")
    hostport = hostport.split(b";", 1)[0].split(b"?", 1)[0]
    if hostport.startswith(b"["):
        host = hostport[: hostport.find(b"]") + 1]
    else:
        host = hostport.partition(b":")[0]
    user = user.partition(b":")[0]  # a password is not part of the AoR
    return (scheme + b":" + (user + b"@" if at else b"") + host).lower()


def shard_of(data: bytes, shards: int) -> int:
    """Which of ``shards`` workers owns the request in ``data``."""
    return zlib.crc32(aor_key(data)) % shards


def pack(remote: tuple[str, int], data: bytes) -> bytes:
    """One frame on a worker's feed: the sender's address, then the datagram."""
    host, port = remote
    return host.encode("ascii") + b"\x00" + port.to_bytes(2, "big") + data


def unpack(frame: bytes) -> tuple[tuple[str, int], bytes]:
    """The inverse of :func:`pack`; ValueError for a frame it did not make."""
    cut = frame.find(b"\x00")
    if cut <= 0 or len(frame) < cut + 3:
        raise ValueError("not a dispatcher frame")
    host = frame[:cut].decode("ascii")
    return (host, int.from_bytes(frame[cut + 1 : cut + 3], "big")), frame[cut + 3 :]

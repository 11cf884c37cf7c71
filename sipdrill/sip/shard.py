"""A registrar on several cores: UDP requests shared out to worker processes by AoR.

A location service must see every request for an address-of-record (the 200
to a REGISTER lists *all* its bindings, a CSeq is ordered per Call-ID), so
workers cannot simply share a socket, nor split traffic by source address
with SO_REUSEPORT: a SIPp instance sends everything from one port, and two
devices of one user come from two. Instead one dispatcher reads each UDP
listener, finds the AoR in the To header of the raw bytes (no parse) and
passes the datagram to the worker that owns that AoR over a Unix datagram
socket; the worker answers straight from the shared listening socket, so
the client sees the address it sent to. Retransmissions and refreshes carry
the same To, so they reach the same worker and its transactions.

:func:`aor_key` and the frame format are pure functions; :func:`dispatch`
is the dispatcher's loop. An AoR spelled with percent escapes in one request
and without in another can land on two workers (the key is not unescaped);
SIP user agents repeat their To byte for byte, so this stays theoretical.
"""

from __future__ import annotations

import logging
import re
import selectors
import socket
import time
import zlib
from collections.abc import Callable, Sequence

__all__ = ["aor_key", "dispatch", "pack", "shard_of", "unpack"]

log = logging.getLogger("sipdrill.sip.shard")

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


def dispatch(
    listeners: Sequence[socket.socket],
    feeds: Sequence[Sequence[socket.socket]],
    keep_going: Callable[[], bool],
    *,
    check_every: float = 0.2,
) -> dict[str, int]:
    """Share out datagrams until ``keep_going()`` is false; returns counters.

    ``feeds[w][i]`` is worker ``w``'s feed for ``listeners[i]``. A full feed
    drops the datagram (UDP semantics: the client retransmits) and counts it.
    ``keep_going`` is asked at least every ``check_every`` seconds.
    """
    stats = {"dispatched": 0, "dropped": 0}
    shards = len(feeds)
    selector = selectors.DefaultSelector()
    for index, listener in enumerate(listeners):
        listener.setblocking(False)
        selector.register(listener, selectors.EVENT_READ, index)
    for row in feeds:
        for feed in row:
            feed.setblocking(False)
    last_check = time.monotonic()
    try:
        while True:
            now = time.monotonic()
            if now - last_check >= check_every:
                last_check = now
                if not keep_going():
                    return stats
            for key, _ in selector.select(check_every):
                index = key.data
                sock = listeners[index]
                for _ in range(256):  # bounded, so every listener gets its turn
                    try:
                        data, addr = sock.recvfrom(65536)
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError as exc:  # e.g. ICMP errors surfacing on the socket
                        log.debug("udp listener: %s", exc)
                        break
                    feed = feeds[shard_of(data, shards)][index]
                    try:
                        feed.send(pack((addr[0], addr[1]), data))
                        stats["dispatched"] += 1
                    except OSError:
                        stats["dropped"] += 1
    finally:
        selector.close()

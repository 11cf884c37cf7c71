"""Delay packets in user space: netem's latency and jitter where the kernel has no netem.

An iptables rule sends a container's packets to NFQUEUE ``--queue-num N
--queue-bypass``; this program binds queue N over netfilter netlink, holds
each packet for ``delay ± jitter`` milliseconds and then accepts it (or drops
it, with probability ``loss``: a drop after the send, so silent). Only the
verdict goes back to the kernel (copy mode META): the payload never leaves it.

The fault layer runs this file's *source* with ``python3 -c`` inside the
container's network namespace (``docker exec`` or ``nsenter -n``), so it must
use the standard library only and import nothing from sipdrill. It writes
``ready`` on stdout once the queue is bound, and on SIGTERM or SIGINT accepts
every packet it still holds before it exits. ``--queue-bypass`` on the rule
means traffic flows undelayed, not cut, if this program is gone. Run from the
host (nsenter), it exits by itself when the container's process ``--watch-pid``
(with start time ``--watch-start``) is gone.

    python3 nfq_delay.py --queue 7 --delay-ms 100 --jitter-ms 20 --tag sipdrill-abc-dg
"""

from __future__ import annotations

import argparse
import errno
import heapq
import os
import random
import select
import signal
import socket
import struct
import sys
import time

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = 0
NFQNL_MSG_VERDICT = 1
NFQNL_MSG_CONFIG = 2
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQA_CFG_MASK = 4
NFQA_CFG_FLAGS = 5
NFQNL_CFG_CMD_BIND = 1
NFQNL_CFG_CMD_UNBIND = 2
NFQNL_COPY_META = 1
NFQA_CFG_F_FAIL_OPEN = 1
NF_DROP = 0
NF_ACCEPT = 1
NLM_F_REQUEST = 1
NLM_F_ACK = 4
NLMSG_ERROR = 2
NLMSG_DONE = 3
AF_UNSPEC = 0


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def _message(msg_type: int, queue: int, attrs: bytes, seq: int, flags: int = 0) -> bytes:
    nfgen = struct.pack("=BBH", AF_UNSPEC, 0, socket.htons(queue))
    body = nfgen + attrs
    header = struct.pack(
        "=IHHII", 16 + len(body), (NFNL_SUBSYS_QUEUE << 8) | msg_type, NLM_F_REQUEST | flags, seq, 0
    )
    return header + body


def _attrs(data: bytes) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    pos = 0
    while pos + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, pos)
        if length < 4:
            break
        out[kind & 0x3FFF] = data[pos + 4 : pos + length]
        pos += (length + 3) & ~3
    return out


class Queue:
    """One bound NFQUEUE: receive packet ids, send verdicts."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.seq = 0
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind((0, 0))
        self._config(_attr(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_BIND, AF_UNSPEC)))
        self._config(_attr(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META)))
        self._config(_attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", 65536)))
        # Fail open: when the queue is full the kernel accepts instead of dropping.
        flags = struct.pack("!I", NFQA_CFG_F_FAIL_OPEN)
        self._config(_attr(NFQA_CFG_FLAGS, flags) + _attr(NFQA_CFG_MASK, flags))

    def _config(self, attrs: bytes) -> None:
        self.seq += 1
        self.sock.send(_message(NFQNL_MSG_CONFIG, self.number, attrs, self.seq, NLM_F_ACK))
        while True:
            data = self.sock.recv(65536)
            for msg_type, payload in _split(data):
                if msg_type == NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", payload, 0)
                    if code != 0:
                        raise OSError(-code, f"nfqueue config: {os.strerror(-code)}")
                    return

    def packets(self) -> list[int]:
        """The ids of the packets that have arrived (non-blocking)."""
        ids: list[int] = []
        while True:
            try:
                data = self.sock.recv(65536, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return ids
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:  # we fell behind; the kernel dropped some
                    continue
                raise
            for msg_type, payload in _split(data):
                if msg_type != (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
                    continue
                hdr = _attrs(payload[4:]).get(NFQA_PACKET_HDR)
                if hdr is not None:
                    ids.append(struct.unpack_from("!I", hdr, 0)[0])

    def verdict(self, packet_id: int, accept: bool = True) -> None:
        self.seq += 1
        code = NF_ACCEPT if accept else NF_DROP
        verdict = _attr(NFQA_VERDICT_HDR, struct.pack("!II", code, packet_id))
        self.sock.send(_message(NFQNL_MSG_VERDICT, self.number, verdict, self.seq))

    def close(self) -> None:
        try:
            self.seq += 1
            unbind = _attr(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_UNBIND, AF_UNSPEC))
            self.sock.send(_message(NFQNL_MSG_CONFIG, self.number, unbind, self.seq))
        finally:
            self.sock.close()


def _split(data: bytes) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    pos = 0
    while pos + 16 <= len(data):
        length, msg_type, _flags, _seq, _pid = struct.unpack_from("=IHHII", data, pos)
        if length < 16:
            break
        if msg_type != NLMSG_DONE:
            out.append((msg_type, data[pos + 16 : pos + length]))
        pos += (length + 3) & ~3
    return out


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except OSError:
        return None


def run(
    queue_number: int,
    delay_ms: float,
    jitter_ms: float = 0.0,
    loss_percent: float = 0.0,
    *,
    seed: int | None = None,
    watch: tuple[int, str] | None = None,
) -> int:
    """Serve the queue until SIGTERM/SIGINT, or until the process ``watch``
    (pid, start time) is gone: the container whose namespace this is."""
    rng = random.Random(seed)
    stopping = False

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    # A signal wakes select() through this pair (else it would sleep on).
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno())
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    queue = Queue(queue_number)
    print("ready", flush=True)
    held: list[tuple[float, int]] = []
    next_watch = time.monotonic() + 1.0
    try:
        while not stopping:
            now = time.monotonic()
            if watch is not None and now >= next_watch:
                next_watch = now + 1.0
                if _start_time(watch[0]) != watch[1]:
                    break
            timeout = min(1.0, max(0.0, held[0][0] - now)) if held else 1.0
            try:
                readable, _, _ = select.select([queue.sock, wake_r], [], [], timeout)
            except InterruptedError:
                continue
            if queue.sock in readable:
                now = time.monotonic()
                for packet_id in queue.packets():
                    if loss_percent and rng.random() * 100.0 < loss_percent:
                        queue.verdict(packet_id, accept=False)
                        continue
                    wait = max(0.0, delay_ms + rng.uniform(-jitter_ms, jitter_ms)) / 1000.0
                    heapq.heappush(held, (now + wait, packet_id))
            now = time.monotonic()
            while held and held[0][0] <= now:
                queue.verdict(heapq.heappop(held)[1])
    finally:
        while held:
            queue.verdict(heapq.heappop(held)[1])
        queue.close()
        wake_r.close()
        wake_w.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="nfq_delay", description="Delay packets in user space (NFQUEUE)."
    )
    parser.add_argument("--queue", type=int, required=True, help="NFQUEUE number (0-65535)")
    parser.add_argument("--delay-ms", type=float, required=True)
    parser.add_argument("--jitter-ms", type=float, default=0.0)
    parser.add_argument("--loss-percent", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--watch-pid", type=int, default=None)
    parser.add_argument("--watch-start", default=None)
    parser.add_argument("--tag", default="", help="a marker in the command line, to find it")
    args = parser.parse_args(argv)
    watch = (args.watch_pid, args.watch_start) if args.watch_pid and args.watch_start else None
    try:
        return run(
            args.queue,
            args.delay_ms,
            args.jitter_ms,
            args.loss_percent,
            seed=args.seed,
            watch=watch,
        )
    except OSError as exc:
        print(f"nfq_delay: {exc}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())

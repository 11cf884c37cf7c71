"""The asyncio adapter: UDP and TCP sockets around a :class:`DnsCore`.

UDP: one datagram in, at most one out. TCP (RFC 7766): 2-byte length
prefixes, queries answered in order on each connection. A connection is
closed when it is idle for ``tcp_idle_timeout``, when a message announced
by its length prefix does not arrive whole within ``tcp_read_timeout``
(a stalled or lying client), when the prefix is shorter than a header or
longer than ``tcp_max_message``, or when the client does not read its
answers within ``tcp_write_timeout``. Each connection is its own task, so
one slow client never holds up another.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import socket
import time
from collections.abc import Sequence
from typing import Any

from sipdrill.dns.core import DnsCore
from sipdrill.dns.errors import ConfigError

try:  # optional: `pip install ext/mmsg` (a small C extension built on this machine)
    import sipdrill_mmsg as _mmsg
except ImportError:
    _mmsg = None

log = logging.getLogger(__name__)

#: Whether recvmmsg/sendmmsg batching is available here (see _UdpListener).
BATCH_IO = _mmsg is not None


class _UdpListener:
    """One UDP socket, read directly from the event loop's selector.

    asyncio's datagram transport costs a loop iteration, a callback handle
    and a ``datagram_received`` dispatch per datagram: with it a cached answer
    cost ~7.7 us of CPU, two thirds of it the transport (bench/dns_qps). Here
    each wake-up drains up to :attr:`BATCH` datagrams with ``recvfrom`` and
    answers each with ``sendto`` straight away, so a storm is served in long
    runs without going back to the loop. An answer the kernel cannot take (a
    full send buffer) is dropped and counted (``send-buffer``): UDP, the
    client asks again.
    """

    BATCH = 64

    def __init__(self, server: DnsServer, sock: socket.socket, batch_io: bool = False) -> None:
        self.server = server
        self.sock = sock
        self.pending: set[asyncio.TimerHandle] = set()
        self.loop = asyncio.get_running_loop()
        self.closed = False
        self.batched = batch_io and _mmsg is not None
        self.loop.add_reader(sock.fileno(), self._read_batch if self.batched else self._read)

    def _read_batch(self) -> None:
        """:meth:`_read` with one ``recvmmsg`` for up to :attr:`BATCH` datagrams and
        one ``sendmmsg`` for their answers (sipdrill_mmsg): the same answers, a
        system call per batch instead of two per query. Each query's latency
        runs from the batch's start to its answer's send."""
        assert _mmsg is not None
        core = self.server.core
        try:
            batch = _mmsg.recv(self.sock.fileno(), self.BATCH, 65535)
        except OSError as exc:  # an ICMP error for an earlier answer: the next wake-up reads on
            log.debug("UDP error: %s", exc)
            return
        if not batch:
            return
        start = time.perf_counter()
        handle_query = core.handle_query
        now = time.time()
        out: list[tuple[bytes, Any]] = []
        for data, addr in batch:
            reply = handle_query(data, addr, now, "udp")
            if reply is None:
                continue
            delay = core.faults.latency
            if delay <= 0:
                out.append((reply, addr))
            else:
                self._later(delay, reply, addr, start)
        if out and not self.closed:
            self._send_batch(out, start)

    def _send_batch(self, out: list[tuple[bytes, Any]], start: float) -> None:
        assert _mmsg is not None
        metrics = self.server.core.metrics
        try:
            sent = _mmsg.send(self.sock.fileno(), out)
        except (OSError, ValueError, OverflowError) as exc:
            # The first answer could not go (an address the kernel refuses):
            # one at a time, so that the others still do.
            log.debug("UDP batch send failed (%s): one by one", exc)
            for reply, addr in out:
                self._send(reply, addr, start)
            return
        if sent:
            metrics.observe("udp", time.perf_counter() - start, sent)
        for _ in range(len(out) - sent):
            metrics.drop("send-buffer")

    def _read(self) -> None:
        core = self.server.core
        handle_query = core.handle_query
        recvfrom = self.sock.recvfrom
        perf_counter = time.perf_counter
        wall = time.time
        for _ in range(self.BATCH):
            try:
                data, addr = recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # an ICMP error for an earlier answer: read on
                log.debug("UDP error: %s", exc)
                continue
            start = perf_counter()
            reply = handle_query(data, addr, wall(), "udp")
            if reply is None:
                continue
            delay = core.faults.latency
            if delay <= 0:
                self._send(reply, addr, start)
            else:
                self._later(delay, reply, addr, start)

    def _later(self, delay: float, reply: bytes, addr: Any, start: float) -> None:
        def fire() -> None:
            self.pending.discard(handle)
            self._send(reply, addr, start)

        handle = self.loop.call_later(delay, fire)
        self.pending.add(handle)

    def _send(self, reply: bytes, addr: Any, start: float) -> None:
        if self.closed:
            return
        metrics = self.server.core.metrics
        try:
            self.sock.sendto(reply, addr)
        except (BlockingIOError, InterruptedError):
            metrics.drop("send-buffer")
            return
        except OSError as exc:
            log.debug("UDP send to %s failed: %s", addr, exc)
            return
        metrics.observe("udp", time.perf_counter() - start)

    def close(self) -> None:
        for handle in self.pending:
            handle.cancel()
        self.pending.clear()
        if not self.closed:
            self.closed = True
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()


class DnsServer:
    """Serve ``core`` on every ``(host, port)`` of ``listen``, UDP and TCP
    on the same port (port 0 picks a free one; see :attr:`addresses`)."""

    def __init__(
        self,
        core: DnsCore,
        listen: Sequence[tuple[str, int]],
        *,
        tcp_idle_timeout: float = 10.0,
        tcp_read_timeout: float = 5.0,
        tcp_write_timeout: float = 5.0,
        tcp_max_connections: int = 512,
        tcp_max_message: int = 16384,
        udp_rcvbuf: int = 4 * 1024 * 1024,
        batch_io: bool = True,
    ) -> None:
        self.core = core
        self.listen = list(listen)
        self.tcp_idle_timeout = tcp_idle_timeout
        self.tcp_read_timeout = tcp_read_timeout
        self.tcp_write_timeout = tcp_write_timeout
        self.tcp_max_connections = tcp_max_connections
        self.tcp_max_message = tcp_max_message
        self.udp_rcvbuf = udp_rcvbuf
        # recvmmsg/sendmmsg when sipdrill_mmsg is installed (BATCH_IO).
        self.batch_io = batch_io
        self.addresses: list[tuple[str, int]] = []
        self._udp: list[_UdpListener] = []
        self._tcp: list[asyncio.Server] = []
        self._connections: set[asyncio.Task[None]] = set()
        self._started = False

    async def __aenter__(self) -> DnsServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def tcp_connections(self) -> int:
        return len(self._connections)

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        try:
            for host, port in self.listen:
                self.addresses.append(await self._bind(host, port))
        except BaseException:
            await self.close()
            raise

    async def _bind(self, host: str, port: int) -> tuple[str, int]:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
        for _attempt in range(20):
            udp = self._udp_socket(family, host, port)
            chosen = udp.getsockname()[1]
            try:
                tcp = self._tcp_socket(family, host, chosen)
            except OSError as exc:
                udp.close()
                if port == 0 and exc.errno == errno.EADDRINUSE:
                    continue  # the TCP twin of a random UDP port is taken: pick again
                raise ConfigError(f"cannot listen on TCP {host}:{chosen}: {exc.strerror}") from None
            self._udp.append(_UdpListener(self, udp, self.batch_io))
            self._tcp.append(await asyncio.start_server(self._client, sock=tcp, backlog=1024))
            return host, chosen
        raise ConfigError(f"no free port pair on {host}")

    def _udp_socket(self, family: int, host: str, port: int) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if self.udp_rcvbuf:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.udp_rcvbuf)
            sock.bind((host, port))
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise ConfigError(f"cannot listen on UDP {host}:{port}: {exc.strerror}") from None
        return sock

    @staticmethod
    def _tcp_socket(family: int, host: str, port: int) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    async def close(self) -> None:
        for server in self._tcp:
            server.close()
        for listener in self._udp:
            listener.close()
        tasks = list(self._connections)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for server in self._tcp:
            await server.wait_closed()
        self._tcp.clear()
        self._udp.clear()
        # Let the transports' close callbacks run before the loop goes away.
        await asyncio.sleep(0)

    # --- TCP -------------------------------------------------------------

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        metrics = self.core.metrics
        if len(self._connections) >= self.tcp_max_connections:
            metrics.drop("tcp-limit")
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        metrics.tcp_connections.inc()
        try:
            await self._serve_connection(reader, writer)
        except (ConnectionError, OSError):
            pass
        finally:
            self._connections.discard(task)
            metrics.tcp_connections.dec()
            writer.transport.abort()

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        core = self.core
        metrics = core.metrics
        peer = writer.get_extra_info("peername")
        while True:
            try:
                prefix = await asyncio.wait_for(reader.readexactly(2), self.tcp_idle_timeout)
            except (TimeoutError, asyncio.IncompleteReadError):
                return
            length = int.from_bytes(prefix, "big")
            if length < 12 or length > self.tcp_max_message:
                metrics.drop("tcp-length")
                return
            try:
                data = await asyncio.wait_for(reader.readexactly(length), self.tcp_read_timeout)
            except TimeoutError:
                metrics.drop("tcp-stalled")
                return
            except asyncio.IncompleteReadError:
                return
            start = time.perf_counter()
            reply = core.handle_query(data, peer, time.time(), "tcp")
            if reply is None:
                continue
            if core.faults.latency > 0:
                await asyncio.sleep(core.faults.latency)
            writer.write(len(reply).to_bytes(2, "big") + reply)
            try:
                await asyncio.wait_for(writer.drain(), self.tcp_write_timeout)
            except TimeoutError:
                metrics.drop("tcp-write-stalled")
                return
            metrics.observe("tcp", time.perf_counter() - start)

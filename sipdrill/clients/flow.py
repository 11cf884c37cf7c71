"""One client connection (TCP, or TLS over memory BIOs) with as little per-flow state as possible.

The simulator keeps one stream per endpoint, 10,000 of them in one process.
asyncio's own TLS (``asyncio.sslproto.SSLProtocol``) and the SIP core's
stream protocol (``sipdrill.sip.transport``) cost, per connection, a
Python-level TLS state machine with a dozen objects and a read buffer, a
close future and a timer re-armed every few seconds. A :class:`StreamFlow`
is one ``__slots__`` object over a non-blocking socket that the event loop
watches with ``add_reader`` (no asyncio transport object either):

* TLS is an :class:`ssl.SSLObject` between two :class:`ssl.MemoryBIO`
  (``SSLContext.wrap_bio``), driven from the read callback: the same OpenSSL
  handshake and verification (chain and host name), none of the asyncio
  machinery around it;
* the two memory BIOs are the thread's, shared by every flow (a memory BIO
  keeps the largest size it ever held, and each pair is two OpenSSL BIOs with
  a lock each: 3.4-4.5 KB a connection). Sharing is safe because every
  OpenSSL call here leaves both empty: what is written into the incoming BIO
  is read until OpenSSL wants more (a partial record waits in the SSL
  object's own buffer), and whatever the call wrote into the outgoing one is
  read out (and sent, or dropped for a flow that is gone) before anything
  else runs. Received bytes still go in :data:`BIO_CHUNK` at a time;
* a TLS session can be offered for resumption (``session``): the runner keeps
  one per endpoint and server name, as SChannel does (see
  :class:`~sipdrill.clients.runner.ClientRunner`);
* writes go straight to the socket; only what the kernel does not take is
  buffered (and the socket watched for writability) until it drains;
* framing is :class:`~sipdrill.sip.framing.StreamFramer` (client role: a
  lone CRLF is a pong), parsing is :func:`~sipdrill.sip.message.parse_message`;
* no timers: an outbound flow is kept alive (or given up) by its endpoint's
  RFC 5626 pings and transaction timers, which the runner runs from one heap.

Measured (3,000 TLS 1.2 connections, OpenSSL 3.0, RSA 2048 certificate): RSS
per connection 29.6 KB with ``SSLProtocol``, 23.8 KB with memory BIOs over an
asyncio transport, 22.8 KB with 512-byte BIO writes; OpenSSL's own state is
~20 KB of that (``SSL_MODE_RELEASE_BUFFERS`` is already set by CPython).
With the BIOs shared (2,000 connections in one process, docs/decisions.md):
22.5 -> 19.0 KB against a server that asks for no certificate, 27.7 -> 23.2
KB against a pool (which asks for one: the client keeps ~5 KB more state).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import ssl
import sys
import threading
from collections import Counter
from collections.abc import Callable
from typing import Protocol, TypeAlias

from sipdrill.sip.framing import (
    FramerRole,
    FramingError,
    KeepAlivePing,
    KeepAlivePong,
    MessageBytes,
    StreamFramer,
)
from sipdrill.sip.message import DEFAULT_LIMITS, Limits, Message
from sipdrill.sip.transport import Addr, Kind, TransportError, Unreadable, read_message

__all__ = ["BIO_CHUNK", "FlowSink", "StreamFlow", "open_stream"]

log = logging.getLogger("sipdrill.clients.flow")

#: Bytes written into the incoming memory BIO at a time.
BIO_CHUNK = 512
#: Bytes asked of the socket per read.
_RECV = 16384
#: Plaintext read from the SSLObject at a time.
_READ = 4096


class _SharedBios(threading.local):
    """The thread's incoming and outgoing memory BIOs, shared by its flows
    (OpenSSL releases the GIL in its calls: flows in other threads get their own)."""

    def __init__(self) -> None:
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()


_BIOS = _SharedBios()


class FlowSink(Protocol):
    """What a :class:`StreamFlow` reports to (the runner)."""

    stats: Counter[str]

    def flow_message(self, flow: StreamFlow, message: Message) -> None: ...

    def flow_pong(self, flow: StreamFlow) -> None: ...

    def flow_closed(self, flow: StreamFlow) -> None: ...


#: ``on_done(flow, error)`` of :meth:`StreamFlow.connect`: error None once open.
ConnectDone: TypeAlias = "Callable[[StreamFlow, TransportError | None], None]"


def _addr(raw: object) -> Addr:
    if isinstance(raw, tuple) and len(raw) >= 2:
        return (sys.intern(str(raw[0])), int(raw[1]))
    return ("", 0)


class StreamFlow:
    """A client stream flow; open it with :meth:`connect` or :func:`open_stream`."""

    __slots__ = (
        "_closing",
        "_fd",
        "_framer",
        "_in",
        "_loop",
        "_on_done",
        "_out",
        "_ssl",
        "_timer",
        "_wbuf",
        "_where",
        "index",
        "kind",
        "limits",
        "local",
        "max_write_buffer",
        "open",
        "remote",
        "sink",
        "sock",
    )

    def __init__(
        self,
        sink: FlowSink,
        kind: Kind,
        *,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        limits: Limits = DEFAULT_LIMITS,
        max_write_buffer: int = 1024 * 1024,
        index: int = -1,
        session: ssl.SSLSession | None = None,
    ) -> None:
        self.sink = sink
        self.kind = kind
        self.limits = limits
        self.max_write_buffer = max_write_buffer
        #: The owner's tag (the runner: the endpoint's index).
        self.index = index
        #: The connected socket; None before the connection and once it is gone.
        self.sock: socket.socket | None = None
        self._fd = -1
        self._loop: asyncio.AbstractEventLoop | None = None
        self.local: Addr = ("", 0)
        self.remote: Addr = ("", 0)
        #: True from the end of the handshake until the connection is gone.
        self.open = False
        self._closing = False
        self._wbuf: bytearray | None = None
        self._framer: StreamFramer | None = None
        #: Called once when the connect (and handshake) ends, see :meth:`connect`.
        self._on_done: ConnectDone | None = None
        #: The connect or handshake timeout while one is pending.
        self._timer: asyncio.TimerHandle | None = None
        self._where = ""
        # A TLS flow without a context is refused by connect(), as a failed connect.
        if kind is Kind.TLS and ssl_context is not None:
            bios = _BIOS
            self._in: ssl.MemoryBIO | None = bios.incoming
            self._out: ssl.MemoryBIO | None = bios.outgoing
            self._ssl: ssl.SSLObject | None = ssl_context.wrap_bio(
                self._in,
                self._out,
                server_side=False,
                server_hostname=server_hostname,
                session=session,
            )
        else:
            self._in = self._out = None
            self._ssl = None

    @property
    def closed(self) -> bool:
        """The socket is closed (or was never connected)."""
        return self.sock is None

    @property
    def session(self) -> ssl.SSLSession | None:
        """The TLS session (to offer on the next connect to the same server);
        None on TCP and once the flow is gone."""
        return self._ssl.session if self._ssl is not None else None

    @property
    def server_hostname(self) -> str:
        """The TLS server name asked for and verified ("" on TCP and once gone)."""
        return (self._ssl.server_hostname or "") if self._ssl is not None else ""

    @property
    def session_reused(self) -> bool:
        """The handshake resumed the session it was offered (an abbreviated handshake)."""
        return self._ssl is not None and self._ssl.session_reused

    # -- the socket ------------------------------------------------------------
    def _readable(self) -> None:
        sock = self.sock
        if sock is None:
            return
        try:
            data = sock.recv(_RECV)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._gone()
            return
        if not data:  # EOF: the peer closed; close our side too
            self._gone()
            return
        try:
            self._data(data)
        except Exception as exc:
            if self._on_done is not None:
                self._fail(exc)
            else:
                log.exception("%s %s: error on data from %s", self.kind, self.local, self.remote)
                self.abort()

    def _data(self, data: bytes) -> None:
        if self._ssl is None:
            self._plaintext(data)
            return
        incoming = self._in
        assert incoming is not None
        try:
            if len(data) <= BIO_CHUNK:
                incoming.write(data)
                self._pump()
                return
            view = memoryview(data)
            for start in range(0, len(data), BIO_CHUNK):
                if self.sock is None:
                    return
                incoming.write(view[start : start + BIO_CHUNK])
                self._pump()
        finally:
            # The BIO is every flow's: what this flow's OpenSSL did not take (it
            # failed or closed mid-way) must not reach the next flow's.
            if incoming.pending:
                incoming.read()

    def _write(self, data: bytes) -> bool:
        sock = self.sock
        if sock is None:
            return False
        if self._wbuf is not None:
            self._wbuf += data
            return True
        try:
            sent = sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            log.info("%s %s -> %s: write failed: %s", self.kind, self.local, self.remote, exc)
            self._gone()
            return False
        if sent < len(data):
            self._wbuf = bytearray(data[sent:])
            assert self._loop is not None
            self._loop.add_writer(self._fd, self._writable)
        return True

    def _writable(self) -> None:
        sock, buf = self.sock, self._wbuf
        if sock is None or buf is None:
            return
        try:
            sent = sock.send(buf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._gone()
            return
        del buf[:sent]
        if not buf:
            self._wbuf = None
            assert self._loop is not None
            self._loop.remove_writer(self._fd)
            if self._closing:
                self._gone()

    def _gone(self) -> None:
        """Close the socket now; the sink hears of it from the loop (never re-entrantly)."""
        sock, loop = self.sock, self._loop
        if sock is None or loop is None:
            return
        loop.remove_reader(self._fd)
        if self._wbuf is not None or not self.open:  # not open: maybe still connecting
            loop.remove_writer(self._fd)
            self._wbuf = None
        sock.close()
        self.sock = None
        was_open = self.open
        self.open = False
        if self._on_done is not None:
            self._done(ConnectionResetError("closed during the handshake"))
        if self._out is not None and self._out.pending:  # unsent, and every flow's BIO
            self._out.read()
        # Free OpenSSL's state now, not when the last reference goes.
        self._ssl = self._in = self._out = None
        self._framer = None
        if was_open:
            loop.call_soon(self._report_closed)

    def _report_closed(self) -> None:
        try:
            self.sink.flow_closed(self)
        except Exception:
            log.exception("flow_closed failed for %s", self.remote)

    # -- TLS -------------------------------------------------------------------
    def _handshake(self) -> None:
        assert self._ssl is not None
        try:
            self._ssl.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except (ssl.SSLError, ssl.CertificateError, ValueError) as exc:
            self._flush()  # the alert, if any
            self._fail(exc)
            return
        self._flush()
        self._established()

    def _pump(self) -> None:
        sslobj = self._ssl
        if sslobj is None:
            return
        if not self.open:
            self._handshake()
            if not self.open:
                return
        chunks: list[bytes] = []
        peer_closed = False
        while True:
            try:
                chunk = sslobj.read(_READ)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                peer_closed = True
                break
            except ssl.SSLError as exc:
                self.sink.stats["tls_errors"] += 1
                log.info("%s %s: TLS error from %s: %s", self.kind, self.local, self.remote, exc)
                self._flush()  # the alert; the outgoing BIO is every flow's
                self.abort()
                return
            if not chunk:  # SSLObject.read returns b"" after the peer's close_notify
                peer_closed = True
                break
            chunks.append(chunk)
        self._flush()  # anything OpenSSL wants to say (alerts, key updates)
        if chunks:
            self._plaintext(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        if peer_closed:
            self.close()

    def _flush(self) -> None:
        """Send what OpenSSL wrote; dropped for a flow that is gone, since the
        outgoing BIO is every flow's."""
        out = self._out
        if out is not None and out.pending:
            data = out.read()
            if self.sock is not None:
                self._write(data)

    # -- connection state ------------------------------------------------------
    def _established(self) -> None:
        self.open = True
        self._framer = StreamFramer(self.limits, FramerRole.CLIENT)
        if self._on_done is not None:
            self._done(None)

    def _fail(self, exc: BaseException) -> None:
        self._done(exc)
        self.abort()

    # -- connecting ------------------------------------------------------------
    def connect(
        self,
        loop: asyncio.AbstractEventLoop,
        host: str,
        port: int,
        on_done: ConnectDone,
        *,
        bind: str | None = None,
        connect_timeout: float = 5.0,
        handshake_timeout: float = 5.0,
    ) -> None:
        """Connect (and for TLS, hand-shake and verify) without a task or a future.

        ``on_done(flow, None)`` once the flow is open, or ``on_done(flow, error)``
        with a :class:`~sipdrill.sip.transport.TransportError` (the cause chained)
        when the peer cannot be reached, the handshake fails or either takes too
        long; called once, from the event loop, never from inside this call.
        A storm makes ~5 connects per endpoint: a task, a future and two
        ``asyncio.timeout`` blocks each were ~10 event-loop callbacks a connect.
        """
        self._loop = loop
        self._on_done = on_done
        self._where = f"{host}:{port}"
        if self.kind is Kind.TLS and self._ssl is None:
            loop.call_soon(self._done, ValueError("no TLS context (--ca) for a TLS target"))
            return
        try:
            sock = socket.socket(
                socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM
            )
        except OSError as exc:
            loop.call_soon(self._done, exc)
            return
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if bind:
                sock.bind((bind, 0))
            err = sock.connect_ex((host, port))
        except OSError as exc:
            sock.close()
            loop.call_soon(self._done, exc)
            return
        if err in (0, errno.EINPROGRESS, errno.EAGAIN):
            self.sock = sock
            self._fd = sock.fileno()
            if self._ssl is not None:
                # A connect to a local peer is done before connect() returns: the
                # ClientHello goes now, without a writer to wait for (two epoll_ctl
                # and a loop turn per connect); if it is not, the hello waits.
                try:
                    connected = self._send_hello(sock)
                except OSError as exc:  # refused or reset: the connect's own error
                    self._fail(exc)
                    return
                if connected:
                    self._start(handshake_timeout)
                    return
            loop.add_writer(self._fd, self._connected, handshake_timeout)
            self._timer = loop.call_later(connect_timeout, self._timed_out)
        else:
            sock.close()
            loop.call_soon(self._done, OSError(err, os.strerror(err)))

    def _send_hello(self, sock: socket.socket) -> bool:
        """Make the ClientHello and send it: False if not yet connected. What is not
        sent waits in the write buffer for :meth:`_start`."""
        assert self._ssl is not None and self._out is not None
        with contextlib.suppress(ssl.SSLWantReadError):
            self._ssl.do_handshake()
        hello = self._out.read()
        try:
            sent = sock.send(hello)
        except (BlockingIOError, InterruptedError):
            sent = 0
        if sent < len(hello):
            self._wbuf = bytearray(hello[sent:])
            return sent > 0
        return True

    def _connected(self, handshake_timeout: float) -> None:
        sock, loop = self.sock, self._loop
        if sock is None or loop is None:
            return
        loop.remove_writer(self._fd)
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._fail(OSError(err, os.strerror(err)))
            return
        self._cancel_timer()
        self._start(handshake_timeout)

    def _start(self, handshake_timeout: float) -> None:
        """The TCP connect is done: read, and (TLS) hand-shake within the timeout."""
        sock, loop = self.sock, self._loop
        assert sock is not None and loop is not None
        try:
            self.local = _addr(sock.getsockname())
            self.remote = _addr(sock.getpeername())
        except OSError as exc:  # reset between the connect and now
            self._fail(exc)
            return
        loop.add_reader(self._fd, self._readable)
        if self._ssl is None:
            self._established()
            return
        self._timer = loop.call_later(handshake_timeout, self._timed_out)
        # connect() made the ClientHello; what it could not send goes now.
        pending = self._wbuf
        if pending is not None:
            self._wbuf = None
            self._write(bytes(pending))

    def _timed_out(self) -> None:
        self._timer = None
        self._fail(TimeoutError())

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _done(self, exc: BaseException | None) -> None:
        """Report the end of :meth:`connect` once, from the loop."""
        on_done, self._on_done = self._on_done, None
        self._cancel_timer()
        if on_done is None or self._loop is None:
            return
        if exc is None and not self.open:
            exc = ConnectionResetError("closed during the handshake")
        error = None if exc is None else _connect_error(self.kind, self._where, exc)
        self._loop.call_soon(on_done, self, error)

    # -- SIP -------------------------------------------------------------------
    def _plaintext(self, data: bytes) -> None:
        framer = self._framer
        if framer is None:
            return
        sink = self.sink
        for event in framer.feed(data):
            if not self.open:
                return
            if isinstance(event, MessageBytes):
                self._deliver(event.data)
            elif isinstance(event, KeepAlivePong):
                sink.flow_pong(self)
            elif isinstance(event, KeepAlivePing):
                self.send(b"\r\n")
            elif isinstance(event, FramingError):
                sink.stats["framing_errors"] += 1
                log.info(
                    "%s %s: framing error from %s: %s; closing",
                    self.kind,
                    self.local,
                    self.remote,
                    event.reason,
                )
                self.close()
                return

    def _deliver(self, data: bytes) -> None:
        sink = self.sink
        message = read_message(data, self.kind, self.remote, self.limits, sink.stats)
        if isinstance(message, Unreadable):
            if message.answer is not None:
                self.send(message.answer)
            if message.close_stream:
                self.close()
            return
        try:
            sink.flow_message(self, message)
        except Exception:
            sink.stats["handler_errors"] += 1
            log.exception("%s: handler failed on a message from %s", self.kind, self.remote)

    # -- the owner's side ---------------------------------------------------------
    def send(self, data: bytes) -> bool:
        """Send bytes (a serialized message, a ping); False when the flow is gone."""
        if not self.open or self._closing or self.sock is None:
            return False
        try:
            if self._ssl is not None:
                self._ssl.write(data)
                assert self._out is not None
                ok = self._write(self._out.read())
            else:
                ok = self._write(data)
        except (ssl.SSLError, ValueError) as exc:
            log.info("%s %s -> %s: write failed: %s", self.kind, self.local, self.remote, exc)
            self._flush()
            self.abort()
            return False
        if ok and self._wbuf is not None and len(self._wbuf) > self.max_write_buffer:
            log.warning("%s %s: %s does not read; closing", self.kind, self.local, self.remote)
            self.abort()
            return False
        return ok

    def ping(self) -> bool:
        """An RFC 5626 CRLFCRLF keep-alive ping."""
        return self.send(b"\r\n\r\n")

    def close(self) -> None:
        """Close (TLS: with a close_notify) once what is buffered is sent;
        ``flow_closed`` follows from the loop."""
        if self.sock is None or self._closing:
            return
        if self._ssl is not None and self.open:
            with contextlib.suppress(ssl.SSLError, ValueError):
                self._ssl.unwrap()
            with contextlib.suppress(ssl.SSLError, ValueError):
                self._flush()
        self._closing = True
        if self._wbuf is None:
            self._gone()

    def abort(self) -> None:
        """Close now, dropping anything unsent."""
        self._gone()

    def cancel(self) -> None:
        """Give up a :meth:`connect` in progress without its report, and close."""
        self._on_done = None
        self._cancel_timer()
        self._gone()

    def __repr__(self) -> str:
        return f"<StreamFlow {self.kind} {self.local} -> {self.remote} open={self.open}>"


def _connect_error(kind: Kind, where: str, exc: BaseException) -> TransportError:
    if isinstance(exc, ssl.SSLCertVerificationError):
        error = TransportError(kind, where, f"certificate rejected: {exc.verify_message}")
    else:
        error = TransportError(kind, where, str(exc) or "timeout")
    error.__cause__ = exc
    return error


async def open_stream(
    sink: FlowSink,
    kind: Kind,
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    bind: str | None = None,
    connect_timeout: float = 5.0,
    handshake_timeout: float = 5.0,
    limits: Limits = DEFAULT_LIMITS,
    max_write_buffer: int = 1024 * 1024,
    index: int = -1,
    session: ssl.SSLSession | None = None,
) -> StreamFlow:
    """:meth:`StreamFlow.connect` as a coroutine: the open flow, or it raises
    :class:`~sipdrill.sip.transport.TransportError` (the cause chained)."""
    if kind is Kind.UDP:
        raise ValueError("open_stream is for TCP and TLS")
    loop = asyncio.get_running_loop()
    flow = StreamFlow(
        sink,
        kind,
        ssl_context=ssl_context,
        server_hostname=server_hostname,
        limits=limits,
        max_write_buffer=max_write_buffer,
        index=index,
        session=session,
    )
    done: asyncio.Future[TransportError | None] = loop.create_future()

    def finished(_flow: StreamFlow, error: TransportError | None) -> None:
        if not done.done():
            done.set_result(error)

    flow.connect(
        loop,
        host,
        port,
        finished,
        bind=bind,
        connect_timeout=connect_timeout,
        handshake_timeout=handshake_timeout,
    )
    try:
        error = await done
    except BaseException:
        flow.cancel()
        raise
    if error is not None:
        raise error
    return flow

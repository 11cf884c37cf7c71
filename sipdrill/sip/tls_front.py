"""TLS worker processes in front of one SIP process: handshakes on every core,
SIP state in one place.

A TLS registration storm is mostly OpenSSL: the handshake (the pool's RSA
signature, ECDHE, the record layer) was 47 % of a pool's CPU per
re-registration (docs/decisions.md), and a pool is one process, so one core
did it all while the other idled. Splitting the pool itself across processes
would split its state (bindings, presence, conferences, failover) and every
request for a user would have to find the process owning it. Here only the
TLS is split off:

* the SIP process binds the TLS listening socket and starts one *front*
  process (``python -m sipdrill.sip.tls_front``), handing it the socket;
* the front creates the one server :class:`ssl.SSLContext`, then forks
  ``workers`` processes that all accept on the inherited socket. Forked from
  one context they share its session-ticket key, so a client resumes its
  TLS session on whichever worker takes its next connection (a stateful
  session cache would be per process);
* a worker does the handshake and the record layer; for each connection it
  makes a Unix stream socket pair and passes one end, with the client's and
  the listener's addresses and the DNS names of the certificate the client
  presented and the worker verified (asked for as the pool's own context
  does, not required: clients have none, pools present theirs), to the SIP process
  over a control socket (``SCM_RIGHTS``). The names become the flow's
  ``Flow.peer_names``, so a pool reaching this pool through a worker is
  trusted as that pool (mutual TLS), as without workers. From then on the
  worker only relays bytes, both ways (a side that stops reading is closed
  once 1 MiB waits for it, as SipTransport closes a peer that does not
  read), and closes each side when the other closes;
* the SIP process adopts the plaintext end as a TLS flow from the client's
  address (:meth:`SipTransport.adopt_stream`): framing, keep-alives,
  timeouts, connection reuse for requests to the client and every piece of
  state stay where they were, consistent per user because there is one copy.

The cost is one relay hop per message (two Unix socket writes and reads),
small beside a handshake. A worker that dies takes its connections with it
(the clients see a closed flow and reconnect, to another worker) and the
front forks a new one in its place (from the same context: same ticket key);
the front and its workers exit when the SIP process closes the control socket.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import logging
import os
import select
import selectors
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from sipdrill.sip.tls import peer_dns_names, server_context

__all__ = ["TlsFront", "main"]

log = logging.getLogger("sipdrill.sip.tls_front")

Addr = tuple[str, int]
#: ``adopt(sock, remote, local, peer_names)``: a plaintext flow for the SIP process.
Adopt = Callable[[socket.socket, Addr, Addr, tuple[str, ...]], None]
#: Room for a control message: two addresses and a certificate's names.
_CONTROL_MAX = 16384


def _pack(remote: Addr, local: Addr, names: tuple[str, ...] = ()) -> bytes:
    return json.dumps([remote[0], remote[1], local[0], local[1], list(names)]).encode()


def _unpack(data: bytes) -> tuple[Addr, Addr, tuple[str, ...]]:
    rhost, rport, lhost, lport, names = json.loads(data)
    if not all(isinstance(n, str) for n in names):
        raise ValueError("names must be strings")
    return (str(rhost), int(rport)), (str(lhost), int(lport)), tuple(names)


class TlsFront:
    """The SIP process's side: the listening socket, the front process, and the
    control socket on which plaintext flows arrive (``adopt`` takes each)."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        cert: Path,
        key: Path,
        workers: int,
        adopt: Adopt,
        client_ca: Path | None = None,
        handshake_timeout: float = 5.0,
        backlog: int = 1024,
    ) -> None:
        if workers < 1:
            raise ValueError("TLS workers: at least 1")
        self.workers = workers
        self.adopt = adopt
        self.handshake_timeout = handshake_timeout
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((host, port))
            listener.listen(backlog)
        except OSError:
            listener.close()
            raise
        self.address: Addr = listener.getsockname()[:2]
        self._listener = listener
        self._cert, self._key = cert, key
        # Ask clients for a certificate from this CA and accept none (as the
        # pool's own context): pools present theirs, clients have none.
        self._client_ca = client_ca
        self._control: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.adopted = 0

    def start(self) -> None:
        """Start the front process; flows arrive through ``adopt`` from now on."""
        self._loop = asyncio.get_running_loop()
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ca = [] if self._client_ca is None else ["--client-ca", str(self._client_ca)]
        try:
            self._proc = subprocess.Popen(
                [
                    sys.executable, "-m", "sipdrill.sip.tls_front",
                    "--listen-fd", str(self._listener.fileno()),
                    "--control-fd", str(theirs.fileno()),
                    "--cert", str(self._cert), "--key", str(self._key),
                    *ca,
                    "--workers", str(self.workers),
                    "--handshake-timeout", str(self.handshake_timeout),
                ],
                pass_fds=(self._listener.fileno(), theirs.fileno()),
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError:
            mine.close()
            raise
        finally:
            theirs.close()
            # The workers hold the listener now: a dead front means refused
            # connections, not connections queued for nobody.
            self._listener.close()
        mine.setblocking(False)
        self._control = mine
        self._loop.add_reader(mine.fileno(), self._receive)

    def _receive(self) -> None:
        control = self._control
        assert control is not None
        for _ in range(64):
            try:
                data, fds, _flags, _addr = socket.recv_fds(control, _CONTROL_MAX, 4)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.error("TLS front control socket: %s", exc)
                self._stop_reading()
                return
            if not data and not fds:
                log.error("the TLS front process has gone: no more TLS connections")
                self._stop_reading()
                return
            socks = [socket.socket(fileno=fd) for fd in fds]
            try:
                remote, local, names = _unpack(data)
            except (ValueError, TypeError):
                log.warning("a TLS front message without addresses: %r", data[:64])
                for sock in socks:
                    sock.close()
                continue
            for extra in socks[1:]:
                extra.close()
            if socks:
                socks[0].setblocking(False)
                self.adopted += 1
                self.adopt(socks[0], remote, local, names)

    def _stop_reading(self) -> None:
        if self._control is not None and self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._control.fileno())

    def worker_pids(self) -> list[int]:
        """The front's workers now (Linux: read from /proc)."""
        if self._proc is None:
            return []
        pid = self._proc.pid
        try:
            text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
        except OSError:
            return []
        return [int(p) for p in text.split()]

    async def close(self) -> None:
        self._stop_reading()
        if self._control is not None:
            self._control.close()  # the workers see EOF and stop
            self._control = None
        self._listener.close()
        proc = self._proc
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        for _ in range(50):
            if proc.poll() is not None:
                break
            await asyncio.sleep(0.1)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await asyncio.to_thread(proc.wait)
        self._proc = None


# --- the front and its workers -------------------------------------------------------------


_READ = selectors.EVENT_READ
_WRITE = selectors.EVENT_WRITE
#: Bytes one side may hold for a peer that does not read before the connection
#: is closed (as SipTransport does with max_write_buffer).
_MAX_PENDING = 1024 * 1024
_CHUNK = 65536


class _Conn:
    """One client connection in a worker: the TLS socket, its memory BIOs and,
    once the handshake is done, the plaintext pipe to the SIP process.

    ``out``/``pipe_out``: bytes the kernel did not take yet, for the client and
    for the SIP process (the side waits for writability with them pending).
    """

    __slots__ = ("deadline", "inbio", "obj", "out", "outbio", "pipe", "pipe_out", "sock")

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext, deadline: float) -> None:
        self.sock = sock
        self.inbio = ssl.MemoryBIO()
        self.outbio = ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.inbio, self.outbio, server_side=True)
        self.pipe: socket.socket | None = None
        self.out = b""
        self.pipe_out = b""
        self.deadline = deadline


class _Worker:
    """A selector loop over the shared listener and its connections.

    Not asyncio: its SSL protocol ran ~19 loop callbacks per connection, most
    of a worker's Python time; here a connection costs a handful of system
    calls and two memory BIOs (as the clients' flows, sipdrill.clients.flow).
    """

    def __init__(self, listener: socket.socket, control: socket.socket, ctx: ssl.SSLContext,
                 handshake_timeout: float) -> None:
        self.listener, self.control, self.ctx = listener, control, ctx
        self.handshake_timeout = handshake_timeout
        self.sel = selectors.DefaultSelector()
        self.handshaking: collections.deque[_Conn] = collections.deque()
        self.conns: set[_Conn] = set()
        self.stopping = False

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        sel = self.sel
        sel.register(self.listener, _READ, None)
        # The SIP process never writes here: readable means it closed the socket.
        sel.register(self.control, _READ, None)
        while not self.stopping:
            for key, events in sel.select(0.5):
                conn = key.data
                if conn is None:
                    if key.fileobj is self.listener:
                        self._accept()
                    else:
                        self.stopping = True
                    continue
                try:
                    if key.fileobj is conn.sock:
                        self._client_ready(conn, events)
                    else:
                        self._pipe_ready(conn, events)
                except (OSError, ssl.SSLError, ValueError):
                    self._close(conn)
            self._expire_handshakes()
        for conn in list(self.conns):
            self._close(conn)

    def _stop(self, signum: int, frame: object) -> None:
        self.stopping = True

    def _accept(self) -> None:
        deadline = time.monotonic() + self.handshake_timeout
        for _ in range(64):
            try:
                sock, _addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. out of file descriptors: the client retries
                log.warning("accept: %s", exc)
                return
            sock.setblocking(False)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Conn(sock, self.ctx, deadline)
            self.conns.add(conn)
            self.handshaking.append(conn)
            self.sel.register(sock, _READ, conn)

    def _expire_handshakes(self) -> None:
        now = time.monotonic()
        queue = self.handshaking
        while queue and (queue[0].pipe is not None or queue[0] not in self.conns
                         or queue[0].deadline <= now):
            conn = queue.popleft()
            if conn.pipe is None and conn in self.conns:
                self._close(conn)  # no handshake within the timeout

    # -- the client's side ------------------------------------------------------------
    def _client_ready(self, conn: _Conn, events: int) -> None:
        if events & _WRITE:
            self._flush_client(conn, b"")
        if not events & _READ:
            return
        data = conn.sock.recv(_CHUNK)
        if not data:
            self._close(conn)
            return
        conn.inbio.write(data)
        if conn.pipe is None:
            try:
                conn.obj.do_handshake()
            except ssl.SSLWantReadError:
                self._flush_client(conn, b"")
                return
            except ssl.SSLError:
                with contextlib.suppress(OSError):  # the alert, for the client's log
                    conn.sock.send(conn.outbio.read())
                raise
            self._flush_client(conn, b"")
            self._hand_over(conn)
            if conn.pipe is None:
                return
        self._decrypt(conn)

    def _decrypt(self, conn: _Conn) -> None:
        chunks = []
        ended = False
        try:
            while True:
                chunk = conn.obj.read(_CHUNK)
                if not chunk:  # close_notify (an empty read is never "no data yet")
                    ended = True
                    break
                chunks.append(chunk)
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            ended = True
        if chunks:
            self._to_pipe(conn, b"".join(chunks))
        if ended:
            # Answer the close_notify (asyncio clients wait for it), then close.
            with contextlib.suppress(ssl.SSLError):
                conn.obj.unwrap()
            with contextlib.suppress(OSError):
                conn.sock.send(conn.out + conn.outbio.read())
            self._close(conn)
            return
        if conn.outbio.pending:  # e.g. a key update's answer
            self._flush_client(conn, b"")

    def _flush_client(self, conn: _Conn, extra: bytes) -> None:
        data = conn.out + conn.outbio.read() + extra
        if data:
            try:
                sent = conn.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            data = data[sent:]
        self._pending(conn, conn.sock, data, client=True)

    def _pending(self, conn: _Conn, sock: socket.socket, data: bytes, *, client: bool) -> None:
        before = conn.out if client else conn.pipe_out
        if client:
            conn.out = data
        else:
            conn.pipe_out = data
        if len(data) > _MAX_PENDING:
            raise OSError("the peer does not read")
        if bool(before) != bool(data):
            self.sel.modify(sock, _READ | _WRITE if data else _READ, conn)

    # -- the SIP process's side -------------------------------------------------------
    def _hand_over(self, conn: _Conn) -> None:
        remote = conn.sock.getpeername()[:2]
        local = conn.sock.getsockname()[:2]
        # getpeercert() is empty unless a certificate was presented and verified.
        names = peer_dns_names(conn.obj.getpeercert())
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            socket.send_fds(self.control, [_pack(remote, local, names)], [theirs.fileno()])
        except OSError as exc:
            log.warning("cannot pass a TLS connection to the SIP process: %s", exc)
            mine.close()
            self._close(conn)
            return
        finally:
            theirs.close()
        mine.setblocking(False)
        conn.pipe = mine
        self.sel.register(mine, _READ, conn)

    def _to_pipe(self, conn: _Conn, data: bytes) -> None:
        pipe = conn.pipe
        assert pipe is not None
        data = conn.pipe_out + data
        try:
            sent = pipe.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        self._pending(conn, pipe, data[sent:], client=False)

    def _pipe_ready(self, conn: _Conn, events: int) -> None:
        pipe = conn.pipe
        assert pipe is not None
        if events & _WRITE:
            self._to_pipe(conn, b"")
        if not events & _READ:
            return
        data = pipe.recv(_CHUNK)
        if not data:  # the SIP process closed the flow: close_notify, then close
            with contextlib.suppress(ssl.SSLError):
                conn.obj.unwrap()
            with contextlib.suppress(OSError):
                conn.sock.send(conn.out + conn.outbio.read())
            self._close(conn)
            return
        conn.obj.write(data)
        self._flush_client(conn, b"")

    def _close(self, conn: _Conn) -> None:
        if conn not in self.conns:
            return
        self.conns.discard(conn)
        for sock in (conn.sock, conn.pipe):
            if sock is None:
                continue
            with contextlib.suppress(KeyError, ValueError, OSError):
                self.sel.unregister(sock)
            sock.close()


#: A worker that dies sooner than this after its start is replaced only after this long.
_RESTART_PAUSE = 1.0


def _fork_worker(
    listener: socket.socket, control: socket.socket, ctx: ssl.SSLContext, handshake_timeout: float
) -> int:
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            _Worker(listener, control, ctx, handshake_timeout).run()
        except BaseException:  # report and leave: the front sees the exit
            log.exception("TLS worker failed")
            code = 1
        os._exit(code)
    return pid


def _control_closed(control: socket.socket) -> bool:
    """The SIP process never writes on the control socket: readable means it closed it."""
    readable, _, _ = select.select([control], [], [], 0)
    return bool(readable)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="TLS workers in front of a SIP process")
    parser.add_argument("--listen-fd", type=int, required=True)
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--client-ca", default=None)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--handshake-timeout", type=float, default=5.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING,
                        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")
    listener = socket.socket(fileno=args.listen_fd)
    listener.setblocking(False)
    control = socket.socket(fileno=args.control_fd)
    control.setblocking(True)  # a busy SIP process slows the accepts: back-pressure
    # One context, made before the fork: every worker has its ticket key, and so
    # does a worker forked later to replace one that died.
    ctx = server_context(
        Path(args.cert), Path(args.key), client_ca=args.client_ca, client_cert_required=False
    )
    started: dict[int, float] = {}  # worker pid -> when it was forked
    for _ in range(max(1, args.workers)):
        started[_fork_worker(listener, control, ctx, args.handshake_timeout)] = time.monotonic()
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(started):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    # The front keeps the listener and the control socket, to hand them to a
    # replacement worker; it never accepts or sends on them.
    worst = 0
    while started:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        lived = time.monotonic() - started.pop(pid, time.monotonic())
        code = os.waitstatus_to_exitcode(status)
        if stopping or _control_closed(control):
            worst = max(worst, code if code > 0 else 0)
            continue
        # Killed or crashed while the SIP process still wants TLS: its clients
        # were reset and reconnect to the others; put a new worker in its place.
        log.warning("TLS worker %d died (%s); starting another", pid,
                    f"exit {code}" if code >= 0 else f"signal {-code}")
        if lived < _RESTART_PAUSE:
            time.sleep(_RESTART_PAUSE)  # one that dies at once is not restarted in a loop
            if stopping or _control_closed(control):
                continue
        started[_fork_worker(listener, control, ctx, args.handshake_timeout)] = time.monotonic()
    listener.close()
    control.close()
    return 0 if worst == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

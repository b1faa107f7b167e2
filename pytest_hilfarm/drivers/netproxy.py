"""A userspace TCP proxy on 127.0.0.1 that gives a stream the loss, latency and outages of a link.

Its job: stand in front of a test server (an OTA HTTP server, say) so that clients on this host
(virtual boards) see the conditions of :class:`pytest_hilfarm.drivers.netem.Conditions`. It must not
listen on or connect to anything but loopback, and every thread, queue and wait in it is bounded
and stops within ~0.1 s of :meth:`ImpairmentProxy.stop`.

The model, honestly (a TCP stream cannot lose bytes, only be late):

* latency: every chunk (at most one segment, 1460 bytes) is delivered ``delay_ms / 2`` (+ a
  normal jitter of ``jitter_ms / 2``) after it was read, in each direction, so a request/response
  round trip grows by ``delay_ms`` as on a netem rig. Order is kept (TCP never reorders).
* loss: each chunk is "lost" with probability ``loss``; a lost chunk costs one retransmission
  timeout (RTO = max(200 ms, RTT + 4 x jitter), as Linux computes it, doubling on every repeated
  loss of the same chunk, at most 6 times) and holds back everything behind it (head-of-line
  blocking). Not modelled: fast retransmit (which recovers a bulk flow in ~1 RTT, so this model is
  pessimistic for big downloads), congestion-window halving (which makes real transfers slower).
* rate: chunks leave no faster than ``rate_kbit``.
* outage ``hold`` (= netem's 100 % loss): nothing is delivered until the outage ends; connections
  stay open, bytes queue (bounded) and then flow, as after TCP retransmissions. New connections
  are accepted at once (a userspace proxy cannot refuse a handshake its kernel completes) but are
  connected upstream only when the outage ends. A real client's own timeouts still apply.
* outage ``cut`` (a carrier switch / address change): every open connection is reset (RST) and
  new ones are reset as they arrive until the outage ends.
"""

from __future__ import annotations

import ipaddress
import queue
import random
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from pytest_hilfarm.description.network import CLEAR, Conditions
from pytest_hilfarm.errors import UsageError

OutageMode = Literal["hold", "cut"]

SEGMENT = 1460
# Bounded buffering per direction (~64 segments, about a Linux socket buffer's worth) so a held
# connection applies backpressure instead of eating memory.
_QUEUE_SEGMENTS = 64
_POLL_S = 0.1
_MIN_RTO_S = 0.2  # Linux TCP_RTO_MIN
_MAX_BACKOFFS = 6
_CONNECT_TIMEOUT_S = 5.0
_EOF = b""


@dataclass(frozen=True)
class ProxyStats:
    """Counters since start: connections accepted/reset, bytes each way, chunks lost, stall."""

    connections: int
    active: int
    resets: int
    bytes_up: int
    bytes_down: int
    chunks: int
    lost_chunks: int
    stall_s: float


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Outage:
    """The proxy's outage state; waiters wake when it ends."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.mode: OutageMode | None = None


class ImpairmentProxy:
    """Impairing TCP proxy from 127.0.0.1:<port> to a loopback ``target`` (see module doc).

    ``rng_seed`` makes the loss pattern reproducible. ``max_connections`` bounds the threads
    (four per connection); more simultaneous clients are reset.
    """

    def __init__(self, target: tuple[str, int], *, conditions: Conditions = CLEAR,
                 listen_port: int = 0, rng_seed: int | None = None,
                 max_connections: int = 16,
                 clock: Callable[[], float] = time.monotonic) -> None:
        host, port = target
        if not _is_loopback(host):
            raise UsageError(f"proxy target {host}:{port} is not a loopback address",
                             where="ImpairmentProxy",
                             hint="put only servers on 127.0.0.1 behind the proxy; real rigs "
                             "are impaired with netem on their interface instead")
        self.target = (host, int(port))
        self._conditions = conditions
        self._listen_port = listen_port
        self._rng = random.Random(rng_seed)
        self._rng_lock = threading.Lock()
        self._clock = clock
        self._max = max_connections
        self._stop = threading.Event()
        self._outage = _Outage()
        self._lock = threading.Lock()
        self._conns: set[_Connection] = set()
        self._threads: list[threading.Thread] = []
        self._sock: socket.socket | None = None
        self._counts = {"connections": 0, "resets": 0, "bytes_up": 0, "bytes_down": 0,
                        "chunks": 0, "lost_chunks": 0}
        self._stall = 0.0

    # -- lifecycle

    def start(self) -> ImpairmentProxy:
        if self._sock is not None:
            return self
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self._listen_port))
        sock.listen(16)
        sock.setblocking(False)
        self._sock = sock
        self._spawn(self._accept_loop, "netproxy-accept")
        return self

    def stop(self) -> None:
        """Stop accepting, reset every connection and join the threads (bounded)."""
        self._stop.set()
        with self._outage.cond:
            self._outage.cond.notify_all()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            conn.abort()
        for thread in list(self._threads):
            thread.join(timeout=2.0)
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> ImpairmentProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def address(self) -> tuple[str, int]:
        if self._sock is None:
            raise UsageError("the proxy is not started", where="ImpairmentProxy.address",
                             hint="call start() or use it as a context manager")
        host, port = self._sock.getsockname()[:2]
        return str(host), int(port)

    def url(self, path: str = "/", scheme: str = "http") -> str:
        host, port = self.address
        return f"{scheme}://{host}:{port}{path}"

    # -- conditions

    @property
    def conditions(self) -> Conditions:
        return self._conditions

    def set_conditions(self, conditions: Conditions) -> None:
        self._conditions = conditions
        with self._outage.cond:
            self._outage.cond.notify_all()  # a lifted 100 % loss releases held chunks

    @property
    def outage_mode(self) -> OutageMode | None:
        return self._outage.mode

    def begin_outage(self, mode: OutageMode = "hold") -> None:
        if mode not in ("hold", "cut"):
            raise UsageError(f"unknown outage mode {mode!r}", where="ImpairmentProxy.outage",
                             hint="use 'hold' (packets vanish, connections stay) or 'cut' "
                             "(connections are reset)")
        with self._outage.cond:
            self._outage.mode = mode
        if mode == "cut":
            self.cut_all()

    def end_outage(self) -> None:
        with self._outage.cond:
            self._outage.mode = None
            self._outage.cond.notify_all()

    def outage(self, seconds: float, mode: OutageMode = "hold") -> None:
        """Block for an outage of ``seconds`` (use the fixture's helper for a background one)."""
        self.begin_outage(mode)
        try:
            self._stop.wait(seconds)
        finally:
            self.end_outage()

    def cut_all(self) -> None:
        """Reset every open connection (RST), as an address change does to its flows."""
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            conn.abort()
            self._count("resets")

    def stats(self) -> ProxyStats:
        with self._lock:
            return ProxyStats(active=len(self._conns), stall_s=self._stall, **self._counts)

    # -- internals

    def _spawn(self, func: Callable[..., None], name: str, *args: object) -> None:
        thread = threading.Thread(target=func, args=args, name=name, daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] += n

    def _accept_loop(self) -> None:
        assert self._sock is not None
        listener = self._sock
        while not self._stop.is_set():
            ready, _, _ = select.select([listener], [], [], _POLL_S)
            if not ready:
                continue
            try:
                client, _ = listener.accept()
            except (BlockingIOError, OSError):
                continue
            client.setblocking(True)
            self._count("connections")
            with self._lock:
                full = len(self._conns) >= self._max
            if full or self._outage.mode == "cut":
                _reset(client)
                self._count("resets")
                continue
            self._spawn(self._serve, "netproxy-conn", client)

    def _blocked(self) -> bool:
        return self._outage.mode is not None or self._conditions.loss >= 1.0

    def wait_unblocked(self) -> bool:
        """Wait (bounded by stop) while an outage or 100 % loss holds traffic; False if stopped."""
        with self._outage.cond:
            while self._blocked() and not self._stop.is_set():
                self._outage.cond.wait(_POLL_S)
        return not self._stop.is_set()

    def _serve(self, client: socket.socket) -> None:
        if not self.wait_unblocked():
            _reset(client)
            return
        try:
            upstream = socket.create_connection(self.target, timeout=_CONNECT_TIMEOUT_S)
        except OSError:
            _reset(client)
            self._count("resets")
            return
        upstream.settimeout(None)
        conn = _Connection(self, client, upstream)
        with self._lock:
            self._conns.add(conn)
        conn.run()
        with self._lock:
            self._conns.discard(conn)

    def schedule(self, size: int, state: _Direction) -> float:
        """When a chunk of ``size`` bytes read now must be delivered (the model's core)."""
        c = self._conditions
        now = self._clock()
        one_way = c.delay_ms / 2000.0
        if c.jitter_ms > 0:
            with self._rng_lock:
                one_way = max(0.0, one_way + self._rng.gauss(0.0, c.jitter_ms / 2000.0))
        penalty = 0.0
        if 0 < c.loss < 1:
            rto = max(_MIN_RTO_S, (c.delay_ms + 4 * c.jitter_ms) / 1000.0)
            with self._rng_lock:
                tries = 0
                while tries < _MAX_BACKOFFS and self._rng.random() < c.loss:
                    penalty += rto
                    rto *= 2
                    tries += 1
            if tries:
                self._count("lost_chunks", tries)
                with self._lock:
                    self._stall += penalty
        if c.rate_kbit is not None:
            state.tx_free = max(state.tx_free, now) + size * 8 / (c.rate_kbit * 1000.0)
            ready = state.tx_free
        else:
            ready = now
        due = max(state.last_due, ready + one_way + penalty)
        state.last_due = due
        self._count("chunks")
        return due


@dataclass
class _Direction:
    """Per-direction pacing state (touched by its reader thread only)."""

    last_due: float = 0.0
    tx_free: float = 0.0


class _Connection:
    """One proxied connection: a reader and a writer thread per direction."""

    def __init__(self, proxy: ImpairmentProxy, client: socket.socket,
                 upstream: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream = upstream
        self.dead = threading.Event()

    def run(self) -> None:
        pipes = [
            threading.Thread(target=self._pipe, args=(self.client, self.upstream, "bytes_up"),
                             name="netproxy-up", daemon=True),
            threading.Thread(target=self._pipe, args=(self.upstream, self.client, "bytes_down"),
                             name="netproxy-down", daemon=True),
        ]
        for t in pipes:
            t.start()
        for t in pipes:
            t.join()
        self.close()

    def _pipe(self, src: socket.socket, dst: socket.socket, counter: str) -> None:
        chunks: queue.Queue[tuple[float, bytes]] = queue.Queue(maxsize=_QUEUE_SEGMENTS)
        writer = threading.Thread(target=self._writer, args=(chunks, dst, counter),
                                  name="netproxy-write", daemon=True)
        writer.start()
        state = _Direction()
        stop = self.proxy._stop
        while not (stop.is_set() or self.dead.is_set()):
            try:
                ready, _, _ = select.select([src], [], [], _POLL_S)
                if not ready:
                    continue
                data = src.recv(SEGMENT)
            except (OSError, ValueError):
                data = _EOF
            due = self.proxy.schedule(len(data), state) if data else state.last_due
            if not self._put(chunks, (due, data)) or not data:
                break
        writer.join()

    def _put(self, chunks: queue.Queue[tuple[float, bytes]], item: tuple[float, bytes]) -> bool:
        while not (self.proxy._stop.is_set() or self.dead.is_set()):
            try:
                chunks.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _writer(self, chunks: queue.Queue[tuple[float, bytes]], dst: socket.socket,
                counter: str) -> None:
        proxy = self.proxy
        while not (proxy._stop.is_set() or self.dead.is_set()):
            try:
                due, data = chunks.get(timeout=_POLL_S)
            except queue.Empty:
                continue
            while not self.dead.is_set():
                wait = due - proxy._clock()
                if wait <= 0 or proxy._stop.wait(min(wait, _POLL_S)):
                    break
            if not proxy.wait_unblocked() or self.dead.is_set():
                return
            try:
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    return
                dst.sendall(data)
            except OSError:
                self.abort()
                return
            proxy._count(counter, len(data))

    def abort(self) -> None:
        """Reset both sides at once (RST, not FIN)."""
        if self.dead.is_set():
            return
        self.dead.set()
        _reset(self.client)
        _reset(self.upstream)

    def close(self) -> None:
        self.dead.set()
        for s in (self.client, self.upstream):
            try:
                s.close()
            except OSError:
                pass


def _reset(sock: socket.socket) -> None:
    # SO_LINGER with a zero timeout makes close() send RST: the peer sees "connection reset",
    # as a client does whose flow died with its old address.
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass

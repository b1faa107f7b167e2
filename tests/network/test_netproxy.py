"""The impairment proxy on loopback: latency added, loss as stalls, rate, outages hold or cut."""

from __future__ import annotations

import socket
import statistics
import threading
import time
from collections.abc import Iterator

import pytest

from pytest_hilfarm.description.network import BUILTIN_PROFILES, Conditions
from pytest_hilfarm.drivers.netproxy import ImpairmentProxy
from pytest_hilfarm.errors import UsageError


@pytest.fixture
def echo_server() -> Iterator[tuple[str, int]]:
    """A TCP echo server on 127.0.0.1 (bounded: stops with the test)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    srv.settimeout(0.2)
    stop = threading.Event()

    def handle(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(0.2)
            while not stop.is_set():
                try:
                    data = conn.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not data:
                    return
                try:
                    conn.sendall(data)
                except OSError:
                    return

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield srv.getsockname()
    stop.set()
    thread.join(timeout=2)
    srv.close()


def rtts(sock: socket.socket, n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.monotonic()
        sock.sendall(b"p")
        assert sock.recv(16) == b"p"
        out.append((time.monotonic() - start) * 1000)
    return out


def transfer(sock: socket.socket, size: int) -> float:
    start = time.monotonic()
    payload = b"x" * size
    threading.Thread(target=sock.sendall, args=(payload,), daemon=True).start()
    got = 0
    while got < size:
        chunk = sock.recv(65536)
        assert chunk
        got += len(chunk)
    return time.monotonic() - start


def test_only_loopback_targets() -> None:
    with pytest.raises(UsageError, match="not a loopback"):
        ImpairmentProxy(("192.0.2.1", 80))


def test_latency_is_added_to_the_round_trip(echo_server: tuple[str, int]) -> None:
    cellular = BUILTIN_PROFILES["cellular"].conditions
    no_loss = Conditions(delay_ms=cellular.delay_ms, jitter_ms=cellular.jitter_ms)
    with ImpairmentProxy(echo_server, conditions=no_loss, rng_seed=1) as proxy:
        with socket.create_connection(proxy.address, timeout=5) as sock:
            median = statistics.median(rtts(sock, 9))
    print(f"proxy median RTT {median:.1f} ms for {no_loss.delay_ms} ms added")
    assert abs(median - 300) <= 0.2 * 300


def test_loss_becomes_retransmission_stalls(echo_server: tuple[str, int]) -> None:
    with ImpairmentProxy(echo_server, conditions=Conditions(loss=0.05), rng_seed=7) as proxy:
        with socket.create_connection(proxy.address, timeout=10) as sock:
            seconds = transfer(sock, 300_000)
    stats = proxy.stats()  # after stop(): every writer thread has finished counting
    chunks = stats.chunks
    print(f"5 % loss: {stats.lost_chunks}/{chunks} chunks lost, {stats.stall_s:.1f} s of RTO, "
          f"300 kB echoed in {seconds:.2f} s")
    assert stats.bytes_up == stats.bytes_down == 300_000  # a stream loses nothing, only time
    assert 0.01 * chunks <= stats.lost_chunks <= 0.12 * chunks
    assert seconds >= 0.2  # at least one RTO


def test_rate_limits_throughput(echo_server: tuple[str, int]) -> None:
    with ImpairmentProxy(echo_server, conditions=Conditions(rate_kbit=4000)) as proxy:
        with socket.create_connection(proxy.address, timeout=10) as sock:
            seconds = transfer(sock, 100_000)
    # 100 kB each way at 4 Mbit/s is 0.2 s per direction (pipelined): ~0.2-0.5 s.
    assert 0.18 <= seconds <= 1.0


def test_hold_outage_keeps_the_connection_and_delivers_after(echo_server: tuple[str, int]
                                                             ) -> None:
    with ImpairmentProxy(echo_server) as proxy:
        with socket.create_connection(proxy.address, timeout=5) as sock:
            proxy.begin_outage("hold")
            sock.sendall(b"held")
            sock.settimeout(0.5)
            with pytest.raises(TimeoutError):
                sock.recv(16)
            proxy.end_outage()
            sock.settimeout(5)
            assert sock.recv(16) == b"held"


def test_timed_outage_blocks_for_its_length(echo_server: tuple[str, int]) -> None:
    with ImpairmentProxy(echo_server) as proxy:
        with socket.create_connection(proxy.address, timeout=5) as sock:
            threading.Timer(0.05, proxy.outage, args=(0.6,)).start()
            time.sleep(0.1)
            start = time.monotonic()
            sock.sendall(b"x")
            assert sock.recv(16) == b"x"
            assert 0.4 <= time.monotonic() - start <= 1.5


def test_cut_outage_resets_connections(echo_server: tuple[str, int]) -> None:
    with ImpairmentProxy(echo_server) as proxy:
        sock = socket.create_connection(proxy.address, timeout=5)
        assert rtts(sock, 1)
        proxy.begin_outage("cut")
        with pytest.raises(OSError):
            sock.sendall(b"x")
            if not sock.recv(16):
                raise ConnectionResetError("closed")
        sock.close()
        # New connections are reset too until the outage ends; then they work again.
        # The reset may come as early as the connect itself.
        with pytest.raises(OSError):
            with socket.create_connection(proxy.address, timeout=5) as late:
                late.sendall(b"x")
                if not late.recv(16):
                    raise ConnectionResetError("closed")
        proxy.end_outage()
        with socket.create_connection(proxy.address, timeout=5) as again:
            assert rtts(again, 1)
        assert proxy.stats().resets >= 2


def test_stop_is_bounded_with_a_held_connection(echo_server: tuple[str, int]) -> None:
    proxy = ImpairmentProxy(echo_server).start()
    sock = socket.create_connection(proxy.address, timeout=5)
    proxy.begin_outage("hold")
    sock.sendall(b"x" * 1000)
    start = time.monotonic()
    proxy.stop()
    sock.close()
    assert time.monotonic() - start < 3

"""Multi-host benchmarks (issue 8, section 5): reservation latency and flashing through a rig host.

1. Reservation latency: C client processes (default 32) over B boards (default 64), each taking
   N one-board leases (hold 2-5 ms, then release), started together once every client has
   started up (imported, built its reserver and taken ``--warmup`` unmeasured leases, default
   1: a process's first lease reads the farm's state). Reports p50/p99/max of the
   reserve() call and the grant throughput, for the PostgreSQL backend (PgReserver) and for the
   single-host default (file locks + SQLite in a temporary directory), each with strict FIFO and
   with backfill (the scheduling policy), in the same run. History is checked for overlaps.
2. Flashing a 1 MB compressible app image (``build_app(..., pad_to="1MB")``) onto a virtual
   ESP32: locally over socket:// (the farm's virtual-rack path), through a rig host's upload path
   (first call uploads; later calls find the image cached), and through the rig host's rfc2217://
   port with esptool's own DTR/RTS reset. Every run writes all bytes (skip_identical=False).

Needs PostgreSQL: ``--database URL``, or the server binaries (a throw-away cluster is started, as
the tests do). Run: ``python bench/bench_multihost.py [--clients 32 --boards 64 --leases 20]``.
Prints markdown tables.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import math
import multiprocessing
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pytest_hilfarm.reservation import Owner, Policy, Reserver  # noqa: E402
from pytest_hilfarm.reservation.allocate import BoardInfo, BoardRequest  # noqa: E402
from pytest_hilfarm.store import BoardHealth, FarmStore  # noqa: E402

TOKEN = "bench-token-0123456789abcdef"


# -- a throw-away PostgreSQL ----------------------------------------------------------------


@contextlib.contextmanager
def temp_postgres() -> Iterator[str]:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise SystemExit("no PostgreSQL binaries: apt-get install postgresql, or pass --database")
    bin_dir = Path(found[-1]).parent
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    root = Path(tempfile.mkdtemp(prefix="bench-hilfarm-pg-"))
    os.chmod(root, 0o755)
    if prefix:
        shutil.chown(root, "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run([*prefix, str(bin_dir / "initdb"), "-D", str(root / "data"), "-U", "postgres",
                    "--auth=trust", "--no-sync"], check=True, capture_output=True)
    options = (f"-k {root} -p {port} -c listen_addresses=127.0.0.1 -c max_connections=300 "
               "-c fsync=off -c synchronous_commit=off")
    subprocess.run([*prefix, str(bin_dir / "pg_ctl"), "-D", str(root / "data"), "-o", options,
                    "-l", str(root / "log"), "-w", "start"], check=True, capture_output=True)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*prefix, str(bin_dir / "pg_ctl"), "-D", str(root / "data"), "-m", "fast",
                        "-w", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def fresh_database(url: str) -> str:
    import psycopg

    name = "bench_" + uuid.uuid4().hex[:10]
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return url.rsplit("/", 1)[0] + "/" + name


# -- reservation latency ----------------------------------------------------------------------


def _boards(n: int) -> list[BoardInfo]:
    return [BoardInfo(f"esp32-{i}", "esp32") for i in range(1, n + 1)]


POLICIES = {"strict FIFO": Policy(backfill=False), "backfill": Policy()}


def _make(kind: str, where: str, boards: list[BoardInfo], policy: str = "backfill") -> Any:
    if kind == "postgresql":
        from pytest_hilfarm.reservation.postgresql import PgReserver
        from pytest_hilfarm.store.postgresql import PgFarmStore

        return PgReserver(where, PgFarmStore(where), boards, policy=POLICIES[policy])
    store = FarmStore(Path(where) / "farm.sqlite")
    return Reserver(boards, Path(where) / "locks", store, policy=POLICIES[policy])


def _client(kind: str, where: str, nboards: int, leases: int, seed: int, ready: Any,
            out: Any, policy: str, warmup: int) -> None:
    reserver = _make(kind, where, _boards(nboards), policy)
    rng = random.Random(seed)
    owner = Owner.current(test_id=f"bench-{seed}")
    latencies = []
    for _ in range(warmup):  # a process's first lease reads the farm's state (not measured)
        reserver.reserve(BoardRequest(1, "esp32"), owner, timeout=120).release()
    # Every client imported and built its reserver before any measures: on 2 cores, 32
    # interpreters still starting would put their start-up into the first reservations.
    ready.wait()
    for _ in range(leases):
        started = time.perf_counter()
        lease = reserver.reserve(BoardRequest(1, "esp32"), owner, timeout=120)
        latencies.append(time.perf_counter() - started)
        time.sleep(rng.uniform(0.002, 0.005))
        lease.release()
    out.put(latencies)


def _overlaps(store: Any) -> int:
    spans: dict[str, list[tuple[float, float]]] = {}
    for record in store.history(limit=1_000_000):
        if record.granted_at is None:
            continue
        for board in record.boards:
            spans.setdefault(board, []).append(
                (record.granted_at, record.released_at or math.inf))
    bad = 0
    for items in spans.values():
        items.sort()
        bad += sum(1 for a, b in zip(items, items[1:]) if a[1] > b[0])
    return bad


def bench_reservation(kind: str, where: str, clients: int, nboards: int, leases: int,
                      policy: str, warmup: int = 1) -> dict[str, float]:
    reserver = _make(kind, where, _boards(nboards), policy)
    for board in _boards(nboards):
        reserver.store.set_health(board.id, BoardHealth.GOOD, "bench")
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    ready = ctx.Barrier(clients + 1)
    procs = [ctx.Process(target=_client,
                         args=(kind, where, nboards, leases, i, ready, queue, policy, warmup))
             for i in range(clients)]
    for proc in procs:
        proc.start()
    ready.wait(timeout=600)
    start_at = time.time()
    latencies: list[float] = []
    for _ in procs:
        latencies += queue.get(timeout=600)
    wall = time.time() - start_at
    for proc in procs:
        proc.join(60)
    latencies.sort()
    q = statistics.quantiles(latencies, n=100)
    return {"p50_ms": q[49] * 1e3, "p99_ms": q[98] * 1e3, "max_ms": latencies[-1] * 1e3,
            "grants_per_s": len(latencies) / wall, "grants": len(latencies),
            "overlaps": _overlaps(reserver.store)}


# -- flashing ---------------------------------------------------------------------------------


RACK = """\
version: 1
name: bench-rig
state_dir: {state}
boards:
  - id: bench-esp32-1
    chip: esp32
    port: virtual
    reset: virtual
    power: virtual
    flash: {{size: 4MB}}
"""


def bench_flash(url: str, runs: int, tmp: Path) -> list[tuple[str, list[float]]]:
    from pytest_hilfarm.drivers.flashing import flash
    from pytest_hilfarm.drivers.rigclient import RigClient
    from pytest_hilfarm.drivers.virtual import ControlClient
    from pytest_hilfarm.sim import manager
    from pytest_hilfarm.sim.appbuild import build_app

    rack = tmp / "bench-rig.yaml"
    rack.write_text(RACK.format(state=tmp / "state"))
    sim_dir = tmp / "sim"
    info = manager.up(rack, sim_dir)
    (tmp / "token").write_text(TOKEN)
    env = {**os.environ, "HILFARM_SIM_DIR": str(sim_dir)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest_hilfarm.cli.export", "--rack", str(rack), "--listen",
         "127.0.0.1:0", "--database", url, "--token-file", str(tmp / "token"),
         "--host-name", "bench-rig"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(3)]
        control = next(x.split()[-1] for x in lines if "control API" in x)
        rfc = next(x.split()[-1] for x in lines if "rfc2217://" in x)
        from pytest_hilfarm.drivers.flashing import FlashPlan

        ctl = ControlClient(info.control)
        local = info.board("bench-esp32-1").port
        client = RigClient(control, TOKEN)
        results: list[tuple[str, list[float]]] = []

        def timed(fn: Any, *args: Any, **kwargs: Any) -> float:
            started = time.perf_counter()
            fn(*args, **kwargs)
            return time.perf_counter() - started

        def download() -> None:
            ctl.reset("bench-esp32-1", "download")

        images = {
            "compressible app": FlashPlan.from_image(
                build_app("esp32", "bench", "1.0", pad_to="1MB")),
            # Random bytes do not compress: every byte crosses the wire.
            "random": FlashPlan.from_files([(0x10000, random.Random(7).randbytes(1 << 20))]),
        }
        for label, plan in images.items():
            results.append((f"{label}: local socket:// (farm path)", [
                timed(flash, local, "esp32", plan, skip_identical=False, before="no-reset",
                      after="no-reset", enter_download=download) for _ in range(runs)]))
            first = timed(client.flash, "bench-esp32-1", plan, skip_identical=False)
            cached = [timed(client.flash, "bench-esp32-1", plan, skip_identical=False)
                      for _ in range(runs)]
            results.append((f"{label}: rig host upload path, first (upload + flash)", [first]))
            results.append((f"{label}: rig host upload path, image cached", cached))
            client.attach("bench-esp32-1", 600)
            results.append((f"{label}: rig host rfc2217:// (esptool DTR/RTS reset)", [
                timed(flash, rfc, "esp32", plan, skip_identical=False) for _ in range(runs)]))
        return results
    finally:
        proc.terminate()
        proc.wait(10)
        manager.down(sim_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database", help="PostgreSQL URL (default: a throw-away cluster)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--boards", type=int, default=64)
    parser.add_argument("--leases", type=int, default=20, help="leases per client")
    parser.add_argument("--warmup", type=int, default=1,
                        help="unmeasured leases per client before all start together")
    parser.add_argument("--runs", type=int, default=2, help="runs per flash variant")
    parser.add_argument("--skip-flash", action="store_true")
    parser.add_argument("--skip-reservation", action="store_true")
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        base = args.database or stack.enter_context(temp_postgres())
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-hilfarm-")))
        if not args.skip_reservation:
            print(f"\n### Reservation latency: {args.clients} client processes, {args.boards} "
                  f"boards, {args.leases} one-board leases each (hold 2-5 ms)\n")
            print("| backend | policy | reserve p50 | p99 | max | grants/s | overlaps |")
            print("|---|---|---|---|---|---|---|")
            for policy in POLICIES:
                for kind in ("postgresql", "single-host (flock + SQLite)"):
                    where = (fresh_database(base) if kind == "postgresql"
                             else str(tmp / f"single-{policy.replace(' ', '-')}"))
                    r = bench_reservation("postgresql" if kind == "postgresql" else "file",
                                          where, args.clients, args.boards, args.leases, policy,
                                          args.warmup)
                    print(f"| {kind} | {policy} | {r['p50_ms']:.1f} ms | {r['p99_ms']:.1f} ms | "
                          f"{r['max_ms']:.1f} ms | {r['grants_per_s']:.0f} | {r['overlaps']} |",
                          flush=True)
        if not args.skip_flash:
            print("\n### Flashing a 1 MB compressible app image (all bytes written)\n")
            print("| path | runs | median | min |")
            print("|---|---|---|---|")
            for name, times in bench_flash(fresh_database(base), args.runs, tmp):
                print(f"| {name} | {len(times)} | {statistics.median(times):.2f} s | "
                      f"{min(times):.2f} s |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

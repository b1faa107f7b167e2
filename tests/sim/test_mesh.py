"""MeshMedium: formation, multi-hop routing, loss, latency, partitions, drops, thread safety."""

from __future__ import annotations

import random
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from simfakes import FakeClock, FakeScheduler

from pytest_hilfarm.sim.mesh import KEEP, MeshMedium, Packet


class Inbox:
    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.packets: list[Packet] = []
        self.times: list[float] = []
        self._lock = threading.Lock()

    def __call__(self, packet: Packet) -> None:
        with self._lock:
            self.packets.append(packet)
            self.times.append(self.clock.t)


def make(
    n: int = 3, *, seed: int = 1, jitter: float = 0.0, **kwargs: float
) -> tuple[MeshMedium, FakeClock, FakeScheduler, dict[str, Inbox]]:
    clock = FakeClock()
    sched = FakeScheduler(clock)
    medium = MeshMedium(clock, random.Random(seed), sched, join_jitter=jitter, **kwargs)
    inboxes = {}
    for i in range(1, n + 1):
        inboxes[f"n{i}"] = Inbox(clock)
        medium.join(f"n{i}", i, inboxes[f"n{i}"])
    return medium, clock, sched, inboxes


def formed(
    n: int = 3, *, seed: int = 1, **kwargs: float
) -> tuple[MeshMedium, FakeScheduler, dict[str, Inbox]]:
    medium, _, sched, inboxes = make(n, seed=seed, **kwargs)
    sched.advance(5.0)
    return medium, sched, inboxes


def test_formation_takes_join_delay_with_rng_jitter() -> None:
    medium, clock, sched, _ = make(3, jitter=0.5)
    sched.advance(2.99)
    assert not medium.is_joined("n1")
    assert medium.nodes("n1") == []
    sched.advance(0.52)  # 3.51 s: past delay + max jitter
    assert all(medium.is_joined(f"n{i}") for i in (1, 2, 3))
    assert medium.nodes("n1") == ["n2", "n3"]
    assert medium.stats()["joined"] == ["n1", "n2", "n3"]


def test_jitter_is_deterministic_per_seed() -> None:
    def joined_times(seed: int) -> list[float]:
        medium, clock, sched, _ = make(4, seed=seed, jitter=1.0)
        times: list[float] = []
        start = clock.t
        for _ in range(500):
            sched.advance(0.01)
            now = [n for n in ("n1", "n2", "n3", "n4") if medium.is_joined(n)]
            while len(times) < len(now):
                times.append(round(clock.t - start, 2))
        return times

    assert joined_times(7) == joined_times(7)
    assert all(3.0 <= t <= 4.01 for t in joined_times(7))


def test_custom_join_delay() -> None:
    medium, _, sched, _ = make(2, join_delay=10.0)
    sched.advance(9.9)
    assert not medium.is_joined("n1")
    sched.advance(0.2)
    assert medium.is_joined("n1")


def test_unjoined_node_cannot_send_or_receive() -> None:
    medium, clock, sched, inboxes = make(2)
    medium.send("n1", "n2", "early")
    sched.advance(5.0)
    assert inboxes["n2"].packets == []
    assert medium.stats()["no_route"] == 1


def test_neighbour_is_one_hop() -> None:
    medium, sched, inboxes = formed(2)
    msg_id = medium.send("n1", "n2", "hi there")
    sched.advance(1.0)
    assert inboxes["n2"].packets == [Packet("n1", "n2", "hi there", 1, msg_id)]
    assert inboxes["n1"].packets == []


def test_one_to_three_goes_via_two() -> None:
    medium, sched, inboxes = formed(3)
    assert medium.hops("n1", "n3") == 2
    msg_id = medium.send("n1", "n3", "relay me")
    sched.advance(1.0)
    assert inboxes["n3"].packets == [Packet("n1", "n3", "relay me", 2, msg_id)]
    assert inboxes["n2"].packets == []  # relays do not deliver unicast to their app


def test_relay_leaving_breaks_path_and_counts_disconnects() -> None:
    medium, sched, inboxes = formed(3)
    medium.leave("n2")
    assert medium.nodes("n1") == []
    medium.send("n1", "n3", "x")
    sched.advance(1.0)
    assert inboxes["n3"].packets == []
    stats = medium.stats()
    assert stats["disconnects_by_node"] == {"n1": 1, "n2": 0, "n3": 1}
    assert stats["leaves"] == 1
    # Last node in the line leaving breaks nobody else's path.
    medium.leave("n3")
    assert medium.stats()["disconnects"] == 2


def test_unjoined_relay_does_not_relay() -> None:
    medium, clock, sched, inboxes = make(2)
    inbox3 = Inbox(clock)
    sched.advance(2.0)
    medium.join("n3", 3, inbox3)
    sched.advance(1.5)  # n1, n2 joined; n3 still forming
    assert medium.nodes("n1") == ["n2"]
    medium.leave("n2")
    medium.join("n2", 2, inboxes["n2"])  # n2 restarts: must re-form before relaying
    sched.advance(2.0)
    assert medium.nodes("n1") == []
    sched.advance(2.0)
    assert medium.nodes("n1") == ["n2", "n3"]


def test_broadcast_reaches_all_with_hop_counts() -> None:
    medium, sched, inboxes = formed(4)
    msg_id = medium.send("n2", "all", "hello all")
    sched.advance(1.0)
    got = {n: [(p.hops, p.msg_id, p.dst) for p in box.packets] for n, box in inboxes.items()}
    assert got == {
        "n1": [(1, msg_id, "all")],
        "n2": [],
        "n3": [(1, msg_id, "all")],
        "n4": [(2, msg_id, "all")],
    }


def test_latency_is_per_hop() -> None:
    medium, sched, inboxes = formed(4, latency_ms=50.0)
    start = sched.clock.t
    medium.send("n1", "n4", "x")
    sched.advance(0.149)
    assert inboxes["n4"].packets == []
    sched.advance(0.002)
    assert inboxes["n4"].times == [pytest.approx(start + 0.150)]
    medium.configure(latency_ms=5)
    start = sched.clock.t
    medium.send("n1", "n2", "y")
    sched.advance(1.0)
    assert inboxes["n2"].times == [pytest.approx(start + 0.005)]


def test_default_latency_20ms_per_hop() -> None:
    medium, sched, inboxes = formed(3)
    start = sched.clock.t
    medium.send("n1", "n3", "x")
    sched.advance(1.0)
    assert inboxes["n3"].times == [pytest.approx(start + 0.040)]


def test_partition_blocks_and_lifting_restores() -> None:
    medium, sched, inboxes = formed(3)
    cond = medium.configure(partitions=[["n1"], ["n2", "n3"]])
    assert cond["partitions"] == [["n1"], ["n2", "n3"]]
    assert medium.nodes("n1") == []
    assert medium.nodes("n3") == ["n2"]
    medium.send("n1", "n2", "blocked")
    medium.send("n3", "n2", "inside")
    sched.advance(1.0)
    assert [p.text for p in inboxes["n2"].packets] == ["inside"]
    assert medium.stats()["disconnects_by_node"] == {"n1": 1, "n2": 1, "n3": 1}
    medium.configure(loss=0.0)  # other keys keep the partition
    assert medium.conditions()["partitions"] == [["n1"], ["n2", "n3"]]
    medium.configure(partitions=None)
    assert medium.nodes("n1") == ["n2", "n3"]
    medium.send("n1", "n3", "free")
    sched.advance(1.0)
    assert [p.text for p in inboxes["n3"].packets] == ["free"]


def test_partition_of_relay_cuts_multi_hop_and_empty_list_lifts() -> None:
    medium, sched, inboxes = formed(3)
    medium.configure(partitions=[["n1", "n3"], ["n2"]])
    assert medium.nodes("n1") == []  # n1 and n3 share a group but their relay does not
    medium.configure(partitions=[])
    assert medium.nodes("n1") == ["n2", "n3"]


def test_unlisted_nodes_form_their_own_group() -> None:
    medium, sched, _ = formed(4)
    medium.configure(partitions=[["n1"]])
    assert medium.nodes("n2") == ["n3", "n4"]
    assert medium.nodes("n1") == []


def test_partition_raised_while_packet_in_flight_loses_it() -> None:
    medium, sched, inboxes = formed(3)
    medium.send("n1", "n3", "x")
    sched.advance(0.030)  # first hop done, second in the air
    medium.configure(partitions=[["n1", "n2"], ["n3"]])
    sched.advance(1.0)
    assert inboxes["n3"].packets == []
    assert medium.stats()["lost"] == 1


def test_loss_one_drops_everything_zero_nothing() -> None:
    medium, sched, inboxes = formed(3, loss=1.0)
    for _ in range(20):
        medium.send("n1", "n3", "x")
        medium.send("n1", "all", "y")
    sched.advance(1.0)
    assert all(box.packets == [] for box in inboxes.values())
    medium.configure(loss=0.0)
    for _ in range(20):
        medium.send("n1", "n3", "x")
    sched.advance(1.0)
    assert len(inboxes["n3"].packets) == 20
    stats = medium.stats()
    assert stats["delivered"] == 20 and stats["lost"] == 40


def test_loss_ten_percent_is_statistically_plausible() -> None:
    medium, sched, inboxes = formed(2, seed=1234)
    medium.configure(loss=0.1)
    for _ in range(2000):
        medium.send("n1", "n2", "x")
    sched.advance(1.0)
    delivered = len(inboxes["n2"].packets)
    # Binomial(2000, 0.9): mean 1800, sd ~13.4; +-5 sd.
    assert 1733 <= delivered <= 1867
    # Two hops: each survives with 0.9 ** 2 = 0.81.
    medium2, sched2, inboxes2 = formed(3, seed=99, loss=0.1)
    for _ in range(2000):
        medium2.send("n1", "n3", "x")
    sched2.advance(1.0)
    assert 1620 - 90 <= len(inboxes2["n3"].packets) <= 1620 + 90


def test_loss_is_reproducible_with_the_same_seed() -> None:
    def run() -> list[int]:
        medium, sched, inboxes = formed(2, seed=5, loss=0.5)
        for _ in range(50):
            medium.send("n1", "n2", "x")
        sched.advance(1.0)
        return [p.msg_id for p in inboxes["n2"].packets]

    assert run() == run()


def test_drop_mesh_fault_of_receiver_and_relay() -> None:
    clock = FakeClock()
    sched = FakeScheduler(clock)
    medium = MeshMedium(clock, random.Random(3), sched)
    boxes = {n: Inbox(clock) for n in ("n1", "n2", "n3")}
    medium.join("n1", 1, boxes["n1"])
    medium.join("n2", 2, boxes["n2"], drop_fraction=1.0)  # relay app drops every packet
    medium.join("n3", 3, boxes["n3"])
    sched.advance(5.0)
    medium.send("n1", "n3", "via bad relay")
    medium.send("n3", "n2", "to bad node")
    medium.send("n1", "all", "flood")
    sched.advance(1.0)
    assert boxes["n3"].packets == [] and boxes["n2"].packets == []
    assert medium.stats()["dropped"] == 3
    # The sender's own drop fraction does not matter, and a partial one drops some.
    medium.leave("n2")
    medium.join("n2", 2, boxes["n2"], drop_fraction=0.5)
    sched.advance(5.0)
    for _ in range(400):
        medium.send("n2", "n1", "x")
        medium.send("n1", "n2", "y")
    sched.advance(1.0)
    assert len(boxes["n1"].packets) == 400
    assert 140 <= len(boxes["n2"].packets) <= 260


def test_send_to_self_and_bad_configuration_rejected() -> None:
    medium, sched, _ = formed(2)
    with pytest.raises(ValueError):
        medium.send("n1", "n1", "x")
    with pytest.raises(ValueError):
        medium.configure(loss=1.5)
    with pytest.raises(ValueError):
        medium.configure(latency_ms=-1)
    with pytest.raises(ValueError):
        medium.configure(partitions=[["n1"], ["n1", "n2"]])
    with pytest.raises(ValueError):
        medium.configure(partitions=["n1"])  # a bare string is not a group
    with pytest.raises(ValueError):
        medium.join("n9", 9, lambda p: None, drop_fraction=2.0)
    # Nothing changed by the rejected calls.
    assert medium.conditions() == {"loss": 0.0, "latency_ms": 20.0, "partitions": []}


def test_unknown_destination_counts_no_route() -> None:
    medium, sched, _ = formed(2)
    msg_id = medium.send("n1", "nope", "x")
    assert msg_id >= 1
    assert medium.stats()["no_route"] == 1
    assert medium.hops("n1", "nope") is None


def test_configure_keep_and_returns_conditions() -> None:
    medium, _, _ = formed(2)
    assert medium.configure(loss=0.25, partitions=KEEP) == {
        "loss": 0.25,
        "latency_ms": 20.0,
        "partitions": [],
    }
    assert medium.configure(latency_ms=7)["latency_ms"] == 7.0


def test_rejoin_replaces_callback() -> None:
    medium, sched, inboxes = formed(2)
    other = Inbox(sched.clock)
    medium.join("n2", 2, other)
    sched.advance(5.0)
    medium.send("n1", "n2", "x")
    sched.advance(1.0)
    assert inboxes["n2"].packets == [] and len(other.packets) == 1


def test_receiver_leaving_mid_flight_loses_packet() -> None:
    medium, sched, inboxes = formed(2)
    medium.send("n1", "n2", "x")
    medium.leave("n2")
    sched.advance(1.0)
    assert inboxes["n2"].packets == []
    assert medium.stats()["lost"] == 1


def test_concurrent_sends_from_threads_are_safe() -> None:
    medium, sched, inboxes = formed(5)
    ids: list[int] = []
    ids_lock = threading.Lock()
    barrier = threading.Barrier(4)

    def worker(src: str, dst: str) -> None:
        barrier.wait()
        mine = [medium.send(src, dst, f"{src}-{i}") for i in range(200)]
        with ids_lock:
            ids.extend(mine)

    def churn() -> None:
        barrier.wait()
        for _ in range(100):
            medium.nodes("n3")
            medium.configure(latency_ms=20)
            medium.stats()

    threads = [
        threading.Thread(target=worker, args=("n1", "n5")),
        threading.Thread(target=worker, args=("n5", "n1")),
        threading.Thread(target=worker, args=("n3", "all")),
        threading.Thread(target=churn),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(ids) == 600 and len(set(ids)) == 600
    sched.advance(1.0)
    assert len(inboxes["n5"].packets) == 400  # 200 unicast + 200 broadcast
    assert len(inboxes["n1"].packets) == 400
    assert all(p.hops == 4 for p in inboxes["n5"].packets if p.src == "n1")
    assert medium.stats()["delivered"] == 200 + 200 + 200 * 4


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(min_value=2, max_value=7),
    data=st.data(),
)
def test_hops_equal_position_distance_without_faults(n: int, data: st.DataObject) -> None:
    medium, sched, inboxes = formed(n)
    src = data.draw(st.integers(1, n))
    dst = data.draw(st.integers(1, n).filter(lambda d: d != src))
    medium.send(f"n{src}", f"n{dst}", "x")
    sched.advance(1.0)
    (packet,) = inboxes[f"n{dst}"].packets
    assert packet.hops == abs(src - dst)
    assert medium.nodes(f"n{src}") == [f"n{i}" for i in range(1, n + 1) if i != src]

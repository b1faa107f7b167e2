"""The radio medium the boards of one virtual rack share: mesh formation, multi-hop routing, loss.

Nodes sit on a line in rack order (``position``); radio range covers only neighbours (position
distance <= 1), so node 1 reaches node 3 only by relaying through node 2. A node takes part (is
"joined": relays, receives, shows up in :meth:`MeshMedium.nodes`) only ``join_delay`` (+ rng
jitter) seconds after :meth:`MeshMedium.join`. Every hop costs ``latency_ms`` and is lost with
probability ``loss``; the receiving/relaying node's app drops it with its own ``drop_fraction``
(the image's ``drop_mesh`` fault). Partitions cut every link between nodes of different groups.

It models what a mesh app can observe (who is reachable, hop counts, delays, losses), not RF.
It does no I/O and never sleeps: time comes from the injected clock and every delay goes through
the injected ``schedule``. Thread-safe: every public method may be called from any thread; the
``deliver`` callbacks and ``schedule`` are always called with the medium's lock released.
"""

from __future__ import annotations

import enum
import math
import random
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

BROADCAST = "all"
DEFAULT_JOIN_DELAY = 3.0
DEFAULT_JOIN_JITTER = 0.5
DEFAULT_LATENCY_MS = 20.0
# Group key of nodes not named in any partition group: together they form one more group, so
# partitioning off two boards leaves the rest of the rack talking.
_UNLISTED = -1

Deliver = Callable[["Packet"], None]
Schedule = Callable[[float, Callable[[], None]], None]


class _Keep(enum.Enum):
    KEEP = "keep"


# configure()'s "leave partitions as they are" (None already means "no partition").
KEEP = _Keep.KEEP


@dataclass(frozen=True)
class Packet:
    """A message as a node receives it. ``dst`` is a node id or ``"all"``; ``hops`` counts radio
    hops travelled (1 for a neighbour).
    """

    src: str
    dst: str
    text: str
    hops: int
    msg_id: int


@dataclass(frozen=True)
class _Node:
    node_id: str
    position: int
    deliver: Deliver
    drop_fraction: float
    joined_at: float


@dataclass(frozen=True)
class _Msg:
    src: str
    dst: str
    text: str
    msg_id: int


class MeshMedium:
    """Shared radio medium of one rack (see the module docstring).

    ``clock`` returns monotonic seconds; ``schedule(delay, func)`` must run ``func`` once after
    ``delay`` seconds on any thread and be callable from any thread. ``rng`` draws join jitter and
    losses; None means a private ``random.Random(0)``, so a rack run is reproducible by default.
    """

    def __init__(
        self,
        clock: Callable[[], float],
        rng: random.Random | None,
        schedule: Schedule,
        *,
        join_delay: float = DEFAULT_JOIN_DELAY,
        join_jitter: float = DEFAULT_JOIN_JITTER,
        latency_ms: float = DEFAULT_LATENCY_MS,
        loss: float = 0.0,
    ) -> None:
        if join_delay < 0 or join_jitter < 0:
            raise ValueError("join_delay and join_jitter must be >= 0")
        _check_loss(loss)
        _check_latency(latency_ms)
        self._clock = clock
        self._rng = rng if rng is not None else random.Random(0)
        self._schedule = schedule
        self._join_delay = join_delay
        self._join_jitter = join_jitter
        self._lock = threading.Lock()
        self._nodes: dict[str, _Node] = {}
        self._loss = float(loss)
        self._latency_ms = float(latency_ms)
        self._groups: tuple[tuple[str, ...], ...] = ()
        self._group_of: dict[str, int] = {}
        self._next_id = 1
        self._counts = {
            "sent": 0,
            "delivered": 0,
            "lost": 0,
            "dropped": 0,
            "no_route": 0,
            "joins": 0,
            "leaves": 0,
        }
        self._disconnects: dict[str, int] = {}
        # Last connectivity snapshot, kept to notice paths that break (disconnect counters).
        self._snap_joined: frozenset[str] = frozenset()
        self._snap_reach: dict[str, frozenset[str]] = {}
        self._topo_changed = False

    # ------------------------------------------------------------------ membership

    def join(
        self, node_id: str, position: int, deliver: Deliver, drop_fraction: float = 0.0
    ) -> None:
        """Start a node's radio; it becomes joined after the formation delay.

        Joining an id that is already present replaces it (a board that restarted its radio).
        """
        if not 0.0 <= drop_fraction <= 1.0:
            raise ValueError(f"drop_fraction must be within 0..1, not {drop_fraction!r}")
        with self._lock:
            now = self._clock()
            jitter = self._rng.uniform(0.0, self._join_jitter) if self._join_jitter else 0.0
            delay = self._join_delay + jitter
            self._nodes[node_id] = _Node(node_id, position, deliver, drop_fraction, now + delay)
            self._counts["joins"] += 1
            self._disconnects.setdefault(node_id, 0)
            self._topo_changed = True
            self._refresh_locked(now)
        # Re-check at formation time so disconnect counters see the topology as it evolves even
        # when nobody calls in between.
        self._schedule(delay, self._tick)

    def leave(self, node_id: str) -> None:
        """Stop a node's radio (board reset or power-off). Unknown ids are ignored."""
        with self._lock:
            if self._nodes.pop(node_id, None) is None:
                return
            self._counts["leaves"] += 1
            self._topo_changed = True
            self._refresh_locked(self._clock())

    def is_joined(self, node_id: str) -> bool:
        with self._lock:
            self._refresh_locked(self._clock())
            return node_id in self._snap_joined

    def nodes(self, node_id: str) -> list[str]:
        """Joined nodes reachable from ``node_id`` (itself excluded), in rack order.

        Empty when ``node_id`` is not joined.
        """
        with self._lock:
            self._refresh_locked(self._clock())
            peers = self._snap_reach.get(node_id, frozenset())
            return sorted(peers, key=self._order_key)

    def members(self, node_id: str) -> list[str]:
        """The nodes of ``node_id``'s mesh, itself included, in rack order (what ESP-IDF's
        esp_mesh_get_total_node_num() counts). Empty when ``node_id`` is not joined.
        """
        with self._lock:
            self._refresh_locked(self._clock())
            if node_id not in self._snap_joined:
                return []
            mesh = self._snap_reach.get(node_id, frozenset()) | {node_id}
            return sorted(mesh, key=self._order_key)

    def hops(self, src: str, dst: str) -> int | None:
        """Radio hops on the current shortest path from ``src`` to ``dst``; None if unreachable."""
        with self._lock:
            self._refresh_locked(self._clock())
            path = self._path_locked(src, dst)
            return None if path is None else len(path) - 1

    # ------------------------------------------------------------------ traffic

    def send(self, src: str, dst: str, text: str) -> int:
        """Send ``text`` from ``src`` to node ``dst`` or to ``"all"``; returns the message id.

        Fire-and-forget like a radio: an unroutable message still gets an id and is counted as
        ``no_route``. Delivery happens later, hop by hop, through ``schedule``.
        """
        if dst == src:
            raise ValueError(f"node {src!r} cannot send to itself")
        actions: list[Callable[[], None]] = []
        with self._lock:
            now = self._clock()
            self._refresh_locked(now)
            msg = _Msg(src, dst, text, self._next_id)
            self._next_id += 1
            self._counts["sent"] += 1
            if src not in self._snap_joined:
                self._counts["no_route"] += 1
            elif dst == BROADCAST:
                seen = {src}
                for peer in self._neighbours_locked(src):
                    self._transmit_locked(msg, src, peer, 1, seen, actions)
            else:
                self._forward_locked(msg, src, 0, actions)
        for action in actions:
            action()
        return msg.msg_id

    def _forward_locked(
        self, msg: _Msg, at: str, hops: int, actions: list[Callable[[], None]]
    ) -> None:
        # The next hop is chosen at each node from the topology of that moment, as a mesh's
        # routing table would be, so a partition mid-route stops the message where it is.
        path = self._path_locked(at, msg.dst)
        if path is None or len(path) < 2:
            self._counts["no_route"] += 1
            return
        self._transmit_locked(msg, at, path[1], hops + 1, None, actions)

    def _transmit_locked(
        self,
        msg: _Msg,
        frm: str,
        to: str,
        hops: int,
        seen: set[str] | None,
        actions: list[Callable[[], None]],
    ) -> None:
        if self._chance(self._loss):
            self._counts["lost"] += 1
            return
        arrive = partial(self._arrive, msg, frm, to, hops, seen)
        actions.append(partial(self._schedule, self._latency_ms / 1000.0, arrive))

    def _arrive(self, msg: _Msg, frm: str, to: str, hops: int, seen: set[str] | None) -> None:
        actions: list[Callable[[], None]] = []
        with self._lock:
            self._refresh_locked(self._clock())
            node = self._nodes.get(to)
            if node is None or to not in self._snap_joined or not self._same_group(frm, to):
                # The receiver left (or a partition came up) while the packet was in the air.
                self._counts["lost"] += 1
            elif seen is not None and to in seen:
                pass  # a flood copy that another path already brought
            else:
                if seen is not None:
                    seen.add(to)
                if self._chance(node.drop_fraction):
                    self._counts["dropped"] += 1
                elif msg.dst == BROADCAST:
                    self._deliver_locked(node, msg, hops, actions)
                    for peer in self._neighbours_locked(to):
                        if seen is not None and peer not in seen:
                            self._transmit_locked(msg, to, peer, hops + 1, seen, actions)
                elif to == msg.dst:
                    self._deliver_locked(node, msg, hops, actions)
                else:
                    self._forward_locked(msg, to, hops, actions)
        for action in actions:
            action()

    def _deliver_locked(
        self, node: _Node, msg: _Msg, hops: int, actions: list[Callable[[], None]]
    ) -> None:
        self._counts["delivered"] += 1
        packet = Packet(msg.src, msg.dst, msg.text, hops, msg.msg_id)
        actions.append(partial(node.deliver, packet))

    def _chance(self, p: float) -> bool:
        # No rng draw for 0 or 1, so a fault-free run consumes the same random stream as before.
        if p <= 0.0:
            return False
        if p >= 1.0:
            return True
        return self._rng.random() < p

    # ------------------------------------------------------------------ conditions

    def configure(
        self,
        loss: float | None = None,
        latency_ms: float | None = None,
        partitions: Sequence[Sequence[str]] | None | _Keep = KEEP,
    ) -> dict[str, Any]:
        """Change conditions at runtime; None for loss/latency and KEEP for partitions leave
        them as they are, ``partitions=None`` or ``[]`` lifts any partition. Returns
        :meth:`conditions`. Validates everything before changing anything.
        """
        if loss is not None:
            _check_loss(loss)
        if latency_ms is not None:
            _check_latency(latency_ms)
        groups: tuple[tuple[str, ...], ...] | None = None
        if not isinstance(partitions, _Keep):
            groups = _check_partitions(partitions or [])
        with self._lock:
            if loss is not None:
                self._loss = float(loss)
            if latency_ms is not None:
                self._latency_ms = float(latency_ms)
            if groups is not None:
                self._groups = groups
                self._group_of = {n: i for i, group in enumerate(groups) for n in group}
                self._topo_changed = True
                self._refresh_locked(self._clock())
            return self._conditions_locked()

    def conditions(self) -> dict[str, Any]:
        """``{"loss": float, "latency_ms": float, "partitions": [[id, ...], ...]}`` (JSON-ready)."""
        with self._lock:
            return self._conditions_locked()

    def _conditions_locked(self) -> dict[str, Any]:
        return {
            "loss": self._loss,
            "latency_ms": self._latency_ms,
            "partitions": [list(group) for group in self._groups],
        }

    def stats(self) -> dict[str, Any]:
        """Counters since creation (JSON-ready).

        ``sent`` messages accepted; ``delivered`` packets handed to a node (a broadcast counts
        once per receiver); ``lost`` per-hop radio losses (incl. a receiver gone mid-air);
        ``dropped`` packets the receiving/relaying app dropped (``drop_mesh``); ``no_route``
        messages or hops with no path; ``joins``/``leaves``; ``disconnects`` = sum of
        ``disconnects_by_node``, where a node's count goes up by one each time it loses its path
        to at least one peer that is still joined (partition, relay left); ``joined`` the joined
        node ids in rack order.
        """
        with self._lock:
            self._refresh_locked(self._clock())
            out: dict[str, Any] = dict(self._counts)
            out["disconnects"] = sum(self._disconnects.values())
            out["disconnects_by_node"] = dict(self._disconnects)
            out["joined"] = sorted(self._snap_joined, key=self._order_key)
            return out

    # ------------------------------------------------------------------ topology

    def _tick(self) -> None:
        with self._lock:
            self._refresh_locked(self._clock())

    def _order_key(self, node_id: str) -> tuple[int, str]:
        node = self._nodes.get(node_id)
        return (node.position if node is not None else 0, node_id)

    def _same_group(self, a: str, b: str) -> bool:
        return self._group_of.get(a, _UNLISTED) == self._group_of.get(b, _UNLISTED)

    def _neighbours_locked(self, node_id: str) -> list[str]:
        node = self._nodes.get(node_id)
        if node is None or node_id not in self._snap_joined:
            return []
        found = [
            other.node_id
            for other in self._nodes.values()
            if other.node_id != node_id
            and other.node_id in self._snap_joined
            and abs(other.position - node.position) <= 1
            and self._same_group(node_id, other.node_id)
        ]
        return sorted(found, key=self._order_key)

    def _path_locked(self, src: str, dst: str) -> list[str] | None:
        if src not in self._snap_joined or dst not in self._snap_joined:
            return None
        parent: dict[str, str | None] = {src: None}
        queue: deque[str] = deque([src])
        while queue:
            here = queue.popleft()
            if here == dst:
                path = [here]
                while (prev := parent[path[-1]]) is not None:
                    path.append(prev)
                return path[::-1]
            for peer in self._neighbours_locked(here):
                if peer not in parent:
                    parent[peer] = here
                    queue.append(peer)
        return None

    def _refresh_locked(self, now: float) -> None:
        joined = frozenset(n for n, node in self._nodes.items() if node.joined_at <= now)
        if joined == self._snap_joined and not self._topo_changed:
            return
        self._topo_changed = False
        previous_joined, previous_reach = self._snap_joined, self._snap_reach
        self._snap_joined = joined
        reach: dict[str, frozenset[str]] = {}
        for node_id in joined:
            if node_id in reach:
                continue
            component = self._component_locked(node_id)
            for member in component:
                reach[member] = component - {member}
        self._snap_reach = reach
        for node_id in joined & previous_joined:
            lost = (previous_reach.get(node_id, frozenset()) - reach[node_id]) & joined
            if lost:
                self._disconnects[node_id] = self._disconnects.get(node_id, 0) + 1

    def _component_locked(self, start: str) -> frozenset[str]:
        seen = {start}
        queue: deque[str] = deque([start])
        while queue:
            for peer in self._neighbours_locked(queue.popleft()):
                if peer not in seen:
                    seen.add(peer)
                    queue.append(peer)
        return frozenset(seen)


def _check_loss(loss: float) -> None:
    if not (isinstance(loss, (int, float)) and 0.0 <= loss <= 1.0):
        raise ValueError(f"loss must be a fraction within 0..1, not {loss!r}")


def _check_latency(latency_ms: float) -> None:
    if not (isinstance(latency_ms, (int, float)) and math.isfinite(latency_ms) and latency_ms >= 0):
        raise ValueError(f"latency_ms must be a finite number >= 0, not {latency_ms!r}")


def _check_partitions(partitions: Sequence[Sequence[str]]) -> tuple[tuple[str, ...], ...]:
    groups: list[tuple[str, ...]] = []
    owner: dict[str, int] = {}
    for index, group in enumerate(partitions):
        if isinstance(group, str) or not all(isinstance(n, str) for n in group):
            raise ValueError(f"partition {index} must be a list of node ids, not {group!r}")
        for node_id in group:
            if owner.setdefault(node_id, index) != index:
                raise ValueError(f"node {node_id!r} is in more than one partition group")
        groups.append(tuple(group))
    return tuple(group for group in groups if group)

"""The virtual rack's control endpoint: one JSON request per line, one answer each.

:class:`ControlOps` answers the ops of docs/virtual-rack.md (status, power, reset, lines,
unplug/plug, mesh, wire_time, efuse, shutdown) for the :class:`~pytest_hilfarm.sim.daemon.Daemon`
that inherits it; the eFuse helpers below keep a board's burned eFuses in its state file. An
answer never raises: a bad request gets ``{"ok": false, "error": ...}``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from pytest_hilfarm.description.virtual import (
    BoardSecurity,
)
from pytest_hilfarm.description.virtual import VirtualRackSpec as RackSpec
from pytest_hilfarm.errors import UsageError
from pytest_hilfarm.ota.signing import max_signature_blocks
from pytest_hilfarm.sim.boot import BootEfuse
from pytest_hilfarm.sim.efuse import burn_efuse, secure_version_bits
from pytest_hilfarm.sim.ports import Slot


class _Daemon(Protocol):
    """What the control ops use of the daemon that serves them."""

    rack: RackSpec
    medium: Any
    _lock: threading.Lock
    _slots: dict[str, Slot]
    _fresh_efuse: dict[str, BootEfuse]

    @property
    def control_address(self) -> str: ...

    def board_urls(self, slot: Slot) -> tuple[str, str]: ...

    def stop(self) -> None: ...

    def _settle_ports(self, slot: Slot, timeout: float = 2.0) -> None: ...

    def _slot(self, request: dict[str, Any]) -> Slot: ...

    def handle(self, request: dict[str, Any]) -> dict[str, Any]: ...


class ControlOps:
    """The control protocol's ops, as methods of the daemon (a role of ``Daemon``)."""

    def handle_line(self: _Daemon, line: bytes) -> dict[str, Any]:
        """Answer one control request line (JSON) with a response dict; never raises."""
        try:
            request = json.loads(line)
        except ValueError as exc:
            return _error(f"request is not JSON ({exc}); send one JSON object per line")
        if not isinstance(request, dict):
            return _error('request must be a JSON object such as {"op": "status"}')
        return self.handle(request)

    def handle(self: _Daemon, request: dict[str, Any]) -> dict[str, Any]:
        """Answer one control request (docs/virtual-rack.md); never raises."""
        op = request.get("op")
        handler = _OPS.get(op) if isinstance(op, str) else None
        if handler is None:
            return _error(f"unknown op {op!r}; known ops: {', '.join(sorted(_OPS))}")
        try:
            return handler(self, request)
        except _RequestError as exc:
            return _error(str(exc))
        except Exception as exc:  # noqa: BLE001 - the endpoint must answer, whatever happened
            return _error(f"{op} failed: {exc!r}")

    def _slot(self: _Daemon, request: dict[str, Any]) -> Slot:
        board_id = request.get("board")
        slot = self._slots.get(board_id) if isinstance(board_id, str) else None
        if slot is None:
            raise _RequestError(
                f"unknown board {board_id!r}; this rack has: {', '.join(self._slots)}"
            )
        return slot

    def _op_status(self: _Daemon, request: dict[str, Any]) -> dict[str, Any]:
        boards = []
        for slot in self._slots.values():
            st = slot.board.status()
            port, rfc = self.board_urls(slot)
            boards.append(
                {
                    "id": st.board_id,
                    "chip": st.chip,
                    "revision": st.revision,
                    "mac": st.mac,
                    "port": port,
                    "rfc2217": rfc,
                    "powered": st.powered,
                    "plugged": slot.plugged,
                    "mode": st.mode,
                    "flash_size": st.flash_size,
                    "baud": st.baud,
                    "app": st.app,
                    "client": st.client,
                    "en": st.en,
                    "io0": st.io0,
                    "wire_time": st.wire_time,
                    "rx_bytes": st.rx_bytes,
                    "tx_bytes": st.tx_bytes,
                    "wire_seconds": round(st.wire_seconds, 6),
                    "features": list(slot.spec.features),
                }
            )
        return {"ok": True, "control": self.control_address, "rack": self.rack.source,
                "boards": boards}

    def _op_power(self: _Daemon, request: dict[str, Any]) -> dict[str, Any]:
        slot = self._slot(request)
        on = _flag(request, "on")
        if on and not slot.plugged:
            raise _RequestError(f"board {slot.spec.id} is unplugged; plug it in first")
        self._settle_ports(slot)
        slot.board.power(on)
        return {"ok": True, "board": slot.spec.id, "powered": on}

    def _op_reset(self: _Daemon, request: dict[str, Any]) -> dict[str, Any]:
        slot = self._slot(request)
        boot = request.get("boot", "flash")
        if boot not in ("flash", "download"):
            raise _RequestError(f"boot must be 'flash' or 'download', not {boot!r}")
        if not slot.board.status().powered:
            raise _RequestError(f"board {slot.spec.id} is powered off; power it on first")
        self._settle_ports(slot)
        slot.board.reset(boot)
        return {"ok": True, "board": slot.spec.id, "mode": slot.board.status().mode}

    def _op_lines(self: _Daemon, request: dict[str, Any]) -> dict[str, Any]:
        slot = self._slot(request)
        en = _flag(request, "en") if "en" in request else None
        io0 = _flag(request, "io0") if "io0" in request else None
        self._settle_ports(slot)
        slot.board.set_lines(en=en, io0=io0)
        st = slot.board.status()
        return {"ok": True, "board": slot.spec.id, "en": st.en, "io0": st.io0, "mode": st.mode}

    def _op_unplug(self: _Daemon, request: dict[str, Any]) -> dict[str, Any]:
        slot = self._slot(request)
        with self._lock:
            slot.plugged = False
            client, slot.client = slot.client, None
        if client is not None:
            slot.board.detach(client)
            client.close()
        # A DevKit is powered through its USB cable: unplugged means unpowered.
        slot.board.power(False)
        return {"ok": True, "board": slot.spec.id, "plugged": False}

    def _op_plug(self: _Daemon, request: dict[str, Any]) -> dict[str, Any]:
        slot = self._slot(request)
        with self._lock:
            slot.plugged = True
        slot.board.power(True)
        return {"ok": True, "board": slot.spec.id, "plugged": True}

    def _op_mesh(self: _Daemon, request: dict[str, Any]) -> dict[str, Any]:
        changes: dict[str, Any] = {}
        if "loss" in request:
            loss = request["loss"]
            if not isinstance(loss, (int, float)) or isinstance(loss, bool) or not 0 <= loss <= 1:
                raise _RequestError(f"loss must be a number from 0 to 1, not {loss!r}")
            changes["loss"] = float(loss)
        if "latency_ms" in request:
            latency = request["latency_ms"]
            if not isinstance(latency, (int, float)) or isinstance(latency, bool) or latency < 0:
                raise _RequestError(f"latency_ms must be a number >= 0, not {latency!r}")
            changes["latency_ms"] = float(latency)
        if "partitions" in request:
            parts = request["partitions"]
            if not isinstance(parts, list) or not all(
                isinstance(group, list) and all(isinstance(b, str) for b in group)
                for group in parts
            ):
                raise _RequestError(
                    'partitions must be a list of lists of board ids, e.g. [["a"], ["b", "c"]]'
                )
            unknown = sorted({b for group in parts for b in group} - set(self._slots))
            if unknown:
                raise _RequestError(
                    f"partitions name unknown boards {unknown}; this rack has: "
                    f"{', '.join(self._slots)}"
                )
            changes["partitions"] = [list(group) for group in parts]
        if changes:
            self.medium.configure(**changes)
        return {"ok": True, **_jsonable(self.medium.conditions())}

    def _op_wire_time(self: _Daemon, request: dict[str, Any]) -> dict[str, Any]:
        enabled = _flag(request, "enabled")
        slots = [self._slot(request)] if "board" in request else list(self._slots.values())
        for slot in slots:
            slot.board.set_wire_time(enabled)
        return {"ok": True, "wire_time": enabled, "boards": [s.spec.id for s in slots]}

    def _op_efuse(self: _Daemon, request: dict[str, Any]) -> dict[str, Any]:
        slot = self._slot(request)
        board = slot.board
        burn = request.get("burn")
        if request.get("new_chip") is True:
            # Simulator only: a board with a fresh chip (a replaced module), eFuses as the rack
            # file burns them at start. Real eFuses cannot be reset; this is how a shared
            # virtual rack gets a board back after a test burned its eFuses.
            board.replace_chip(self._fresh_efuse.get(slot.spec.id, BootEfuse()))
        elif burn is not None:
            if not isinstance(burn, dict) or not burn:
                raise _RequestError(
                    'burn must be an object such as {"key_digest": HEX}, {"secure_version": N}, '
                    '{"secure_boot": true}, {"anti_rollback": true} or {"signed_apps": true}')
            unknown = sorted(set(burn) - set(_BURN_KEYS))
            if unknown:
                raise _RequestError(f"cannot burn {unknown}; burnable: {', '.join(_BURN_KEYS)}")
            kwargs: dict[str, Any] = {}
            if "key_digest" in burn:
                text = str(burn["key_digest"]).replace(":", "").replace(" ", "").lower()
                try:
                    digest = bytes.fromhex(text)
                except ValueError:
                    digest = b""
                if len(digest) != 32:
                    raise _RequestError(
                        f"key_digest {burn['key_digest']!r} is not 64 hex digits "
                        "(get one with `hilfarm ota digest KEY`)")
                kwargs["key_digest"] = digest
            if "secure_version" in burn:
                version = burn["secure_version"]
                if not isinstance(version, int) or isinstance(version, bool):
                    raise _RequestError(f"secure_version must be a whole number, not {version!r}")
                kwargs["secure_version"] = version
            for key, arg in (("secure_boot", "secure_boot"), ("anti_rollback", "anti_rollback"),
                             ("signed_apps", "signed_apps")):
                if key in burn:
                    if burn[key] is not True:
                        raise _RequestError(
                            f"{key} can only be burned to true (eFuse bits only go from 0 to 1)")
                    kwargs[arg] = True
            try:
                board.burn_efuse(**kwargs)
            except UsageError as exc:
                raise _RequestError(f"board {slot.spec.id}: {exc.what}"
                                    + (f" ({exc.hint})" if exc.hint else "")) from None
        return {"ok": True, "board": slot.spec.id, **efuse_report(board.efuse, slot.spec.chip)}

    def _op_shutdown(self: _Daemon, request: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, "shutdown": True}


class _RequestError(Exception):
    """A control request that cannot be carried out as asked (answered with ok=false)."""


def _error(message: str) -> dict[str, Any]:
    return {"ok": False, "error": message}


def _flag(request: dict[str, Any], key: str) -> bool:
    value = request.get(key)
    if not isinstance(value, bool):
        raise _RequestError(f"{key!r} must be true or false, not {value!r}")
    return value


def _jsonable(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        return {"conditions": value}
    return dict(json.loads(json.dumps(value, default=list)))


_OPS: dict[str, Callable[[Any, dict[str, Any]], dict[str, Any]]] = {
    "status": ControlOps._op_status,
    "power": ControlOps._op_power,
    "reset": ControlOps._op_reset,
    "lines": ControlOps._op_lines,
    "unplug": ControlOps._op_unplug,
    "plug": ControlOps._op_plug,
    "mesh": ControlOps._op_mesh,
    "wire_time": ControlOps._op_wire_time,
    "efuse": ControlOps._op_efuse,
    "shutdown": ControlOps._op_shutdown,
}


_BURN_KEYS = ("key_digest", "secure_version", "secure_boot", "anti_rollback", "signed_apps")


def efuse_report(efuse: BootEfuse, chip: str) -> dict[str, Any]:
    """The ``efuse`` op's answer: the eFuse record plus the chip's limits."""
    return {
        "chip": chip,
        "efuse": efuse_to_json(efuse),
        "key_digest_slots": max_signature_blocks(chip),
        "secure_version_bits": secure_version_bits(chip),
    }


def burn_security(efuse: BootEfuse, chip: str, security: BoardSecurity) -> BootEfuse:
    """Burn a rack file's ``sim:`` onto ``efuse`` (only upwards; what is burned stays)."""
    out = efuse
    for digest in security.key_digests:
        out = burn_efuse(out, chip, key_digest=digest)
    if security.secure_version is not None and security.secure_version > out.secure_version:
        out = burn_efuse(out, chip, secure_version=security.secure_version)
    return burn_efuse(out, chip, secure_boot=bool(security.secure_boot),
                      anti_rollback=bool(security.anti_rollback),
                      signed_apps=bool(security.signed_apps))


EFUSE_KEYS = tuple(f.name for f in dataclasses.fields(BootEfuse))


def efuse_from_json(value: Any) -> BootEfuse:
    if value is None:
        return BootEfuse()
    if not isinstance(value, dict):
        raise TypeError("expected an object")
    unknown = set(value) - set(EFUSE_KEYS)
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)}")
    fields = dict(value)
    if "key_digests" in fields:
        fields["key_digests"] = tuple(bytes.fromhex(d) for d in fields["key_digests"])
    return BootEfuse(**fields)


def efuse_to_json(efuse: BootEfuse) -> dict[str, Any]:
    data = dataclasses.asdict(efuse)
    data["key_digests"] = [d.hex() for d in efuse.key_digests]
    return data


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)

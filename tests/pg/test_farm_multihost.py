"""A client farm on one host uses boards that rig hosts export, through the database."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_righost import TOKEN, _start_rig

from pytest_hilfarm.farm import Farm
from pytest_hilfarm.sim.appbuild import write_build_dir

pytest.importorskip("psycopg")


def test_client_reserves_flashes_and_talks_to_a_remote_board(
        pg_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = pg_server.new_database()
    rig = _start_rig(tmp_path, url, "rig-m", [("m-esp32-1", "esp32")])
    try:
        monkeypatch.setenv("HILFARM_RIG_TOKEN", TOKEN)
        client_rack = tmp_path / "client.yaml"
        client_rack.write_text(
            f"version: 1\nname: client\nbackend: {url}\n"
            f"state_dir: {tmp_path / 'client-state'}\nboards: []\n")
        fw = write_build_dir(tmp_path / "fw", "esp32", "remote-demo", "7.0.0").path
        with Farm.open(client_rack, log_root=tmp_path / "logs") as farm:
            assert [b.id for b in farm.boards] == ["m-esp32-1"]
            rows = {r["board"]: r for r in farm.status()}
            assert rows["m-esp32-1"]["host"] == "rig-m" and rows["m-esp32-1"]["online"]
            with farm.session(1, chip="esp32", firmware=fw) as s:
                dev = s.devices[0]
                assert dev.port.startswith("rfc2217://")
                assert s.boards[0].report is not None and s.boards[0].report.written
                assert dev.boot_info().app_version == "7.0.0"
                assert "project: remote-demo" in dev.command("version", timeout=15)
            # Unchanged firmware the second time: nothing is sent to the rig host.
            with farm.session(1, chip="esp32", firmware=fw) as s:
                assert s.boards[0].report is None
            history = farm.store.history(board="m-esp32-1")
            assert history and all(r.outcome == "ok" for r in history[:2])
    finally:
        rig.proc.terminate()
        rig.proc.wait(10)
        from pytest_hilfarm.sim import manager

        manager.down(rig.sim_dir)

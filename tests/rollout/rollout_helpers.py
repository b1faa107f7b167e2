"""Helpers for the rollout tests: the example plan and synthetic telemetry files."""

from __future__ import annotations

import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_PLAN = ROOT / "examples" / "rollout" / "plan.yaml"
EXAMPLE_MANIFEST = ROOT / "examples" / "rollout" / "manifest.json"
T0 = "2026-03-01T00:00:00Z"
# A two-ring plan with the exposure definitions and the seed's hard triggers.
SEQ_PLAN = """\
name: fw
artifact: {previous_version: 2.3.1}
gates:
  crash_rate: {max: 0.001, per: device_hour, detect: 0.005, on_fail: rollback}
  connectivity: {min: 0.9, per: device_hour, on_fail: pause}
  boot_failures: {max: 0, per: attempt, on_fail: rollback}
  battery_drain: false
rings:
  - {name: canary, percent: 10, soak: 2h}
  - {name: fleet, percent: 100, soak: 2h}
"""


def write_telemetry(path: Path, candidate: int, baseline: int, *, version: str = "2.4.0",
                    old: str = "2.3.1", crashes: int = 0, seed: int = 7) -> Path:
    """A JSON-lines file: ``candidate`` devices on ``version``, ``baseline`` on ``old``."""
    rng = random.Random(seed)
    with path.open("w") as fh:
        for i in range(candidate + baseline):
            on = i < candidate
            fh.write(json.dumps({
                "device_id": f"dev-{i:06d}", "firmware": version if on else old,
                "boots": 1, "crashes": 1 if on and i < crashes else 0,
                "connected_ratio": 0.99, "battery_drain": round(rng.gauss(20, 1), 3),
                "rollbacks": 0,
            }) + "\n")
    return path

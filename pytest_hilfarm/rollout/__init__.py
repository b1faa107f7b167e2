"""Staged rollouts: plans, gates, a persistent controller, telemetry, a fleet simulator, exporters.

The package decides *whether* a ring may grow; it never talks to devices or to an OTA platform
itself. Platforms are reached through exported configurations (:mod:`.exporters`), so the same
plan can be dry-run in the fleet simulator and handed to AWS IoT Jobs, hawkBit or Mender.
It imports nothing of the farm, the plugin or the virtual rack.
"""

"""pytest-hilfarm: a pytest plugin and HIL test farm for ESP32-family boards.

The farm reserves boards exclusively, brings them to a known state, flashes candidate firmware and
hands tests device handles. ``pytest_hilfarm.sim`` is a virtual rack that the real esptool flashes.
"""

__version__ = "0.1.0"

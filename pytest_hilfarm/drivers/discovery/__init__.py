"""Discovery: find a rig's USB serial adapters, probe their chips, map hub ports, write the rack.

``udev`` lists adapters (pyudev) and probes a free one (esptool's chip detection), ``powermap``
finds which hub port powers which adapter (uhubctl), ``rackwrite`` turns what was found into rack
file entries. It never probes or switches a reserved board.
"""

"""Drivers: what acts on a board or its surroundings (ports, flashing, power, reset, discovery,
network).

Each driver implements a small protocol and takes plain values (port URLs, chip names, options);
none reads rack files beyond the records it is handed, and none knows about the farm.
"""

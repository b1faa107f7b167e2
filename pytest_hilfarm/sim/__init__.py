"""The virtual rack: simulated ESP32 / ESP32-S2 / ESP32-C3 boards.

Boards speak the real ESP serial bootloader protocol over ``socket://`` and ``rfc2217://`` ports,
keep their flash in files and boot what was flashed. This package never imports the farm core;
the core reaches it only through port URLs and the control endpoint.
"""

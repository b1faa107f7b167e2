"""ESP facts and formats, the ground floor every layer may import.

The chip table, app and bootloader images, partition tables, otadata and flash sizes. Only the
standard library, esptool's image helpers and the shared error types: no I/O on boards, no rack,
no farm.
"""

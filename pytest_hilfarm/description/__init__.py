"""Description: what the rack and the settings say, parsed into frozen records.

The rack file (``rack``: the farm's checked loader; ``virtual``: the virtual rack's view of the
same file; ``network``: its network conditions and profiles) and the settings precedence
(``settings``). It describes; it never acts on a board.
"""

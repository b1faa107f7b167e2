"""Description: what the rack and the settings say, parsed once into frozen records.

The rack file (one parser for every reader: farm, virtual rack, network conditions, discovery),
the settings precedence and the rack writer. It describes; it never acts on a board.
"""

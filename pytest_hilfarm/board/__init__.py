"""The board: the Device handle a test gets, its console, and the wiring of a rack board.

``wiring`` is the one place that turns a rack board into its port, console opener, power, reset
and flasher (a board on this host, one a rig host exports, or a board of the virtual rack);
``device`` and ``console`` act on a board through what the wiring gives them; ``protocol`` holds
the console protocol's patterns. Nothing here reserves boards or keeps their health.
"""

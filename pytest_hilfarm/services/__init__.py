"""Services: long-running hosts above the farm (the rig host; later a dashboard) and their wiring.

A service may use the farm, the board wiring, the drivers, the description and the ESP floor; the
farm never imports a service: it reaches a remote board only through the board wiring.
"""

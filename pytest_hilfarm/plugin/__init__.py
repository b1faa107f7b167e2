"""The pytest glue: options, the ``hil`` marker, fixtures, hooks and reports.

``core`` is the main plugin (registered as the ``hilfarm`` pytest11 entry point), ``network``
the network-conditions fixtures (``hilfarm_network``), ``ota`` the OTA server fixture
(``hilfarm_ota``), ``hookspecs`` the hooks a conftest or plugin may implement. Everything that
touches boards goes through the farm; nothing below imports this package.
"""

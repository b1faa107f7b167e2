"""``python -m pytest_hilfarm`` runs the ``hilfarm`` command line."""

import sys

from pytest_hilfarm.cli import main

sys.exit(main())

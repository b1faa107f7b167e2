"""The ``hilfarm`` command line.

Each subcommand group lives in its own module and exposes ``register(subparsers)``; this module
only assembles them. The command line never imports the pytest plugin.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from pytest_hilfarm import __version__
from pytest_hilfarm.errors import HilfarmError

# Modules that contribute subcommands; each has register(subparsers). Missing ones are skipped so
# a partial install still gives a working command line.
_GROUPS = (
    "pytest_hilfarm.cli.sim",
    "pytest_hilfarm.cli.farm",
    "pytest_hilfarm.cli.ota",
    "pytest_hilfarm.cli.rollout",
    "pytest_hilfarm.cli.discover",
    "pytest_hilfarm.cli.net",
    "pytest_hilfarm.cli.export",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hilfarm",
        description="HIL test farm for ESP32-family boards (and its virtual rack).",
    )
    parser.add_argument("--version", action="version", version=f"hilfarm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _GROUPS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return int(handler(args) or 0)
    except HilfarmError as exc:
        print(f"hilfarm: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

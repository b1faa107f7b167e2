"""The ``hilfarm`` command line.

Each subcommand group lives in its own module and exposes ``register(subparsers)``; this module
only assembles them and turns errors into the exit codes of :mod:`pytest_hilfarm.cli.common`
(the README's table). The command line never imports the pytest plugin.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Iterator, Sequence

from pytest_hilfarm import __version__
from pytest_hilfarm.cli.common import (
    INTERRUPTED,
    USAGE,
    HelpFormatter,
    exit_code_epilog,
    exit_code_for,
)
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
    "pytest_hilfarm.cli.service",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hilfarm",
        description="HIL test farm for ESP32-family boards (and its virtual rack).",
        epilog=exit_code_epilog(),
        formatter_class=HelpFormatter,
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
    for _, each in walk_parsers(parser):
        each.formatter_class = HelpFormatter
    return parser


def walk_parsers(parser: argparse.ArgumentParser,
                 path: tuple[str, ...] = ("hilfarm",)
                 ) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every parser of the command line with its command path, the top one first."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            seen: set[int] = set()
            for name, child in action.choices.items():
                if id(child) not in seen:  # an alias names the same parser again
                    seen.add(id(child))
                    yield from walk_parsers(child, (*path, name))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return USAGE
    try:
        return int(handler(args) or 0)
    except HilfarmError as exc:
        print(f"hilfarm: error: {exc}", file=sys.stderr)
        return exit_code_for(exc)
    except KeyboardInterrupt:
        print("hilfarm: interrupted", file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

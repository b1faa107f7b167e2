"""What every ``hilfarm`` subcommand shares: exit codes, the help layout, examples in the help.

The exit-code table here is the one the README's "Command line" section shows; ``hilfarm
--help`` prints it. Nothing here does farm work or prints anything itself.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable

from pytest_hilfarm.errors import (
    ConfigError,
    FlashError,
    HilfarmError,
    InfrastructureError,
    UsageError,
)

OK = 0
NEGATIVE = 1  # the command ran and its result is negative (a check, a verify or a flash failed)
USAGE = 2  # bad argument, bad rack/plan/config file (argparse exits with 2 too)
INFRASTRUCTURE = 3  # the rig failed: board unreachable, port gone, reservation timeout
PAUSED = 10  # a rollout waits for a person
ROLLED_BACK = 11  # a rollout was rolled back or aborted
INTERRUPTED = 130  # Ctrl-C

EXIT_CODES: tuple[tuple[int, str], ...] = (
    (OK, "success (for rollouts: completed, or progressing normally)"),
    (NEGATIVE, "the command ran and its result is negative: a health check, a verify or a "
               "flash failed"),
    (USAGE, "usage or configuration error (bad argument, bad rack/plan/config file), "
            "argparse's own usage errors too"),
    (INFRASTRUCTURE, "rig / infrastructure error (board unreachable, port gone, reservation "
                     "timeout)"),
    (PAUSED, "rollout paused (waits for a person)"),
    (ROLLED_BACK, "rollout rolled back or aborted"),
    (INTERRUPTED, "interrupted (Ctrl-C)"),
)


def exit_code_for(exc: BaseException) -> int:
    """The exit code for an error that ended a command (see :data:`EXIT_CODES`)."""
    if isinstance(exc, KeyboardInterrupt):
        return INTERRUPTED
    if isinstance(exc, (ConfigError, UsageError)):
        return USAGE
    if isinstance(exc, InfrastructureError):
        return INFRASTRUCTURE
    return NEGATIVE


def flash_exit_code(exc: HilfarmError) -> int:
    """As :func:`exit_code_for`, but a flash that was written and failed is a negative result."""
    return NEGATIVE if isinstance(exc, FlashError) else exit_code_for(exc)


def worst(codes: Iterable[int]) -> int:
    """One exit code for several outcomes: a usage error first, then the rig, then a failure."""
    found = set(codes)
    for code in (USAGE, INFRASTRUCTURE, NEGATIVE):
        if code in found:
            return code
    return OK


def exit_code_epilog() -> str:
    rows = "\n".join(f"  {code:>3}  {meaning}" for code, meaning in EXIT_CODES)
    return ("exit codes (the README's \"Command line\" section has the same table):\n"
            f"{rows}\n\n"
            "Each command's --help ends with an example: hilfarm COMMAND --help")


def example(*lines: str) -> str:
    """A subcommand help's epilog: the examples the help ends with."""
    return "example:\n" + "\n".join(f"  {line}" for line in lines)


class HelpFormatter(argparse.HelpFormatter):
    """Keeps examples and tables as written and shows each option's default where it has one."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:  # laid out by hand (examples, tables): keep its lines
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if ("%(default)" in text or "default" in text.lower() or default is None
                or default is False or default in ([], "") or default is argparse.SUPPRESS
                or action.help is argparse.SUPPRESS):
            return action.help
        if not action.option_strings and action.nargs not in ("?", "*"):
            return action.help
        return f"{text} (default: %(default)s)"

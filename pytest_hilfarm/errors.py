"""Error types shared by every layer.

Each error says what was wrong, where, and what to do. Infrastructure errors (a rig problem, not a
firmware problem) derive from :class:`InfrastructureError`, so the plugin reports them as setup
errors and marks the board UNKNOWN instead of failing the test.
"""

from __future__ import annotations


class HilfarmError(Exception):
    """Base class of every error this package raises on purpose."""

    def __init__(self, what: str, *, where: str | None = None, hint: str | None = None) -> None:
        self.what = what
        self.where = where
        self.hint = hint
        super().__init__(self._compose())

    def _compose(self) -> str:
        text = f"{self.where}: {self.what}" if self.where else self.what
        if self.hint:
            text += f"\n  -> {self.hint}"
        return text


class ConfigError(HilfarmError):
    """A rack file, option, ini key, environment variable or marker holds a bad value."""


class UsageError(HilfarmError):
    """The caller asked for something that cannot be done as asked (not a rig fault)."""


class InfrastructureError(HilfarmError):
    """The rig failed (port vanished, flash failed, no boot banner): not the firmware's fault."""


class ReservationTimeout(InfrastructureError):
    """Boards could not be reserved within the timeout."""


class FlashError(InfrastructureError):
    """Writing or verifying flash failed."""


class ImageError(UsageError):
    """A firmware image is malformed or does not fit the board (wrong chip, too big)."""


class PortError(InfrastructureError):
    """A serial port could not be found, opened, or vanished."""


class BootError(InfrastructureError):
    """A board did not boot as expected (no banner, boot loop)."""


class ConsoleTimeout(HilfarmError):
    """An expected pattern did not appear on a console in time (a test-level failure)."""


class CommandError(HilfarmError):
    """A console command's reply says it failed (a test-level failure, not a rig fault).

    Raised by :meth:`pytest_hilfarm.board.device.Device.command` for a reply line that starts with
    ``error:`` (the demo app's convention) or is one of ESP-IDF console REPL's own failure lines
    (``Unrecognized command``, ``Command returned non-zero error code: ...``, ``Internal error:
    ...``). ``command``, ``reply`` and ``board`` say which command, what came back and where.
    """

    def __init__(self, what: str, *, command: str, reply: str, board: str,
                 where: str | None = None, hint: str | None = None) -> None:
        self.command = command
        self.reply = reply
        self.board = board
        super().__init__(what, where=where, hint=hint)


class SignatureError(HilfarmError):
    """A signature, signed image or signed manifest did not verify."""

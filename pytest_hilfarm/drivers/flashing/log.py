"""esptool's console output, routed per flash: to a logger and a short tail for error messages.

esptool keeps one process-wide logger (esp-pylib's ``EspLog``); flashes run in parallel threads,
so a router installed in front of it sends each thread's output, by a context variable, to that
flash's :class:`EsptoolOutput` (the ``pytest_hilfarm.esptool`` logger, the lines a FlashError
quotes, and progress callbacks). Output outside a flash goes to esptool's own logger as before.
This module only routes text: it never talks to a board.
"""

from __future__ import annotations

import collections
import contextvars
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pytest_hilfarm.drivers.flashing.plan import Region

esptool_log = logging.getLogger("pytest_hilfarm.esptool")


class EsptoolOutput:
    """Where esptool's output goes while one flash runs in this thread."""

    def __init__(self, label: str, echo: bool) -> None:
        self.label = label
        self.echo = echo
        self.lines: collections.deque[str] = collections.deque(maxlen=60)
        self.on_progress: Callable[[int, int], None] | None = None
        self.region: Region | None = None  # the region being checked or written, for errors

    def text(self, message: str, level: int = logging.DEBUG) -> None:
        for line in message.splitlines() or [""]:
            if line.strip():
                self.lines.append(line)
        esptool_log.log(logging.INFO if self.echo else level, "%s: %s", self.label, message)


_SESSION: contextvars.ContextVar[EsptoolOutput | None] = contextvars.ContextVar(
    "hilfarm_flash_session", default=None
)
_INSTALL_LOCK = threading.Lock()


def _render(args: tuple[Any, ...]) -> str:
    return " ".join(str(a) for a in args)


def _make_router(previous: Any) -> Any:
    from esp_pylib.logger import EspLogBase

    class _Router(EspLogBase):
        """esptool's logger while hilfarm is loaded: per-thread capture, else the old logger.

        esptool keeps one process-wide logger; flashes run in parallel threads, so each thread's
        output is routed by a context variable to its own session instead of a shared sink.
        """

        hilfarm_router = True

        def __init__(self, fallback: Any) -> None:
            self._fallback = fallback

        def _session(self) -> EsptoolOutput | None:
            return _SESSION.get()

        def print(self, *args: Any, **kwargs: Any) -> None:
            session = self._session()
            if session is None:
                self._fallback.print(*args, **kwargs)
            else:
                session.text(_render(args))

        def err(self, *args: Any, suggestion: str | None = None) -> None:
            session = self._session()
            if session is None:
                self._fallback.err(*args, suggestion=suggestion)
            else:
                session.text("Error: " + _render(args), logging.WARNING)

        def warn(self, *args: Any, suggestion: str | None = None) -> None:
            session = self._session()
            if session is None:
                self._fallback.warn(*args, suggestion=suggestion)
            else:
                session.text("Warning: " + _render(args))

        def warning(self, message: str, suggestion: str | None = None) -> None:
            self.warn(message, suggestion=suggestion)

        def error(self, message: str, suggestion: str | None = None) -> None:
            self.err(message, suggestion=suggestion)

        def note(self, *args: Any) -> None:
            session = self._session()
            if session is None:
                self._fallback.note(*args)
            else:
                session.text("Note: " + _render(args))

        def hint(self, *args: Any) -> None:
            session = self._session()
            if session is None:
                self._fallback.hint(*args)
            else:
                session.text("Hint: " + _render(args))

        def debug(self, *args: Any) -> None:
            session = self._session()
            if session is None:
                self._fallback.debug(*args)
            else:
                session.text(_render(args))

        def stage(self, finish: bool = False) -> None:
            if self._session() is None:
                self._fallback.stage(finish=finish)

        def set_verbosity(self, mode: int | str) -> None:
            self._fallback.set_verbosity(mode)

        def progress_bar(
            self,
            cur_iter: int,
            total_iters: int,
            prefix: str = "",
            suffix: str = "",
            bar_length: int = 30,
        ) -> None:
            session = self._session()
            if session is None:
                self._fallback.progress_bar(cur_iter, total_iters, prefix, suffix, bar_length)
            elif session.on_progress is not None:
                session.on_progress(cur_iter, total_iters)

        def __getattr__(self, name: str) -> Any:
            return getattr(self._fallback, name)

    return _Router(previous)


def install_router() -> None:
    """Put the routing logger in front of esptool's (once per process; idempotent)."""
    import esptool  # noqa: F401  (installs esptool's own logger first)
    from esp_pylib.logger import EspLog

    with _INSTALL_LOCK:
        current = EspLog.instance
        if getattr(current, "hilfarm_router", False):
            return
        if current is None:
            current = EspLog()
        EspLog.set_logger(_make_router(current))


@contextmanager
def capture(label: str, echo: bool) -> Iterator[EsptoolOutput]:
    install_router()
    session = EsptoolOutput(label, echo)
    token = _SESSION.set(session)
    try:
        yield session
    finally:
        _SESSION.reset(token)

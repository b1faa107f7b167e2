"""A board's serial console: one reader thread feeding a timestamped log file and an expect buffer.

The reader writes every byte it reads to both the log (each line prefixed with
``[HH:MM:SS.mmm] ``) and the buffer that ``expect`` searches, so the log a person reads and the
text a test matched are the same bytes. The reader survives the port vanishing and returning
(reopening through ``open_port_fn``, which may re-resolve a USB path) and releases the port on
``pause()`` so esptool can open it. Harness markers (``--- port lost ---``, ``--- port back
---``, pause/resume) go to the log only, never to the buffer. This module must not know about
boards, flashing or reset lines.
"""

from __future__ import annotations

import codecs
import re
import socket
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Protocol

from pytest_hilfarm.errors import ConsoleTimeout, PortError

# ESP-IDF console prompts look like "esp32> " or "myproject> "; a bare "> " also counts.
DEFAULT_PROMPT = r"(?m)(?:^|\r)[\w.\-]*> ?(?=\r?$)"
TAIL_LINES = 20


class SerialLike(Protocol):
    """What the console needs from a port object (pyserial's Serial, or a test stand-in)."""

    timeout: float | None

    def read(self, size: int = 1) -> bytes: ...

    def write(self, data: bytes, /) -> int | None: ...

    def close(self) -> None: ...

    @property
    def in_waiting(self) -> int: ...


OpenPort = Callable[[], Any]

_PatternLike = str | re.Pattern[str]


def _timestamp() -> str:
    now = datetime.now()
    return now.strftime("[%H:%M:%S.") + f"{now.microsecond // 1000:03d}] "


class Console:
    """The console of one board: reader thread, log file and expect buffer.

    ``open_port_fn`` returns an open port with a short read timeout (transports.open_port's
    default 50 ms); it is called again whenever the port must be reopened. Construction opens
    the port once synchronously, so a board that is not there fails fast with PortError.
    """

    def __init__(
        self,
        open_port_fn: OpenPort,
        log_path: Path | str,
        *,
        name: str = "console",
        max_buffer: int = 4 * 1024 * 1024,
        backoff: tuple[float, float] = (0.05, 1.0),
        connect: bool = True,
    ) -> None:
        self.name = name
        self._open_port_fn = open_port_fn
        self._log_path = Path(log_path)
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log: IO[str] = open(self._log_path, "a", encoding="utf-8", newline="")  # noqa: SIM115
        self._max_buffer = max_buffer
        self._backoff = backoff
        self._cond = threading.Condition()
        self._buf = ""
        self._base = 0  # absolute offset of self._buf[0]
        self._pos = 0  # absolute offset up to which expect has consumed
        self._at_line_start = True
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._port: Any = None
        self._pause_requested = False
        self._paused = False
        self._closing = False
        self._lost = False
        self.lost_count = 0
        if connect:
            try:
                self._port = self._open()
            except BaseException:
                self._log.close()
                raise
        self._thread = threading.Thread(target=self._run, name=f"console-{name}", daemon=True)
        self._thread.start()

    # -- public API ---------------------------------------------------------------------------

    @property
    def log_path(self) -> Path:
        return self._log_path

    @property
    def connected(self) -> bool:
        with self._cond:
            return self._port is not None

    @property
    def port(self) -> Any:
        """The open port object (for DTR/RTS resets); PortError while paused or lost."""
        with self._cond:
            if self._port is None:
                raise PortError(
                    "the console port is not open (paused for flashing, or lost)",
                    where=self.name,
                    hint="resume the console, or wait for the port to come back",
                )
            return self._port

    def expect(self, pattern: _PatternLike, timeout: float = 10.0) -> re.Match[str]:
        """Wait for ``pattern`` (a regex) in the unread output; consume up to the match's end."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        return self._wait_for(regex, timeout, None, shown=f"pattern {regex.pattern!r}")

    def expect_exact(self, text: str, timeout: float = 10.0) -> re.Match[str]:
        """Wait for the literal ``text`` in the unread output; consume up to its end."""
        return self._wait_for(re.compile(re.escape(text)), timeout, None, shown=f"text {text!r}")

    def write(self, data: str | bytes, *, wait_port: float = 2.0) -> None:
        """Send text (UTF-8) or bytes to the board. Waits briefly for a lost port to return."""
        raw = data.encode("utf-8") if isinstance(data, str) else data
        deadline = time.monotonic() + wait_port
        with self._cond:
            while self._port is None and not self._pause_requested and not self._closing:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            port = self._port
            if port is None:
                state = "paused (flashing)" if self._pause_requested else "lost"
                raise PortError(
                    f"cannot write to the console: the port is {state}",
                    where=self.name,
                    hint="wait for flashing to finish, or check that the board is connected "
                    f"(log: {self._log_path})",
                )
        try:
            port.write(raw)
            flush = getattr(port, "flush", None)
            if flush is not None:
                flush()
        except Exception as exc:  # pyserial raises SerialException, OSError or TypeError here
            raise PortError(
                f"writing to the console failed: {exc}",
                where=self.name,
                hint=f"the port vanished; see the log {self._log_path}",
            ) from exc

    def command(
        self,
        cmd: str,
        timeout: float = 5.0,
        prompt: _PatternLike = DEFAULT_PROMPT,
        *,
        newline: str = "\n",
    ) -> str:
        """Send ``cmd`` + newline and return the reply: the text between its echo and the prompt.

        The reply has CRLF turned into LF and no leading/trailing blank lines. The echo is
        removed when the board echoes (ESP-IDF's console does); a board that does not echo works
        too.
        """
        regex = re.compile(prompt) if isinstance(prompt, str) else prompt
        with self._cond:
            start = self._base + len(self._buf)
        self.write(cmd + newline)
        shown = f"the prompt {regex.pattern!r} after command {cmd!r}"
        match = self._wait_for(regex, timeout, start, shown=shown)
        with self._cond:
            reply = self._buf[start - self._base : match.start()] if start >= self._base else ""
        reply = reply.replace("\r\n", "\n").replace("\r", "")
        stripped = reply.lstrip("\n")
        if stripped.startswith(cmd):
            reply = stripped[len(cmd) :]
        return reply.strip("\n")

    def clear(self) -> None:
        """Forget all output received so far: the next expect only sees newer text."""
        with self._cond:
            self._pos = self._base + len(self._buf)

    @property
    def position(self) -> int:
        """Where the next expect starts (after what earlier expects consumed)."""
        with self._cond:
            return self._pos

    def mark(self) -> int:
        """Return a position in the stream; ``text_since(mark)`` returns what arrived after."""
        with self._cond:
            return self._base + len(self._buf)

    def text_since(self, mark: int = 0) -> str:
        """Return the retained output from ``mark`` on (all retained output for 0)."""
        with self._cond:
            return self._buf[max(mark - self._base, 0) :]

    def window(self, mark: int = 0) -> tuple[int, str]:
        """Like ``text_since`` but also return the absolute position where the text starts."""
        with self._cond:
            start = max(mark, self._base)
            return start, self._buf[start - self._base :]

    def seek(self, position: int) -> None:
        """Make the next expect start at an absolute position (from ``mark``/``window``)."""
        with self._cond:
            self._pos = min(max(position, self._base), self._base + len(self._buf))

    def tail(self, lines: int = TAIL_LINES) -> str:
        """The last ``lines`` lines of output (CR removed), for error messages."""
        with self._cond:
            text = self._buf[-64 * 1024 :]
        parts = text.replace("\r", "").split("\n")
        if parts and parts[-1] == "":
            parts.pop()  # a final newline does not start another line worth showing
        return "\n".join(parts[-lines:])

    def pause(self, timeout: float = 5.0) -> None:
        """Close the port so another program (esptool) can open it; returns once it is closed."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._pause_requested = True
            self._cond.notify_all()
            self._interrupt_reader()
            while not self._paused and self._thread.is_alive():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PortError(
                        f"the console reader did not release the port within {timeout:g} s",
                        where=self.name,
                        hint="the port's read timeout may be too long; open it with a short "
                        "timeout (transports.open_port does)",
                    )
                self._cond.wait(left)

    def resume(self, timeout: float = 10.0) -> None:
        """Reopen the port after ``pause()``; returns once the reader has it open again."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._pause_requested = False
            self._cond.notify_all()
            while self._port is None and self._thread.is_alive():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PortError(
                        f"the console port did not reopen within {timeout:g} s after flashing",
                        where=self.name,
                        hint=f"check that the board is still connected; log: {self._log_path}",
                    )
                self._cond.wait(left)

    def wait_connected(self, timeout: float = 10.0) -> None:
        """Wait until the reader holds an open port (after a loss or a power cycle)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._port is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PortError(
                        f"the console port did not come back within {timeout:g} s",
                        where=self.name,
                        hint=f"check the board's power and cable; log: {self._log_path}",
                    )
                self._cond.wait(left)

    def close(self) -> None:
        """Stop the reader, close the port and the log. Safe to call twice."""
        with self._cond:
            if self._closing:
                return
            self._closing = True
            self._cond.notify_all()
            self._interrupt_reader()
        self._thread.join(timeout=5.0)
        with self._cond:
            self._close_port()
            self._log.close()

    def __enter__(self) -> Console:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ------------------------------------------------------------------------------

    def _interrupt_reader(self) -> None:
        """Wake the reader out of its read at once instead of at the read timeout.

        Each pause (every flash) and close (every test) would otherwise wait up to one read
        timeout (50 ms) for the reader to notice. Needs ``self._cond``.
        """
        port = self._port
        if port is None:
            return
        cancel = getattr(port, "cancel_read", None)
        sock = getattr(port, "_socket", None)
        try:
            if callable(cancel):
                cancel()
            elif sock is not None:
                sock.shutdown(socket.SHUT_RD)  # select() returns at once; the reader sees EOF
        except (OSError, AttributeError):
            pass  # already closed: the reader is on its way out anyway

    def _open(self) -> Any:
        port = self._open_port_fn()
        # The reader must wake up often enough to honour pause/close; None means "block forever".
        if getattr(port, "timeout", 0.05) is None or getattr(port, "timeout", 0.05) > 0.5:
            port.timeout = 0.05
        return port

    def _close_port(self) -> None:
        port, self._port = self._port, None
        if port is not None:
            try:
                port.close()
            except Exception:  # closing a vanished port can raise anything; it is gone either way
                pass

    def _wait_for(
        self, regex: re.Pattern[str], timeout: float, start: int | None, *, shown: str
    ) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                origin = self._pos if start is None else max(start, self._pos)
                match = regex.search(self._buf, max(origin - self._base, 0))
                if match is not None:
                    self._pos = self._base + match.end()
                    return match
                left = deadline - time.monotonic()
                if left <= 0 or self._closing:
                    break
                self._cond.wait(left)
        tail = self.tail()
        lines = tail.split("\n") if tail else ["(no output at all)"]
        shown_tail = "\n".join(f"    | {line}" for line in lines)
        raise ConsoleTimeout(
            f"{shown} did not appear within {timeout:g} s; last {TAIL_LINES} lines of output:\n"
            f"{shown_tail}",
            where=self.name,
            hint=f"full log: {self._log_path}",
        )

    def _log_marker(self, text: str) -> None:
        prefix = "" if self._at_line_start else "\n"
        self._log.write(f"{prefix}{_timestamp()}--- {text} ---\n")
        self._log.flush()
        self._at_line_start = True

    def _feed(self, data: bytes) -> None:
        text = self._decoder.decode(data)
        if not text:
            return
        stamp = _timestamp()
        out: list[str] = []
        for piece in text.splitlines(keepends=True):
            if self._at_line_start:
                out.append(stamp)
            out.append(piece)
            self._at_line_start = piece.endswith("\n")
        self._log.write("".join(out))
        self._log.flush()
        with self._cond:
            self._buf += text
            if len(self._buf) > self._max_buffer:
                # Drop consumed text first, keeping some for error tails and boot_info.
                consumed = self._pos - self._base
                keep_from = max(min(consumed, len(self._buf) - self._max_buffer // 2), 0)
                self._buf = self._buf[keep_from:]
                self._base += keep_from
                self._pos = max(self._pos, self._base)
            self._cond.notify_all()

    def _read_chunk(self, port: Any) -> bytes:
        data: bytes = port.read(1)
        if data:
            # Drain what is already there without waiting for the read timeout again.
            for _ in range(65536):
                waiting = port.in_waiting
                if not waiting:
                    break
                data += port.read(waiting)
        return data

    def _run(self) -> None:
        delay = self._backoff[0]
        while True:
            with self._cond:
                if self._closing:
                    return
                if self._pause_requested:
                    if not self._paused:
                        self._close_port()
                        self._paused = True
                        self._log_marker("console paused (port released)")
                        self._cond.notify_all()
                    self._cond.wait(0.5)
                    continue
                if self._paused:
                    self._paused = False
                    self._log_marker("console resumed")
                port = self._port
            if port is None:
                try:
                    port = self._open()
                except Exception as exc:  # PortError, OSError, anything the opener raises: retry
                    with self._cond:
                        if not self._lost:
                            self._lost = True
                            self.lost_count += 1
                            reason = getattr(exc, "what", None) or str(exc)
                            self._log_marker(f"port lost (cannot open: {reason})")
                        self._cond.wait(delay)
                    delay = min(delay * 2, self._backoff[1])
                    continue
                delay = self._backoff[0]
                with self._cond:
                    if self._closing or self._pause_requested:
                        try:
                            port.close()
                        except Exception:
                            pass
                        continue
                    self._port = port
                    if self._lost:
                        self._lost = False
                        self._log_marker("port back")
                    self._cond.notify_all()
            try:
                data = self._read_chunk(port)
            except Exception:  # SerialException, OSError, TypeError from a port closed under us
                with self._cond:
                    if self._closing or self._pause_requested:
                        continue
                    self.lost_count += 1
                    self._lost = True
                    self._close_port()
                    self._log_marker("port lost")
                    self._cond.notify_all()
                continue
            if data:
                self._feed(data)

"""Progress of ``hilfarm flash`` on stderr: live bars on a terminal, plain lines elsewhere.

One line per board and region (offset, file name, bytes, written/skipped/verified), grouped by
board in the order the boards were given, so parallel flashes never overwrite each other. It
only displays the :class:`~pytest_hilfarm.drivers.flashing.RegionProgress` events the flasher sends
(from the flashing threads); it decides nothing and never touches a board.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import PurePath
from typing import Any, Protocol, TextIO

from rich.console import Console as RichConsole
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
)
from rich.table import Column, Table

from pytest_hilfarm.drivers.flashing import ProgressFn, RegionProgress

# What a region's line says once it is done (the flasher's final states).
FINAL = {"skipped": "identical, skipped", "written": "written", "verified": "written, verified"}


def short_name(name: str) -> str:
    """A region's file name without its directories (what a person recognises)."""
    return PurePath(name).name or name


class FlashProgress(Protocol):
    def callback(self, board: str) -> ProgressFn: ...

    def failed(self, board: str, error: str) -> None: ...

    def close(self) -> None: ...


class _Bars(Progress):
    """rich's Progress, its lines grouped by board (given order) and offset within a board."""

    def __init__(self, boards: Sequence[str], *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rank = {b: i for i, b in enumerate(boards)}

    def get_renderables(self) -> Any:
        tasks = sorted(self.tasks, key=lambda t: (self._rank.get(t.fields["board"], 0),
                                                  t.fields["offset"]))
        table: Table = self.make_tasks_table(tasks)
        yield table


class LiveProgress:
    """Live bars on a terminal (rich), one per board and region."""

    def __init__(self, boards: Sequence[str], console: RichConsole) -> None:
        self._progress = _Bars(
            boards,
            # No cell wraps: a narrow terminal shortens the bars, never splits a line.
            TextColumn("{task.fields[board]}", table_column=Column(no_wrap=True)),
            TextColumn("{task.fields[where]}", table_column=Column(no_wrap=True)),
            BarColumn(bar_width=None),
            DownloadColumn(table_column=Column(no_wrap=True)),
            TextColumn("{task.fields[state]}", table_column=Column(no_wrap=True)),
            console=console,
            refresh_per_second=8,
        )
        self._tasks: dict[tuple[str, int], TaskID] = {}
        self._lock = threading.Lock()
        self._progress.start()

    def callback(self, board: str) -> ProgressFn:
        def update(event: RegionProgress) -> None:
            key = (board, event.offset)
            state = FINAL.get(event.state, event.state)
            with self._lock:
                task = self._tasks.get(key)
                if task is None:
                    task = self._progress.add_task(
                        "", total=event.size, board=board, offset=event.offset,
                        where=f"{event.offset:#08x} {short_name(event.name)}", state=state)
                    self._tasks[key] = task
            self._progress.update(task, completed=event.done, state=state)

        return update

    def failed(self, board: str, error: str) -> None:
        with self._lock:
            tasks = [t for (b, _), t in self._tasks.items() if b == board]
        for task in tasks:
            if self._progress.tasks[task].fields["state"] not in FINAL.values():
                self._progress.update(task, state="[red]FAILED[/red]")
        if not tasks:
            self._progress.add_task("", total=None, board=board, offset=-1, where="",
                                    state="[red]FAILED[/red]")

    def close(self) -> None:
        self._progress.stop()


class PlainProgress:
    """One plain line per region and state (for logs and pipes): no bars, no percentages."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self._last: dict[tuple[str, int], str] = {}

    def callback(self, board: str) -> ProgressFn:
        def update(event: RegionProgress) -> None:
            key = (board, event.offset)
            with self._lock:
                if self._last.get(key) == event.state:
                    return  # "writing" arrives once per block; say it once
                self._last[key] = event.state
                self._stream.write(f"{board}: {event.offset:#x} {short_name(event.name)} "
                                   f"{event.size} bytes "
                                   f"{FINAL.get(event.state, event.state)}\n")
                self._stream.flush()

        return update

    def failed(self, board: str, error: str) -> None:
        with self._lock:
            self._stream.write(f"{board}: FAILED: {error}\n")
            self._stream.flush()

    def close(self) -> None:
        pass


def open_progress(boards: Sequence[str], stream: TextIO) -> FlashProgress:
    """Live bars when ``stream`` is a terminal, plain lines otherwise."""
    console = RichConsole(file=stream)
    if console.is_terminal:
        return LiveProgress(boards, console)
    return PlainProgress(stream)

"""The quarantine list: known-flaky tests that run but whose failure does not fail the job.

Like twister's quarantine list, a YAML file a team keeps in its repository (``--hil-quarantine``,
ini ``hil_quarantine``, ``HILFARM_QUARANTINE``)::

    # each entry: the tests (pytest node ids, * and ? as in fnmatch) and why they are here
    - tests:
        - examples/test_mesh.py::test_mesh_heal
        - "examples/test_network.py::test_*_under_loss"
      comment: heals late under radio loss (issue 42)
    - examples/test_ota.py::test_power_cut        # a plain string: one test, no comment

This module only reads and matches the list; the plugin turns a quarantined test's failure into
an expected failure and ``hilfarm report`` shows the list beside the tests' pass rates. Every
mistake names the file and line.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from pytest_hilfarm.errors import ConfigError

_EXAMPLE = "e.g. - {tests: [examples/test_mesh.py::test_mesh_heal], comment: flaky on radio loss}"


@dataclass(frozen=True)
class QuarantineEntry:
    """One pattern of the list, with the reason given for it and where it was written."""

    pattern: str
    comment: str
    where: str

    def matches(self, test_id: str) -> bool:
        return fnmatch.fnmatchcase(test_id, self.pattern)


@dataclass(frozen=True)
class Quarantine:
    """The whole list (possibly empty): ``match(test_id)`` gives the entry that covers a test."""

    entries: tuple[QuarantineEntry, ...] = ()
    source: str = ""

    def match(self, test_id: str) -> QuarantineEntry | None:
        return next((e for e in self.entries if e.matches(test_id)), None)

    def __bool__(self) -> bool:
        return bool(self.entries)


def _fail(source: str, node: Node, what: str) -> ConfigError:
    return ConfigError(f"quarantine list: {what}", where=f"{source}:{node.start_mark.line + 1}",
                       hint="a list of test ids, or of {tests: [...], comment: ...}; "
                       + _EXAMPLE)


def _text(source: str, node: Node, what: str) -> str:
    if not isinstance(node, ScalarNode) or not str(node.value).strip():
        raise _fail(source, node, f"{what} must be a non-empty string")
    return str(node.value).strip()


def parse_quarantine(text: str, source: str = "<quarantine>") -> Quarantine:
    """Parse the list's YAML text; an empty file is an empty list."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        raise ConfigError(f"quarantine list is not valid YAML: {exc.problem}", where=where,
                          hint=_EXAMPLE) from None
    if root is None:
        return Quarantine((), source)
    if not isinstance(root, SequenceNode):
        raise _fail(source, root, "the file must be a YAML list")
    entries: list[QuarantineEntry] = []
    for item in root.value:
        where = f"{source}:{item.start_mark.line + 1}"
        if isinstance(item, ScalarNode):
            entries.append(QuarantineEntry(_text(source, item, "a test id"), "", where))
            continue
        if not isinstance(item, MappingNode):
            raise _fail(source, item, "an entry must be a test id or a mapping")
        fields = {_text(source, k, "a key"): v for k, v in item.value}
        unknown = set(fields) - {"tests", "comment"}
        if unknown:
            raise _fail(source, item, f"unknown key {sorted(unknown)[0]!r} (keys: tests, "
                        "comment)")
        tests = fields.get("tests")
        if tests is None:
            raise _fail(source, item, "an entry needs 'tests'")
        patterns = tests.value if isinstance(tests, SequenceNode) else [tests]
        if not patterns:
            raise _fail(source, tests, "'tests' is empty")
        comment_node = fields.get("comment")
        comment = _text(source, comment_node, "comment") if comment_node is not None else ""
        for node in patterns:
            entries.append(QuarantineEntry(_text(source, node, "a test id"), comment,
                                           f"{source}:{node.start_mark.line + 1}"))
    return Quarantine(tuple(entries), source)


def load_quarantine(path: Path | str) -> Quarantine:
    """Read and parse a quarantine list file, or a ConfigError saying what is wrong where."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read the quarantine list: {exc.strerror or exc}",
                          where=str(path),
                          hint="pass an existing YAML file (--hil-quarantine, ini "
                          "hil_quarantine, HILFARM_QUARANTINE)") from exc
    return parse_quarantine(text, str(path))

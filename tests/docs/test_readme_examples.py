"""Every Python example in README.md and docs/*.md runs as written, or says why it cannot.

Each fenced ``python`` block must follow an HTML comment that says what it is (docs/CONTRACTS.md,
"Examples in the docs"):

* ``<!-- example: test -->``: a complete test module; pytest runs it on the built-in virtual rack
  with the virtual rack's demo app as the candidate firmware for every chip, and every test in it
  must pass (none skipped).
* ``<!-- example: script[; setup: COMMAND] -->``: a complete script; ``COMMAND`` (a shell command
  the surrounding text tells the reader to run) runs first in an empty directory, then the script
  runs there with ``python`` and must exit 0.
* ``<!-- example: fragment: REASON -->``: a signature or a part of a larger file; not run, and
  the reason says why.

A block with no such comment fails the suite, so no example is skipped silently.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from pytest_hilfarm.sim.appbuild import write_build_dir

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[2]
DOCS = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))
FENCE = re.compile(r"^(?P<indent> *)```(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
                   re.M | re.S)
MARKER = re.compile(r"<!--\s*example:\s*(?P<spec>.*?)\s*-->\s*\Z", re.S)
KINDS = ("test", "script", "fragment")
CHIPS = ("esp32", "esp32s2", "esp32c3")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    code: str
    marker: str | None  # the text after "example:", or None when the block has no marker

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def kind(self) -> str:
        return re.split(r"[;:]", self.marker or "", maxsplit=1)[0].strip()

    @property
    def setup(self) -> str | None:
        found = re.search(r";\s*setup:\s*(.+)$", self.marker or "")
        return found.group(1).strip() if found else None


def python_blocks(path: Path) -> list[Block]:
    text = path.read_text(encoding="utf-8")
    blocks = []
    for fence in FENCE.finditer(text):
        if fence.group("info").strip().split(" ")[0] not in ("python", "py", "python3"):
            continue
        before = text[: fence.start()].rstrip()
        marker = MARKER.search(before[before.rfind("<!--"):]) if "<!--" in before else None
        # Only a comment that directly precedes the fence counts (blank lines allowed).
        if marker is not None and before.endswith("-->"):
            spec: str | None = marker.group("spec")
        else:
            spec = None
        line = text.count("\n", 0, fence.start()) + 1
        blocks.append(Block(path, line, fence.group("body"), spec))
    return blocks


BLOCKS = [b for path in DOCS for b in python_blocks(path)]


def blocks_of(kind: str) -> list[pytest.param]:  # type: ignore[valid-type]
    return [pytest.param(b, id=b.where) for b in BLOCKS if b.kind == kind]


def test_the_docs_have_python_examples() -> None:
    # The extractor itself must find the README's blocks (a broken regex would pass vacuously).
    readme = [b for b in BLOCKS if b.path.name == "README.md"]
    assert len(readme) >= 3 and any("def test_mesh" in b.code for b in readme)


@pytest.mark.parametrize("block", [pytest.param(b, id=b.where) for b in BLOCKS])
def test_every_python_block_is_run_or_marked(block: Block) -> None:
    assert block.marker is not None, (
        f"{block.where}: a python block without an `<!-- example: test|script|fragment: why -->` "
        "comment before it; mark it so it is run, or say why it is not")
    assert block.kind in KINDS, f"{block.where}: unknown example kind {block.kind!r}"
    if block.kind == "fragment":
        reason = block.marker.split(":", 1)[1].strip() if ":" in block.marker else ""
        assert reason, f"{block.where}: a fragment must say why it is not run"
    if block.kind == "test":
        assert re.search(r"^def test_\w+\(", block.code, re.M), \
            f"{block.where}: a test example defines no test function"


def test_an_unmarked_block_is_found(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text("text\n\n```python\nprint(1)\n```\n\n<!-- example: fragment: x -->\n"
                   "```python\nx\n```\n<!-- example: test -->\n\nmore text\n\n```python\ny\n```\n")
    found = python_blocks(doc)
    assert [(b.line, b.kind) for b in found] == [(3, ""), (8, "fragment"), (15, "")]


@pytest.fixture(scope="session")
def demo_firmware(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """``--hil-firmware CHIP=BUILD`` options: the demo app built for every chip."""
    root = tmp_path_factory.mktemp("docs-firmware")
    args = []
    for chip in CHIPS:
        build = write_build_dir(root / chip, chip, "docs-demo", "1.0.0")
        args += ["--hil-firmware", f"{chip}={build.path}"]
    return args


@pytest.mark.slow
@pytest.mark.parametrize("block", blocks_of("test"))
def test_example_test_passes_on_the_virtual_rack(block: Block, pytester: pytest.Pytester,
                                                 demo_firmware: list[str]) -> None:
    pytester.makepyfile(test_example=block.code)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA", *demo_firmware,
                                           timeout=240)
    outcomes = result.parseoutcomes()
    assert result.ret == 0 and outcomes.get("passed", 0) >= 1 and set(outcomes) == {"passed"}, \
        f"{block.where}:\n{result.stdout.str()[-4000:]}\n{result.stderr.str()[-2000:]}"


@pytest.mark.slow
@pytest.mark.parametrize("block", blocks_of("script"))
def test_example_script_runs(block: Block, tmp_path: Path) -> None:
    env = dict(os.environ)
    # The setup command names the project's own command line: the one of this interpreter.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if block.setup:
        setup = subprocess.run(shlex.split(block.setup), cwd=tmp_path, env=env,
                               capture_output=True, text=True, timeout=120)
        assert setup.returncode == 0, f"{block.where}: setup failed:\n{setup.stderr}"
    script = tmp_path / "example.py"
    script.write_text(block.code, encoding="utf-8")
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, f"{block.where}:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"

"""A panic in a test shows function names and lines, in the report and in the JUnit XML.

The candidate is a build directory with a real RISC-V ELF (Debian's GCC, tests/projects/
panicbuild.py) beside a demo-app image that carries that ELF's SHA-256 and faults at the ELF's
real store instruction (a fault built into the image, like every fault on the virtual rack).
The plugin finds the ELF through the build directory, addr2line through the usual search
(Debian's riscv64 binutils here), and decodes the board's panic into the failing report.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "projects"))

from panicbuild import PanicBuild, build  # noqa: E402

from pytest_hilfarm.sim.appbuild import write_build_dir  # noqa: E402
from pytest_hilfarm.sim.model import Faults  # noqa: E402

pytest_plugins = ["pytester"]

RACK = """\
version: 1
name: panics
boards:
  - {id: c3-1, chip: esp32c3, port: virtual, reset: virtual, power: virtual}
"""

CRASHING_TEST = """
import pytest
@pytest.mark.hil(count=1)
def test_reading(hil_device):
    hil_device.write("crash\\n")
    hil_device.expect("Rebooting", timeout=10)
    assert False, "the reading task crashed"
"""


@pytest.fixture(scope="module")
def pb(tmp_path_factory: pytest.TempPathFactory) -> PanicBuild:
    if shutil.which("riscv64-unknown-elf-addr2line") is None:
        pytest.skip("riscv64-unknown-elf-addr2line is not installed "
                    "(Debian: binutils-riscv64-unknown-elf)")
    return build(tmp_path_factory.mktemp("panic-elf"))


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory, private_virtual_rack: Path,
        pb: PanicBuild) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rig")
    (root / "rack.yaml").write_text(RACK)
    faults = Faults(panic_pc=pb.mepc, panic_ra=pb.ra)
    elf_sha = hashlib.sha256(pb.elf.read_bytes()).digest()
    with_elf = write_build_dir(root / "with-elf", "esp32c3", "reader", "1.0.0", faults=faults,
                               elf_sha256=elf_sha)
    shutil.copy(pb.elf, with_elf.path / "reader.elf")  # where idf.py leaves <project>.elf
    no_elf = write_build_dir(root / "no-elf", "esp32c3", "reader", "1.0.1", faults=faults)
    return {"rack": root / "rack.yaml", "with_elf": with_elf.path, "no_elf": no_elf.path}


def test_panic_is_decoded_into_the_report_and_junit(pytester: pytest.Pytester,
                                                    rig: dict[str, Path], pb: PanicBuild) -> None:
    pytester.makepyfile(CRASHING_TEST)
    junit = pytester.path / "junit.xml"
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", f"--hil-rack={rig['rack']}",
        f"--hil-firmware={rig['with_elf']}", f"--junitxml={junit}", timeout=240)
    result.assert_outcomes(failed=1)
    line = pb.line_of("*slot = value")  # the store to NULL in store_result
    result.stdout.fnmatch_lines([
        "*decoded panic on c3-1*",
        f"*store_result*panic_app.c:{line}*",
        "*process_reading*panic_app.c:*",
    ])
    failure = ET.parse(junit).getroot().find(".//testcase/failure")
    assert failure is not None and failure.text is not None
    assert f"panic_app.c:{line}" in failure.text and "store_result" in failure.text


def test_without_an_elf_it_says_so_once(pytester: pytest.Pytester,
                                       rig: dict[str, Path]) -> None:
    pytester.makepyfile(CRASHING_TEST.replace("def test_reading", "def test_reading_1")
                        + CRASHING_TEST.replace("import pytest\n", "").replace(
                            "def test_reading", "def test_reading_2"))
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", f"--hil-rack={rig['rack']}",
        f"--hil-firmware={rig['no_elf']}", timeout=240)
    result.assert_outcomes(failed=2)
    text = result.stdout.str()
    assert text.count("panics are not decoded") == 1, text
    result.stdout.fnmatch_lines(["panics: esp32c3: panics are not decoded: the build has no ELF*"])

"""``hilfarm sim build-app``: write an ESP-IDF-like build directory for a virtual board.

Only defines the subcommand; ``cli/sim.py`` calls :func:`add_build_app_parser` on its own
subparsers. Imports nothing but ``pytest_hilfarm.sim``, ``.ota`` and ``.errors`` (the command line
never imports the pytest plugin).
"""

from __future__ import annotations

import argparse
from typing import Any

from pytest_hilfarm.cli.common import example
from pytest_hilfarm.errors import ImageError, UsageError
from pytest_hilfarm.esp.chips import FARM_CHIPS
from pytest_hilfarm.esp.partitions import parse_size
from pytest_hilfarm.sim.appbuild import DEFAULT_IDF_VER, write_build_dir
from pytest_hilfarm.sim.model import Faults

FLASH_SIZES = ("2MB", "4MB", "8MB", "16MB")


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a fraction between 0 and 1")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} seconds is negative")
    return value


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ImageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_build_app_parser(sim_subparsers: Any) -> argparse.ArgumentParser:
    """Add ``build-app`` to the ``hilfarm sim`` subparsers; returns the new parser."""
    p: argparse.ArgumentParser = sim_subparsers.add_parser(
        "build-app",
        help="build a virtual-rack app (ESP-IDF build directory with flasher_args.json)",
        description=(
            "Write an ESP-IDF-like build directory (bootloader, partition table, app image, "
            "flasher_args.json) whose app runs on the virtual rack. Faults are built into the "
            "image, so flashing it is what makes a board misbehave."
        ),
        epilog=example("hilfarm sim build-app --chip esp32 --project demo --version 1.0.0 "
                       "-o build/",
                       "hilfarm sim build-app --chip esp32c3 --layout two-ota --crash-at-boot "
                       "-o crashing/"),
    )
    p.add_argument("--chip", required=True, choices=FARM_CHIPS, help="target chip")
    p.add_argument("--project", default="hilfarm_demo", help="project name (default: %(default)s)")
    p.add_argument("--version", dest="app_version", default="1.0.0",
                   help="app version string in esp_app_desc_t (default: %(default)s)")
    p.add_argument("--secure-version", type=int, default=0,
                   help="anti-rollback secure_version (default: %(default)s)")
    p.add_argument("--idf-ver", default=DEFAULT_IDF_VER,
                   help="ESP-IDF version recorded in the image (default: %(default)s)")
    p.add_argument("--layout", choices=("factory", "two-ota"), default="factory",
                   help="partition table (default: %(default)s)")
    p.add_argument("--flash-size", choices=FLASH_SIZES, default="4MB",
                   help="flash size (default: %(default)s)")
    faults = p.add_argument_group("faults built into the image")
    faults.add_argument("--crash-at-boot", action="store_true", help="app panics right after boot")
    faults.add_argument("--hang-at-boot", action="store_true", help="app hangs after boot")
    faults.add_argument("--fail-self-test", action="store_true",
                        help="app's self-test fails (it rejects its OTA slot)")
    faults.add_argument("--slow-boot", type=_seconds, default=0.0, metavar="SECONDS",
                        help="extra boot time in seconds")
    faults.add_argument("--drop-mesh", type=_fraction, default=0.0, metavar="FRACTION",
                        help="fraction (0..1) of mesh packets the app drops")
    p.add_argument("--unity", action="store_true",
                   help="build a Unity unit-test app: it boots into ESP-IDF's test menu "
                   "(pytest: @pytest.mark.hil_unity)")
    p.add_argument("--pad-to", type=_size, default=None, metavar="SIZE",
                   help="pad the app image to about SIZE bytes (e.g. 1MB) for benchmarks")
    p.add_argument("-o", "--output", required=True, metavar="DIR",
                   help="build directory to write (created if missing)")
    p.set_defaults(handler=run_build_app)
    return p


def run_build_app(args: argparse.Namespace) -> int:
    faults = Faults(
        crash_at_boot=args.crash_at_boot,
        hang_at_boot=args.hang_at_boot,
        fail_self_test=args.fail_self_test,
        slow_boot=args.slow_boot,
        drop_mesh=args.drop_mesh,
        unity_menu=args.unity,
    )
    if args.secure_version < 0:
        raise UsageError(f"--secure-version must be >= 0, got {args.secure_version}")
    out = write_build_dir(
        args.output, args.chip, args.project, args.app_version,
        secure_version=args.secure_version, idf_ver=args.idf_ver, faults=faults,
        pad_to=args.pad_to, layout=args.layout, flash_size=args.flash_size,
    )
    print(f"wrote {out.path} ({args.chip}, {args.layout}, {args.project} {args.app_version})")
    for offset, rel in out.flash_files:
        print(f"  0x{offset:06x}  {rel}")
    print(f"  flasher_args.json: {out.flasher_args}")
    return 0

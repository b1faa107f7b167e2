"""Run settings: one frozen record resolved from every place a value can come from.

Precedence, lowest first: default < rack file (``settings:``) < ini (``hil_*``) < environment
(``HILFARM_*``) < command line (``--hil-*``) < marker (``@pytest.mark.hil``). Each value is
parsed once, and the record remembers where it came from, so an error or a report can name the
file and line, ini key, variable, option or test. This module must not import pytest: the plugin
registers :data:`OPTIONS` and feeds the layers in; the CLI uses the same code without pytest.
"""

from __future__ import annotations

import math
import os
import re
import shlex
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from pytest_hilfarm.description.rack import (
    RACK_SETTING_KEYS,
    RackSpec,
    builtin_virtual_rack_path,
    closest,
    load_rack,
)
from pytest_hilfarm.errors import ConfigError, UsageError
from pytest_hilfarm.esp.chips import FARM_CHIPS

LayerKind = Literal["default", "rack", "ini", "env", "option", "marker"]
ValueType = Literal["path", "images", "seconds", "bool", "retries", "count", "chip", "features",
                    "priority"]

# Where a layer stands in the precedence order; resolve() sorts by it, so callers cannot get
# the order wrong by passing layers in another order.
_RANK: Mapping[str, int] = MappingProxyType(
    {"default": 0, "rack": 1, "ini": 2, "env": 3, "option": 4, "marker": 5}
)

HIL_MARKER_SIGNATURE = (
    "@pytest.mark.hil(count=1, *, chip=None, features=(), firmware=None, boot_timeout=None)"
)
HIL_MARKER_HELP = (
    "hil(count=1, *, chip=None, features=(), firmware=None, boot_timeout=None): run the test on "
    "`count` reserved boards of the given chip (esp32, esp32s2, esp32c3, esp32s3, esp32c6) "
    "having all `features`, flashed with `firmware` (default: --hil-firmware); `boot_timeout` "
    "in seconds."
)
_FEATURE_RE = re.compile(r"[A-Za-z0-9._-]+")
# CHIP=PATH: the part before '=' is a chip name only when it looks like a name (no path
# separators), so ./odd=name.bin stays a path.
_CHIP_ITEM_RE = re.compile(r"([A-Za-z0-9_]+)=(.*)", re.DOTALL)
_TRUE = ("1", "true", "yes")
_FALSE = ("0", "false", "no")


@dataclass(frozen=True)
class Source:
    """Where a setting's value came from.

    ``name`` is the value's name in that place (``hil_lock_timeout``, ``HILFARM_LOCK_TIMEOUT``,
    ``--hil-lock-timeout``, or the setting key); ``location`` is the rack file and line, the ini
    file, or the test, when known.
    """

    kind: LayerKind
    name: str
    location: str = ""

    def __str__(self) -> str:
        if self.kind == "default":
            return "default"
        if self.kind == "rack":
            return f"rack file {self.location}"
        if self.kind == "ini":
            return f"ini {self.name}" + (f" in {self.location}" if self.location else "")
        if self.kind == "env":
            return f"environment {self.name}"
        if self.kind == "option":
            return f"option {self.name}"
        return f"marker @pytest.mark.hil on {self.location}"

    @property
    def where(self) -> str:
        """The ``where`` part of an error about this source."""
        places = {"default": "default settings", "ini": self.location or "ini file",
                  "env": "environment", "option": "command line"}
        return places.get(self.kind, self.location)

    def assignment(self, raw: object) -> str:
        """How the raw value reads, in the words of its source (``HILFARM_X='abc'``)."""
        if self.kind == "marker":
            return f"@pytest.mark.hil({self.name}={raw!r})"
        if self.kind == "rack":
            return f"settings.{self.name}={raw!r}"
        return f"{self.name}={raw!r}"


@dataclass(frozen=True)
class ImageSpec:
    """Firmware (or baseline) images: one for every chip and/or one per chip.

    Each path is an app image, an ESP-IDF build directory or a flasher_args.json; which one is
    the flasher's business (this module does no I/O).
    """

    any_chip: Path | None = None
    by_chip: Mapping[str, Path] = field(
        default_factory=lambda: MappingProxyType({}), hash=False
    )

    def for_chip(self, chip: str) -> Path | None:
        """The image for this chip: its own if given, else the one for every chip."""
        return self.by_chip.get(chip, self.any_chip)


@dataclass(frozen=True)
class OptionSpec:
    """One setting as the command line, ini file and environment name it.

    The ini name is also the option's ``dest`` (as pytest-timeout does), so ``config.getini``
    and ``config.getoption`` use the same word.
    """

    key: str
    option: str
    ini: str
    env: str
    help: str
    type: ValueType
    metavar: str | None = None

    @property
    def dest(self) -> str:
        return self.ini

    @property
    def kind(self) -> Literal["bool", "multi", "value"]:
        """How the option takes its value: a flag, repeated, or one value."""
        if self.type == "bool":
            return "bool"
        return "multi" if self.type == "images" else "value"

    def addoption_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``parser.getgroup(...).addoption(spec.option, **...)``."""
        # default None everywhere: "not given" must stay visible, or an unset flag would
        # override the environment with False.
        kwargs: dict[str, Any] = {"dest": self.dest, "default": None, "help": self.help}
        if self.type == "bool":
            kwargs["action"] = "store_true"
        elif self.type == "images":
            kwargs["action"] = "append"
            kwargs["metavar"] = self.metavar
        else:
            kwargs["metavar"] = self.metavar
        return kwargs

    def addini_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``parser.addini(spec.ini, **...)``."""
        # Strings (not pytest's bool/float types) so the value reaches our parser, which names
        # the ini key when it is wrong; None tells "not set" apart from a value.
        return {"help": self.help, "type": "args" if self.type == "images" else "string",
                "default": None}


def _spec(key: str, help: str, type: ValueType, metavar: str | None = None) -> OptionSpec:
    return OptionSpec(key=key, option="--hil-" + key.replace("_", "-"), ini="hil_" + key,
                      env="HILFARM_" + key.upper(), help=help, type=type, metavar=metavar)


OPTIONS: tuple[OptionSpec, ...] = (
    _spec("rack", "rack file describing the boards (default: the built-in virtual rack)",
          "path", "PATH"),
    _spec("firmware", "candidate firmware: an app image, an ESP-IDF build directory or "
          "flasher_args.json, or CHIP=PATH per chip (repeat the option; space-separated in "
          "ini and environment)", "images", "IMAGE|CHIP=IMAGE"),
    _spec("baseline", "known-good image for health checks, overriding the rack file's "
          "(same forms as firmware)", "images", "IMAGE|CHIP=IMAGE"),
    _spec("lock_timeout", "seconds to wait for free boards before giving up (default 300)",
          "seconds", "SECONDS"),
    _spec("no_flash", "do not flash the candidate firmware; test what is on the boards "
          "(ini/environment: 1/0, true/false, yes/no)", "bool"),
    _spec("infra_retries", "re-run a test on another board this many times after a rig "
          "fault (default 0)", "retries", "N"),
    _spec("boot_timeout", "seconds from reset to the boot banner (default 15)", "seconds",
          "SECONDS"),
    _spec("addr2line", "the toolchain's addr2line for decoding panics against the build's ELF "
          "(default: found from ESP-IDF's tools, PATH, or Debian's RISC-V binutils)", "path",
          "PATH"),
    _spec("log_dir", "where device logs go (default: hilfarm-logs/ in the directory pytest was "
          "started from)", "path", "DIR"),
    _spec("priority", "this run's priority for boards: a higher one is served first while "
          "requests wait (e.g. 10 for PR jobs, -10 for nightly runs); waiting raises it over "
          "time so a low one still runs (default 0)", "priority", "N"),
    _spec("quarantine", "YAML list of known-flaky tests: they run, and a failure is reported as "
          "an expected failure (x) instead of failing the job (see docs/dashboard.md)", "path",
          "FILE"),
)
_OPTIONS_BY_KEY: Mapping[str, OptionSpec] = MappingProxyType({o.key: o for o in OPTIONS})


@dataclass(frozen=True)
class _Key:
    type: ValueType
    default: object
    # farm-wide: one value per session, so a marker may not set it.
    farm_wide: bool = False
    # per-test only: meaningful for one test, so only a marker sets it.
    marker_only: bool = False


_KEYS: Mapping[str, _Key] = MappingProxyType({
    "rack": _Key("path", None, farm_wide=True),  # None: the built-in virtual rack
    "firmware": _Key("images", None),
    "baseline": _Key("images", None, farm_wide=True),
    "lock_timeout": _Key("seconds", 300.0, farm_wide=True),
    "no_flash": _Key("bool", False, farm_wide=True),
    "infra_retries": _Key("retries", 0, farm_wide=True),
    "boot_timeout": _Key("seconds", 15.0),
    "addr2line": _Key("path", None, farm_wide=True),  # None: search (projects/panic.py)
    "log_dir": _Key("path", None, farm_wide=True),  # None: <invocation dir>/hilfarm-logs
    "priority": _Key("priority", 0, farm_wide=True),
    "quarantine": _Key("path", None, farm_wide=True),  # None: no quarantine list
    "count": _Key("count", 1, marker_only=True),
    "chip": _Key("chip", None, marker_only=True),
    "features": _Key("features", frozenset(), marker_only=True),
})
MARKER_KEYS = ("count", "chip", "features", "firmware", "boot_timeout")


@dataclass(frozen=True)
class Layer:
    """Raw values from one place, by setting key; ``None`` means "not given".

    ``location`` is the rack file, ini file or test; ``where`` gives per-key locations (the
    rack file's lines). Relative paths are taken from ``base_dir`` when given.
    """

    kind: LayerKind
    values: Mapping[str, object]
    location: str = ""
    where: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), hash=False)
    base_dir: Path | None = None

    def source(self, key: str) -> Source:
        option = _OPTIONS_BY_KEY.get(key)
        if self.kind == "ini" and option is not None:
            return Source("ini", option.ini, self.location)
        if self.kind == "env" and option is not None:
            return Source("env", option.env)
        if self.kind == "option" and option is not None:
            return Source("option", option.option)
        return Source(self.kind, key, self.where.get(key, self.location))


@dataclass(frozen=True)
class Settings:
    """Every setting of a run (and, with a marker layer, of one test), parsed and checked."""

    rack: Path
    firmware: ImageSpec | None
    baseline: ImageSpec | None
    lock_timeout: float
    no_flash: bool
    infra_retries: int
    boot_timeout: float
    addr2line: Path | None
    log_dir: Path | None
    priority: int
    quarantine: Path | None
    count: int
    chip: str | None
    features: frozenset[str]
    sources: Mapping[str, Source] = field(hash=False, repr=False, compare=False)
    # The layers these values came from, so for_test can add a marker on top.
    layers: tuple[Layer, ...] = field(default=(), hash=False, repr=False, compare=False)

    def for_test(self, marker_values: Mapping[str, object], where: str,
                 base_dir: Path | None = None) -> Settings:
        """These settings with a test's marker values (from parse_hil_marker) on top."""
        return resolve([*self.layers, marker_layer(marker_values, where, base_dir)])

    def source_of(self, key: str) -> Source:
        """Where the value of ``key`` came from."""
        if key not in self.sources:
            guess = closest(key, self.sources)
            raise UsageError(f"no setting named {key!r}",
                             hint=f"did you mean {guess!r}?" if guess
                             else f"settings: {', '.join(self.sources)}")
        return self.sources[key]


def resolve(layers: Sequence[Layer]) -> Settings:
    """Apply the layers over the defaults in precedence order and check every value."""
    values: dict[str, object] = {}
    sources: dict[str, Source] = {}
    for key, spec in _KEYS.items():
        values[key] = builtin_virtual_rack_path() if key == "rack" else spec.default
        sources[key] = Source("default", key)
    for layer in sorted(layers, key=lambda layer: _RANK[layer.kind]):
        for key, raw in layer.values.items():
            if raw is None:
                continue
            source = layer.source(key)
            _check_allowed(key, layer.kind, source)
            values[key] = parse_value(key, raw, source, base_dir=layer.base_dir)
            sources[key] = source
    return Settings(sources=MappingProxyType(sources), layers=tuple(layers),
                    **values)  # type: ignore[arg-type]


def resolve_session(*, option_values: Mapping[str, object] | object = None,
                    getini: Callable[[str], object] | None = None,
                    environ: Mapping[str, str] | None = None,
                    rootdir: Path | None = None,
                    inifile: str | os.PathLike[str] | None = None) -> Settings:
    """The run's settings from every layer but markers, including the rack file's own.

    The rack is found first (from ini, environment or option), then its ``settings:`` section
    joins below the ini layer. Relative ini paths are taken from the ini file's folder, else
    ``rootdir``.
    """
    env = os.environ if environ is None else environ
    layers: list[Layer] = []
    if getini is not None:
        layers.append(ini_layer(getini, inifile, base_dir=rootdir if inifile is None else None))
    layers.append(env_layer(env))
    if option_values is not None:
        layers.append(option_layer(option_values))
    first = resolve(layers)
    try:
        rack = load_rack(first.rack, environ=env)
    except ConfigError as exc:
        if exc.where != str(first.rack):
            raise
        # A file-level problem (missing, unreadable): say which setting chose that file.
        raise ConfigError(f"{exc.what} (chosen by {first.source_of('rack')})", where=exc.where,
                          hint=exc.hint) from None
    return resolve([rack_layer(rack), *layers])


def _check_allowed(key: str, kind: LayerKind, source: Source) -> None:
    if key not in _KEYS:
        guess = closest(key, _KEYS)
        raise ConfigError(f"unknown setting {key!r} ({source})", where=source.where,
                          hint=f"did you mean {guess!r}?" if guess
                          else f"settings: {', '.join(_KEYS)}")
    spec = _KEYS[key]
    option = _OPTIONS_BY_KEY.get(key)
    if kind == "marker" and spec.farm_wide:
        assert option is not None  # every farm-wide key has an option
        raise ConfigError(f"{key} is a farm-wide setting; a marker cannot set it",
                          where=source.where,
                          hint=f"set it for the whole run: {option.option}, {option.env} "
                               f"or ini {option.ini}")
    if kind not in ("marker", "default") and spec.marker_only:
        raise ConfigError(f"{key} is a per-test setting and cannot come from {source}",
                          where=source.where,
                          hint=f"set it on the test: @pytest.mark.hil({key}=...)")
    if kind == "rack" and key not in RACK_SETTING_KEYS:
        raise ConfigError(f"a rack file cannot set {key}", where=source.where,
                          hint=f"rack files may set: {', '.join(RACK_SETTING_KEYS)}")


# --- value parsers: raw value + its source -> checked value, or a ConfigError naming both ---


def parse_value(key: str, raw: object, source: Source, *, base_dir: Path | None = None) -> object:
    """Parse one raw value for ``key``; errors name ``source``."""
    kind = _KEYS[key].type
    if kind == "path":
        return _parse_path(raw, source, base_dir)
    if kind == "images":
        return _parse_images(raw, source, base_dir)
    if kind == "seconds":
        return _parse_seconds(raw, source, _KEYS[key].default)
    if kind == "bool":
        return _parse_bool(raw, source)
    if kind == "retries":
        return _parse_int(raw, source, 0, "a number of retries >= 0", "e.g. 0 or 2")
    if kind == "count":
        return _parse_int(raw, source, 1, "a number of boards >= 1", "e.g. count=3")
    if kind == "priority":
        return _parse_priority(raw, source)
    if kind == "chip":
        return _parse_chip(raw, source)
    return _parse_features(raw, source)


# Priorities are small numbers: ageing adds one step per AGEING_STEP seconds waited, so a
# difference of 1000 would take over eight hours to make up.
PRIORITY_LIMIT = 1000


def _fail(source: Source, raw: object, expected: str, hint: str | None = None) -> ConfigError:
    return ConfigError(f"{source.assignment(raw)}: expected {expected}", where=source.where,
                       hint=hint)


def _parse_seconds(raw: object, source: Source, default: object) -> float:
    value: float | None = None
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        value = float(raw)
    elif isinstance(raw, str):
        try:
            value = float(raw.strip())
        except ValueError:
            value = None
    if value is None or not math.isfinite(value) or value <= 0:
        raise _fail(source, raw, "seconds > 0",
                    f"give a number of seconds greater than 0, e.g. {_number(default)}")
    return value


def _number(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _parse_bool(raw: object, source: Source) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower() if isinstance(raw, (str, int)) else None
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise _fail(source, raw, "a yes/no value", "use 1/0, true/false or yes/no")


def _parse_int(raw: object, source: Source, low: int, expected: str, hint: str) -> int:
    value: int | None = None
    if isinstance(raw, int) and not isinstance(raw, bool):
        value = raw
    elif isinstance(raw, str) and raw.strip().isdigit():
        value = int(raw.strip())
    if value is None or value < low:
        raise _fail(source, raw, expected, hint)
    return value


def _parse_priority(raw: object, source: Source) -> int:
    value: int | None = None
    if isinstance(raw, int) and not isinstance(raw, bool):
        value = raw
    elif isinstance(raw, str):
        text = raw.strip()
        if text.lstrip("+-").isdigit() and text.count("-") + text.count("+") <= 1:
            value = int(text)
    if value is None or not -PRIORITY_LIMIT <= value <= PRIORITY_LIMIT:
        raise _fail(source, raw, f"a whole number from -{PRIORITY_LIMIT} to {PRIORITY_LIMIT}",
                    "e.g. 10 for PR jobs, 0 (the default), -10 for nightly runs")
    return value


def _parse_chip(raw: object, source: Source) -> str:
    if isinstance(raw, str) and raw in FARM_CHIPS:
        return raw
    guess = closest(raw, FARM_CHIPS) if isinstance(raw, str) else None
    raise _fail(source, raw, "one of " + ", ".join(FARM_CHIPS),
                f"did you mean {guess!r}?" if guess else "e.g. chip='esp32c3'")


def _parse_features(raw: object, source: Source) -> frozenset[str]:
    hint = "e.g. features=('mesh-radio', 'bme280')"
    # A single string is one feature; iterating it would give its letters.
    items: Iterable[object] = (raw,) if isinstance(raw, str) else ()
    if not isinstance(raw, str):
        if not isinstance(raw, (list, tuple, set, frozenset)):
            raise _fail(source, raw, "a list of feature names", hint)
        items = raw
    features: set[str] = set()
    for item in items:
        if not isinstance(item, str) or not _FEATURE_RE.fullmatch(item):
            raise _fail(source, raw, "feature names of letters, digits, '.', '_', '-'", hint)
        features.add(item)
    return frozenset(features)


def _to_path(text: str, base_dir: Path | None) -> Path:
    path = Path(text).expanduser()
    return base_dir / path if base_dir is not None and not path.is_absolute() else path


def _parse_path(raw: object, source: Source, base_dir: Path | None) -> Path:
    if isinstance(raw, os.PathLike):
        raw = os.fspath(raw)
    if not isinstance(raw, str) or not raw.strip():
        raise _fail(source, raw, "a file path", "e.g. rack-configs/my-rig.yaml")
    return _to_path(raw, base_dir)


def _parse_images(raw: object, source: Source, base_dir: Path | None) -> ImageSpec:
    if isinstance(raw, ImageSpec):
        return raw
    hint = ("give one image (or build directory) for every chip, and/or CHIP=IMAGE per chip, "
            "e.g. esp32=build/app.bin esp32c3=build-c3")
    items: list[tuple[str | None, object]]
    if isinstance(raw, Mapping):
        items = [(str(chip), path) for chip, path in raw.items()]
    elif isinstance(raw, (str, os.PathLike)):
        items = [_split_item(raw)]
    elif isinstance(raw, (list, tuple)):
        items = [_split_item(item) for item in raw]
    else:
        raise _fail(source, raw, "an image path or CHIP=PATH items", hint)
    if not items:
        raise _fail(source, raw, "at least one image", hint)
    any_chip: Path | None = None
    by_chip: dict[str, Path] = {}
    for chip, path in items:
        if isinstance(path, os.PathLike):
            path = os.fspath(path)
        if not isinstance(path, str) or not path.strip():
            raise _fail(source, raw, "an image path or CHIP=PATH items", hint)
        if chip is None:
            if any_chip is not None:
                raise _fail(source, raw, "at most one image without a chip", hint)
            any_chip = _to_path(path, base_dir)
            continue
        if chip not in FARM_CHIPS:
            guess = closest(chip, FARM_CHIPS)
            raise _fail(source, raw, f"a chip before '=' ({', '.join(FARM_CHIPS)}), got {chip!r}",
                        (f"did you mean {guess!r}? " if guess else "")
                        + "(a path containing '=' can be written as ./NAME=...)")
        if chip in by_chip:
            raise _fail(source, raw, f"one image per chip, got two for {chip}", hint)
        by_chip[chip] = _to_path(path, base_dir)
    return ImageSpec(any_chip, MappingProxyType(by_chip))


def _split_item(item: object) -> tuple[str | None, object]:
    if isinstance(item, str):
        match = _CHIP_ITEM_RE.fullmatch(item)
        if match:
            return match.group(1), match.group(2)
    return None, item


# --- layers from the places a value can come from -------------------------------------------


def rack_layer(rack: RackSpec) -> Layer:
    """The ``settings:`` section of a rack file, each value with its file and line."""
    return Layer("rack", {key: setting.value for key, setting in rack.settings.items()},
                 location=rack.source,
                 where=MappingProxyType({key: str(setting.where)
                                         for key, setting in rack.settings.items()}))


def ini_layer(getini: Callable[[str], object], inifile: str | os.PathLike[str] | None = None,
              *, base_dir: Path | None = None) -> Layer:
    """The ``hil_*`` ini keys, read through ``config.getini`` (registered from OPTIONS).

    Relative paths are taken from ``base_dir``, else the ini file's folder (as pytest does for
    its path keys).
    """
    values: dict[str, object] = {}
    for option in OPTIONS:
        value = getini(option.ini)
        if value is None or value == "" or value == []:
            continue
        if option.type == "images" and isinstance(value, str):
            # Registered as a plain string rather than "args": split it the same way.
            value = shlex.split(value)
        values[option.key] = value
    if base_dir is None and inifile is not None:
        base_dir = Path(inifile).parent
    return Layer("ini", values, location=str(inifile) if inifile is not None else "",
                 base_dir=base_dir)


def env_layer(environ: Mapping[str, str], base_dir: Path | None = None) -> Layer:
    """The ``HILFARM_*`` variables; an empty variable counts as unset.

    Image lists are split as a shell would (``esp32=a.bin "esp32c3=my dir/b.bin"``).
    """
    values: dict[str, object] = {}
    for option in OPTIONS:
        value = environ.get(option.env)
        if value is None or not value.strip():
            continue
        values[option.key] = shlex.split(value) if option.type == "images" else value
    return Layer("env", values, base_dir=base_dir)


def option_layer(namespace: Mapping[str, object] | object, base_dir: Path | None = None
                 ) -> Layer:
    """The ``--hil-*`` options from an argparse namespace (``config.option``).

    A mapping of option dest to value works too.
    """
    if isinstance(namespace, Mapping):
        values = {option.key: namespace.get(option.dest) for option in OPTIONS}
    else:
        values = {option.key: getattr(namespace, option.dest, None) for option in OPTIONS}
    return Layer("option", {key: value for key, value in values.items() if value is not None},
                 base_dir=base_dir)


def marker_layer(values: Mapping[str, object], where: str, base_dir: Path | None = None
                 ) -> Layer:
    """A test's marker values (from :func:`parse_hil_marker`); ``where`` names the test."""
    return Layer("marker", values, location=where, base_dir=base_dir)


def parse_hil_marker(args: Sequence[object], kwargs: Mapping[str, object], where: str, *,
                     base_dir: Path | None = None) -> dict[str, object]:
    """Check ``@pytest.mark.hil`` arguments strictly; return the given ones, parsed.

    Arguments left out (or given as None) are not in the result, so lower layers still apply.
    A wrong argument or value raises UsageError quoting the signature.
    """
    hint = f"the signature is {HIL_MARKER_SIGNATURE}"
    if len(args) > 1:
        raise UsageError(f"@pytest.mark.hil takes at most one positional argument (count), got "
                         f"{len(args)}: {tuple(args)!r}", where=where, hint=hint)
    given = dict(kwargs)
    if args:
        if "count" in given:
            raise UsageError("@pytest.mark.hil got count twice (positionally and by name)",
                             where=where, hint=hint)
        given["count"] = args[0]
    for name in given:
        if name in MARKER_KEYS:
            continue
        option = _OPTIONS_BY_KEY.get(name)
        if option is not None:
            raise UsageError(f"@pytest.mark.hil cannot set {name}: it is a farm-wide setting",
                             where=where,
                             hint=f"set it for the run with {option.option}, {option.env} or "
                                  f"ini {option.ini}; {hint}")
        guess = closest(name, MARKER_KEYS)
        raise UsageError(f"@pytest.mark.hil got an unknown argument {name!r}", where=where,
                         hint=(f"did you mean {guess!r}? " if guess else "") + hint)
    parsed: dict[str, object] = {}
    for name, raw in given.items():
        if raw is None:
            continue
        try:
            parsed[name] = parse_value(name, raw, Source("marker", name, where),
                                       base_dir=base_dir)
        except ConfigError as exc:
            raise UsageError(exc.what, where=exc.where,
                             hint=f"{exc.hint}; {hint}" if exc.hint else hint) from None
    return parsed

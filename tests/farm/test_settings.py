"""Settings: each precedence step, 0 and False kept, and errors naming their sources."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from pytest_hilfarm.description.rack import builtin_virtual_rack_path, load_rack
from pytest_hilfarm.description.settings import (
    HIL_MARKER_SIGNATURE,
    OPTIONS,
    ImageSpec,
    Layer,
    Settings,
    Source,
    env_layer,
    ini_layer,
    marker_layer,
    option_layer,
    parse_hil_marker,
    rack_layer,
    resolve,
    resolve_session,
)
from pytest_hilfarm.errors import ConfigError, UsageError

ENV = {"HOME": "/home/tester"}


def rack_with_settings(tmp_path: Path, settings: str) -> Path:
    path = tmp_path / "rack.yaml"
    path.write_text("version: 1\nname: r\nsettings:\n" + settings
                    + "boards: [{id: a, chip: esp32, port: virtual}]\n")
    return path


def options(*argv: str) -> argparse.Namespace:
    """Parse argv with exactly the arguments the plugin will register from OPTIONS."""
    parser = argparse.ArgumentParser()
    for spec in OPTIONS:
        parser.add_argument(spec.option, **spec.addoption_kwargs())
    return parser.parse_args(list(argv))


def ini(values: dict[str, object]):  # noqa: ANN201 - a getini stand-in
    return lambda name: values.get(name)


# --- precedence ----------------------------------------------------------------------------


def test_defaults() -> None:
    settings = resolve([])
    assert settings.rack == builtin_virtual_rack_path()
    assert (settings.firmware, settings.baseline) == (None, None)
    assert settings.lock_timeout == 300.0
    assert settings.no_flash is False
    assert settings.infra_retries == 0
    assert settings.boot_timeout == 15.0
    assert (settings.count, settings.chip, settings.features) == (1, None, frozenset())
    for key in ("rack", "lock_timeout", "count", "features"):
        assert str(settings.source_of(key)) == "default"


def precedence_layers(tmp_path: Path) -> list[Layer]:
    """One layer per step, each setting boot_timeout (the one key every step may set)."""
    rack = load_rack(rack_with_settings(tmp_path, "  boot_timeout: 20\n"), environ=ENV)
    return [
        rack_layer(rack),
        ini_layer(ini({"hil_boot_timeout": "21"}), inifile=tmp_path / "pytest.ini"),
        env_layer({"HILFARM_BOOT_TIMEOUT": "22"}),
        option_layer(options("--hil-boot-timeout", "23")),
        marker_layer(parse_hil_marker((), {"boot_timeout": 24}, "test_x"), "test_x"),
    ]


@pytest.mark.parametrize(
    ("steps", "value", "source"),
    [
        (0, 15.0, "default"),
        (1, 20.0, "rack file {rack}:4"),
        (2, 21.0, "ini hil_boot_timeout in {ini}"),
        (3, 22.0, "environment HILFARM_BOOT_TIMEOUT"),
        (4, 23.0, "option --hil-boot-timeout"),
        (5, 24.0, "marker @pytest.mark.hil on test_x"),
    ],
    ids=["default", "rack", "ini", "env", "option", "marker"],
)
def test_each_step_overrides_the_one_before(tmp_path: Path, steps: int, value: float,
                                            source: str) -> None:
    layers = precedence_layers(tmp_path)[:steps]
    expected = source.format(rack=tmp_path / "rack.yaml", ini=tmp_path / "pytest.ini")
    for ordered in (layers, layers[::-1]):  # the order they are passed in does not matter
        settings = resolve(ordered)
        assert settings.boot_timeout == value
        assert str(settings.source_of("boot_timeout")) == expected


@pytest.mark.parametrize(
    ("layers", "value", "source"),
    [
        ([Layer("rack", {"lock_timeout": 600}, where={"lock_timeout": "r.yaml:3"})], 600.0,
         "rack file r.yaml:3"),
        ([Layer("rack", {"lock_timeout": 600}, where={"lock_timeout": "r.yaml:3"}),
          Layer("ini", {"lock_timeout": "700"})], 700.0, "ini hil_lock_timeout"),
        ([Layer("ini", {"lock_timeout": "700"}), Layer("env", {"lock_timeout": "800"})], 800.0,
         "environment HILFARM_LOCK_TIMEOUT"),
        ([Layer("env", {"lock_timeout": "800"}), Layer("option", {"lock_timeout": "900"})],
         900.0, "option --hil-lock-timeout"),
    ],
    ids=["rack", "ini", "env", "option"],
)
def test_farm_wide_precedence(layers: list[Layer], value: float, source: str) -> None:
    settings = resolve(layers)
    assert settings.lock_timeout == value
    assert str(settings.source_of("lock_timeout")) == source


def test_later_layer_of_the_same_kind_wins() -> None:
    settings = resolve([Layer("env", {"infra_retries": "1"}), Layer("env", {"infra_retries": 2})])
    assert settings.infra_retries == 2


def test_none_means_not_given() -> None:
    settings = resolve([Layer("env", {"infra_retries": "3"}),
                        Layer("option", {"infra_retries": None})])
    assert settings.infra_retries == 3
    assert str(settings.source_of("infra_retries")) == "environment HILFARM_INFRA_RETRIES"


# --- 0 and False are values, not "unset" ---------------------------------------------------


def test_zero_retries_overrides_a_lower_layer() -> None:
    settings = resolve([Layer("rack", {"infra_retries": 3}, where={"infra_retries": "r:1"}),
                        option_layer(options("--hil-infra-retries", "0"))])
    assert settings.infra_retries == 0
    assert str(settings.source_of("infra_retries")) == "option --hil-infra-retries"


def test_false_overrides_true_from_a_lower_layer() -> None:
    settings = resolve([ini_layer(ini({"hil_no_flash": "true"})),
                        env_layer({"HILFARM_NO_FLASH": "0"})])
    assert settings.no_flash is False
    assert str(settings.source_of("no_flash")) == "environment HILFARM_NO_FLASH"
    settings = resolve([Layer("env", {"no_flash": "yes"}), Layer("option", {"no_flash": False})])
    assert settings.no_flash is False


def test_unset_flag_does_not_override_the_environment() -> None:
    namespace = options()  # --hil-no-flash not given
    assert namespace.hil_no_flash is None
    settings = resolve([env_layer({"HILFARM_NO_FLASH": "1"}), option_layer(namespace)])
    assert settings.no_flash is True
    assert resolve([option_layer(options("--hil-no-flash"))]).no_flash is True


def test_empty_environment_variable_counts_as_unset() -> None:
    layer = env_layer({"HILFARM_LOCK_TIMEOUT": "", "HILFARM_INFRA_RETRIES": "  "})
    assert dict(layer.values) == {}


def test_empty_marker_features_is_kept() -> None:
    parsed = parse_hil_marker((), {"features": ()}, "test_x")
    assert parsed == {"features": frozenset()}


# --- markers -------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["lock_timeout", "no_flash", "infra_retries", "rack", "baseline"])
def test_marker_may_not_set_farm_wide_keys(key: str) -> None:
    with pytest.raises(ConfigError) as info:
        resolve([Layer("marker", {key: "1"}, location="test_x")])
    message = str(info.value)
    assert message.startswith(f"test_x: {key} is a farm-wide setting; a marker cannot set it")
    assert f"--hil-{key.replace('_', '-')}" in message and f"HILFARM_{key.upper()}" in message
    with pytest.raises(UsageError) as usage:
        parse_hil_marker((), {key: "1"}, "test_x")
    assert f"cannot set {key}: it is a farm-wide setting" in str(usage.value)
    assert HIL_MARKER_SIGNATURE in str(usage.value)


@pytest.mark.parametrize(("key", "raw"), [("count", "2"), ("chip", "esp32"),
                                          ("features", "mesh-radio")])
def test_per_test_keys_come_only_from_a_marker(key: str, raw: str) -> None:
    with pytest.raises(ConfigError) as info:
        resolve([Layer("env", {key: raw})])
    assert f"{key} is a per-test setting" in str(info.value)
    assert f"@pytest.mark.hil({key}=...)" in str(info.value)


def test_rack_file_may_set_only_its_keys() -> None:
    with pytest.raises(ConfigError, match="a rack file cannot set firmware"):
        resolve([Layer("rack", {"firmware": "a.bin"}, where={"firmware": "r.yaml:2"})])


def test_marker_values_reach_the_settings(tmp_path: Path) -> None:
    parsed = parse_hil_marker(
        (3,), {"chip": "esp32", "features": ["mesh-radio"], "firmware": {"esp32": "fw.bin"},
               "boot_timeout": 30},
        "tests/test_mesh.py::test_mesh", base_dir=tmp_path)
    settings = resolve([Layer("option", {"firmware": ["other.bin"]}),
                        marker_layer(parsed, "tests/test_mesh.py::test_mesh")])
    assert settings.count == 3
    assert settings.chip == "esp32"
    assert settings.features == frozenset({"mesh-radio"})
    assert settings.firmware == ImageSpec(None, {"esp32": tmp_path / "fw.bin"})
    assert settings.boot_timeout == 30.0
    assert str(settings.source_of("count")) == (
        "marker @pytest.mark.hil on tests/test_mesh.py::test_mesh")


def test_marker_arguments_left_out_or_none_are_not_in_the_result() -> None:
    assert parse_hil_marker((), {}, "t") == {}
    assert parse_hil_marker((), {"chip": None, "firmware": None, "boot_timeout": None}, "t") == {}
    assert parse_hil_marker((), {"features": "bme280"}, "t") == {
        "features": frozenset({"bme280"})}


@pytest.mark.parametrize(
    ("args", "kwargs", "what", "hint"),
    [
        ((1, 2), {}, "at most one positional argument (count), got 2", None),
        ((2,), {"count": 2}, "got count twice", None),
        ((), {"cout": 2}, "unknown argument 'cout'", "did you mean 'count'?"),
        ((), {"chips": "esp32"}, "unknown argument 'chips'", "did you mean 'chip'?"),
        ((), {"count": 0}, "@pytest.mark.hil(count=0): expected a number of boards >= 1", None),
        ((), {"count": True}, "@pytest.mark.hil(count=True): expected a number of boards", None),
        ((), {"chip": "esp32c5"}, "expected one of esp32, esp32s2, esp32c3, esp32s3, esp32c6",
         "did you mean 'esp32c6'?"),
        ((), {"features": 5}, "expected a list of feature names", None),
        ((), {"features": ["ok", "not ok"]}, "feature names of letters", None),
        ((), {"boot_timeout": -1}, "@pytest.mark.hil(boot_timeout=-1): expected seconds > 0",
         None),
        ((), {"firmware": {"esp23": "a.bin"}}, "a chip before '='", "did you mean 'esp32'?"),
    ],
)
def test_wrong_marker_arguments_quote_the_signature(args: tuple[object, ...],
                                                   kwargs: dict[str, object], what: str,
                                                   hint: str | None) -> None:
    with pytest.raises(UsageError) as info:
        parse_hil_marker(args, kwargs, "tests/test_a.py::test_x")
    message = str(info.value)
    assert message.startswith("tests/test_a.py::test_x: "), message
    assert what in message
    assert HIL_MARKER_SIGNATURE in message
    if hint:
        assert hint in message


# --- source reporting and errors naming their source ---------------------------------------


@pytest.mark.parametrize(
    ("source", "text"),
    [
        (Source("default", "lock_timeout"), "default"),
        (Source("rack", "lock_timeout", "rack.yaml:12"), "rack file rack.yaml:12"),
        (Source("ini", "hil_lock_timeout"), "ini hil_lock_timeout"),
        (Source("env", "HILFARM_LOCK_TIMEOUT"), "environment HILFARM_LOCK_TIMEOUT"),
        (Source("option", "--hil-lock-timeout"), "option --hil-lock-timeout"),
        (Source("marker", "boot_timeout", "test_x"), "marker @pytest.mark.hil on test_x"),
    ],
)
def test_source_text(source: Source, text: str) -> None:
    assert str(source) == text


def test_source_of_unknown_key() -> None:
    with pytest.raises(UsageError, match="did you mean 'lock_timeout'"):
        resolve([]).source_of("lock_timout")


def test_rack_file_settings_carry_file_and_line(tmp_path: Path) -> None:
    path = rack_with_settings(tmp_path, "  infra_retries: 2\n  lock_timeout: abc\n")
    rack = load_rack(path, environ=ENV)
    with pytest.raises(ConfigError) as info:
        resolve([rack_layer(rack)])
    assert str(info.value).startswith(
        f"{path}:5: settings.lock_timeout='abc': expected seconds > 0")
    good = load_rack(rack_with_settings(tmp_path, "  infra_retries: 2\n"), environ=ENV)
    assert str(resolve([rack_layer(good)]).source_of("infra_retries")) == f"rack file {path}:4"


@pytest.mark.parametrize(
    ("layer", "start", "hint"),
    [
        (env_layer({"HILFARM_LOCK_TIMEOUT": "abc"}),
         "environment: HILFARM_LOCK_TIMEOUT='abc': expected seconds > 0", "e.g. 300"),
        (env_layer({"HILFARM_LOCK_TIMEOUT": "nan"}),
         "environment: HILFARM_LOCK_TIMEOUT='nan': expected seconds > 0", None),
        (env_layer({"HILFARM_BOOT_TIMEOUT": "inf"}),
         "environment: HILFARM_BOOT_TIMEOUT='inf': expected seconds > 0", "e.g. 15"),
        (env_layer({"HILFARM_NO_FLASH": "maybe"}),
         "environment: HILFARM_NO_FLASH='maybe': expected a yes/no value",
         "use 1/0, true/false or yes/no"),
        (ini_layer(ini({"hil_infra_retries": "1.5"}), inifile="/w/pytest.ini"),
         "/w/pytest.ini: hil_infra_retries='1.5': expected a number of retries >= 0", None),
        (option_layer(options("--hil-infra-retries", "-1")),
         "command line: --hil-infra-retries='-1': expected a number of retries >= 0", None),
        (option_layer(options("--hil-lock-timeout", "0")),
         "command line: --hil-lock-timeout='0': expected seconds > 0", None),
        (option_layer(options("--hil-rack", "")),
         "command line: --hil-rack='': expected a file path", None),
        (Layer("marker", {"boot_timeout": True}, location="test_y"),
         "test_y: @pytest.mark.hil(boot_timeout=True): expected seconds > 0", None),
        (Layer("option", {"bogus": 1}), "command line: unknown setting 'bogus'", None),
        (Layer("env", {"lock_timout": 1}), "environment: unknown setting 'lock_timout'",
         "did you mean 'lock_timeout'?"),
    ],
)
def test_bad_values_name_their_source(layer: Layer, start: str, hint: str | None) -> None:
    with pytest.raises(ConfigError) as info:
        resolve([layer])
    assert str(info.value).startswith(start), str(info.value)
    if hint:
        assert hint in str(info.value)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("1", True), ("0", False), ("true", True), ("False", False), (" YES ", True), ("no", False),
     (True, True), (False, False), (1, True), (0, False)],
)
def test_bool_spellings(raw: object, expected: bool) -> None:
    assert resolve([Layer("env", {"no_flash": raw})]).no_flash is expected


@pytest.mark.parametrize(("raw", "expected"), [("1e3", 1000.0), (" 2.5 ", 2.5), (7, 7.0)])
def test_seconds_spellings(raw: object, expected: float) -> None:
    assert resolve([Layer("env", {"lock_timeout": raw})]).lock_timeout == expected


# --- firmware / baseline images ------------------------------------------------------------


def test_single_firmware_image_is_for_every_chip() -> None:
    settings = resolve([option_layer(options("--hil-firmware", "build/app.bin"))])
    assert settings.firmware == ImageSpec(Path("build/app.bin"))
    assert settings.firmware.for_chip("esp32c3") == Path("build/app.bin")


def test_firmware_per_chip_from_repeated_options(tmp_path: Path) -> None:
    namespace = options("--hil-firmware", "esp32=a.bin", "--hil-firmware", "esp32c3=build-c3",
                        "--hil-firmware", "any.bin")
    settings = resolve([option_layer(namespace, base_dir=tmp_path)])
    firmware = settings.firmware
    assert firmware is not None
    assert firmware.for_chip("esp32") == tmp_path / "a.bin"
    assert firmware.for_chip("esp32c3") == tmp_path / "build-c3"
    assert firmware.for_chip("esp32s2") == tmp_path / "any.bin"


def test_firmware_from_environment_is_split_like_a_shell() -> None:
    layer = env_layer({"HILFARM_FIRMWARE": 'esp32=a.bin "esp32s2=my dir/b.bin"'})
    firmware = resolve([layer]).firmware
    assert firmware == ImageSpec(None, {"esp32": Path("a.bin"), "esp32s2": Path("my dir/b.bin")})


def test_ini_paths_are_relative_to_the_ini_file() -> None:
    layer = ini_layer(ini({"hil_baseline": ["esp32=base.bin"], "hil_rack": "racks/rig.yaml"}),
                      inifile="/proj/pytest.ini")
    settings = resolve([layer])
    assert settings.baseline == ImageSpec(None, {"esp32": Path("/proj/base.bin")})
    assert settings.rack == Path("/proj/racks/rig.yaml")
    assert str(settings.source_of("rack")) == "ini hil_rack in /proj/pytest.ini"


def test_rack_path_expands_home() -> None:
    settings = resolve([env_layer({"HILFARM_RACK": "~/rigs/r.yaml"})])
    assert settings.rack == Path("~/rigs/r.yaml").expanduser()


@pytest.mark.parametrize(
    ("raw", "what"),
    [
        (["a.bin", "b.bin"], "at most one image without a chip"),
        (["esp32=a.bin", "esp32=b.bin"], "one image per chip, got two for esp32"),
        (["esp32="], "an image path or CHIP=PATH items"),
        ([], "at least one image"),
        (["esp23=a.bin"], "a chip before '='"),
        (5, "an image path or CHIP=PATH items"),
    ],
)
def test_bad_firmware(raw: object, what: str) -> None:
    with pytest.raises(ConfigError) as info:
        resolve([Layer("option", {"firmware": raw})])
    assert str(info.value).startswith("command line: --hil-firmware=")
    assert what in str(info.value)


def test_path_with_equals_sign_can_be_given_as_relative_path() -> None:
    firmware = resolve([Layer("option", {"firmware": ["./odd=name.bin"]})]).firmware
    assert firmware == ImageSpec(Path("odd=name.bin"))


# --- the OPTIONS table ---------------------------------------------------------------------


def test_options_table_names_every_key_consistently() -> None:
    assert [spec.key for spec in OPTIONS] == [
        "rack", "firmware", "baseline", "lock_timeout", "no_flash", "infra_retries",
        "boot_timeout", "addr2line", "log_dir", "priority", "quarantine"]
    for spec in OPTIONS:
        assert spec.option == "--hil-" + spec.key.replace("_", "-")
        assert spec.ini == spec.dest == "hil_" + spec.key
        assert spec.env == "HILFARM_" + spec.key.upper()
        assert spec.help
        assert spec.addoption_kwargs()["default"] is None
        assert spec.addoption_kwargs()["help"] == spec.addini_kwargs()["help"] == spec.help
        assert spec.addini_kwargs()["default"] is None


def test_option_kinds() -> None:
    kinds = {spec.key: spec.addoption_kwargs().get("action") for spec in OPTIONS}
    assert kinds["no_flash"] == "store_true"
    assert kinds["firmware"] == kinds["baseline"] == "append"
    ini_types = {spec.key: spec.addini_kwargs()["type"] for spec in OPTIONS}
    assert ini_types["firmware"] == "args"
    assert ini_types["lock_timeout"] == "string"


def test_settings_are_frozen() -> None:
    settings = resolve([])
    assert isinstance(settings, Settings)
    with pytest.raises(AttributeError):
        settings.lock_timeout = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        settings.sources["rack"] = Source("env", "X")  # type: ignore[index]


# --- session helpers the plugin uses --------------------------------------------------------


def test_resolve_session_reads_the_chosen_racks_settings(tmp_path: Path) -> None:
    path = rack_with_settings(tmp_path, "  lock_timeout: 600\n  infra_retries: 2\n")
    settings = resolve_session(
        option_values={"hil_infra_retries": "0"},
        getini=ini({"hil_rack": "rack.yaml"}),
        environ={**ENV, "HILFARM_BOOT_TIMEOUT": "9"},
        rootdir=tmp_path,
    )
    assert settings.rack == path
    assert settings.lock_timeout == 600.0
    assert str(settings.source_of("lock_timeout")) == f"rack file {path}:4"
    assert settings.infra_retries == 0  # the option beats the rack file
    assert settings.boot_timeout == 9.0


def test_resolve_session_defaults_to_the_virtual_rack() -> None:
    settings = resolve_session(environ=ENV)
    assert settings.rack == builtin_virtual_rack_path()
    assert settings.lock_timeout == 300.0


def test_resolve_session_names_who_chose_a_missing_rack(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        resolve_session(environ={**ENV, "HILFARM_RACK": str(tmp_path / "gone.yaml")})
    assert "rack file not found (chosen by environment HILFARM_RACK)" in str(info.value)


def test_for_test_puts_the_marker_on_top() -> None:
    session = resolve([env_layer({"HILFARM_BOOT_TIMEOUT": "9", "HILFARM_LOCK_TIMEOUT": "50"})])
    per_test = session.for_test(parse_hil_marker((2,), {"boot_timeout": 40}, "t"), where="t")
    assert (per_test.count, per_test.boot_timeout, per_test.lock_timeout) == (2, 40.0, 50.0)
    assert str(per_test.source_of("boot_timeout")) == "marker @pytest.mark.hil on t"
    assert (session.count, session.boot_timeout) == (1, 9.0)  # the session record is unchanged


def test_option_kind_and_ini_strings_for_image_lists() -> None:
    kinds = {spec.key: spec.kind for spec in OPTIONS}
    assert (kinds["no_flash"], kinds["firmware"], kinds["rack"]) == ("bool", "multi", "value")
    layer = ini_layer(ini({"hil_firmware": "esp32=a.bin esp32c3=b.bin"}))
    assert resolve([layer]).firmware == ImageSpec(None, {"esp32": Path("a.bin"),
                                                         "esp32c3": Path("b.bin")})


# --- the run's priority for boards ----------------------------------------------------------


def test_priority_from_every_place_and_its_errors(tmp_path: Path) -> None:
    assert resolve([]).priority == 0
    layers = [ini_layer(ini({"hil_priority": "-10"}), inifile=tmp_path / "pytest.ini"),
              env_layer({"HILFARM_PRIORITY": "+3"})]
    assert resolve(layers[:1]).priority == -10
    assert resolve(layers).priority == 3
    chosen = resolve([*layers, option_layer(options("--hil-priority", "10"))])
    assert chosen.priority == 10 and str(chosen.source_of("priority")) == "option --hil-priority"
    for bad in ("high", "1.5", "--1", "1001"):
        with pytest.raises(ConfigError, match="HILFARM_PRIORITY") as info:
            resolve([env_layer({"HILFARM_PRIORITY": bad})])
        assert "-1000 to 1000" in str(info.value)
    with pytest.raises(ConfigError, match="farm-wide"):
        resolve([marker_layer({"priority": 5}, "test_x")])

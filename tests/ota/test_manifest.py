"""Signed release manifests: round trip, expiry, tampering, wrong key, image mismatch."""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from pytest_hilfarm.errors import ConfigError, ImageError, SignatureError, UsageError
from pytest_hilfarm.ota.keys import generate_signing_key, load_private_key, write_public_key
from pytest_hilfarm.ota.manifest import (
    FORMAT,
    ManifestError,
    make_release,
    read_manifest,
    verify_release,
    write_manifest,
)
from pytest_hilfarm.rollout.manifest import manifest_from_dict as rollout_manifest_from_dict
from pytest_hilfarm.sim.appbuild import build_app

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def release_keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    d = tmp_path_factory.mktemp("release-keys")
    key = generate_signing_key(d / "release.pem", "ed25519")
    other = generate_signing_key(d / "other.pem", "ed25519")
    return key, write_public_key(key, d / "release.pub"), write_public_key(other, d / "other.pub")


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "app.bin"
    p.write_bytes(build_app("esp32c3", "fleetapp", "2.1.0", secure_version=3))
    return p


@pytest.fixture
def manifest_file(tmp_path: Path, image: Path, release_keys: tuple[Path, Path, Path]) -> Path:
    m = make_release(image, release_keys[0], url="https://fw.example/app.bin",
                     expires_in=timedelta(days=7), now=NOW)
    return write_manifest(m, tmp_path / "release.json")


def _edit(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            data.pop(k)
        else:
            data[k] = v
    path.write_text(json.dumps(data))


def test_round_trip(manifest_file: Path, image: Path, release_keys: tuple[Path, Path, Path]
                    ) -> None:
    m = verify_release(manifest_file, image, release_keys[1], now=NOW + timedelta(days=1))
    assert (m.chip, m.project, m.version, m.secure_version) == ("esp32c3", "fleetapp", "2.1.0", 3)
    assert m.size == image.stat().st_size and len(m.sha256) == 64
    assert (m.created, m.expires) == ("2026-11-28T12:00:00Z", "2026-12-05T12:00:00Z")
    assert m.format == FORMAT and m.sig_scheme == "ed25519"
    # The private key file can stand in for the public one.
    verify_release(manifest_file, None, release_keys[0], now=NOW)


def test_rollout_reader_accepts_it(manifest_file: Path) -> None:
    data = json.loads(manifest_file.read_text())
    ro = rollout_manifest_from_dict(data, str(manifest_file))
    assert ro.url == "https://fw.example/app.bin" and ro.secure_version == 3
    assert ro.signature == data["signature"] and ro.chip == "esp32c3"


def test_expired_refused(manifest_file: Path, release_keys: tuple[Path, Path, Path]) -> None:
    with pytest.raises(SignatureError, match="expired at 2026-12-05T12:00:00Z"):
        verify_release(manifest_file, None, release_keys[1], now=NOW + timedelta(days=7))


def test_tampered_field_refused(manifest_file: Path, release_keys: tuple[Path, Path, Path]
                                ) -> None:
    _edit(manifest_file, secure_version=9)
    with pytest.raises(SignatureError, match="does not verify"):
        verify_release(manifest_file, None, release_keys[1], now=NOW)


def test_extended_expiry_refused(manifest_file: Path, release_keys: tuple[Path, Path, Path]
                                 ) -> None:
    _edit(manifest_file, expires="2099-01-01T00:00:00Z")
    with pytest.raises(SignatureError, match="does not verify"):
        verify_release(manifest_file, None, release_keys[1], now=NOW + timedelta(days=30))


def test_unsigned_refused(manifest_file: Path, release_keys: tuple[Path, Path, Path]) -> None:
    _edit(manifest_file, signature=None)
    with pytest.raises(SignatureError, match="unsigned"):
        verify_release(manifest_file, None, release_keys[1], now=NOW)


def test_added_field_refused(manifest_file: Path, release_keys: tuple[Path, Path, Path]) -> None:
    _edit(manifest_file, force=True)
    with pytest.raises(SignatureError, match="unknown manifest field"):
        verify_release(manifest_file, None, release_keys[1], now=NOW)


def test_wrong_key_refused(manifest_file: Path, release_keys: tuple[Path, Path, Path]) -> None:
    with pytest.raises(SignatureError, match="not the trusted key"):
        verify_release(manifest_file, None, release_keys[2], now=NOW)


def test_other_image_refused(tmp_path: Path, manifest_file: Path,
                             release_keys: tuple[Path, Path, Path]) -> None:
    other = tmp_path / "other.bin"
    data = bytearray(build_app("esp32c3", "fleetapp", "2.1.1", secure_version=3))
    other.write_bytes(data)
    with pytest.raises(ImageError, match="does not match manifest|manifest says"):
        verify_release(manifest_file, other, release_keys[1], now=NOW)
    m = read_manifest(manifest_file)
    data = data[: m.size].ljust(m.size, b"\xff")
    other.write_bytes(data)
    with pytest.raises(ImageError, match="sha256 .* does not match manifest"):
        verify_release(manifest_file, other, release_keys[1], now=NOW)


def test_chip_mismatch_refused(tmp_path: Path, image: Path, manifest_file: Path,
                               release_keys: tuple[Path, Path, Path]) -> None:
    # A manifest correctly signed but claiming another chip (a release-process mistake).
    m = replace(read_manifest(manifest_file), chip="esp32", signature=None)
    sig = load_private_key(release_keys[0]).sign(m.signed_bytes())  # type: ignore[call-arg]
    forged = write_manifest(replace(m, signature=base64.b64encode(sig).decode()),
                            tmp_path / "chip.json")
    with pytest.raises(ImageError, match="image is for esp32c3, manifest says esp32"):
        verify_release(forged, image, release_keys[1], now=NOW)


def test_release_arguments_checked(image: Path, release_keys: tuple[Path, Path, Path]) -> None:
    with pytest.raises(UsageError, match="expiry must be in the future"):
        make_release(image, release_keys[0], expires_in=timedelta(0))
    with pytest.raises(UsageError, match="not an http"):
        make_release(image, release_keys[0], url="ftp://x/app.bin")
    no_url = make_release(image, release_keys[0], now=NOW)
    assert "url" not in no_url.to_dict() and no_url.signature


@pytest.fixture(scope="session")
def rsa_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # RSA-3072 keygen is slow: every OTA test module reuses the keys in the session's basetemp.
    d = tmp_path_factory.getbasetemp() / "ota-session-keys"
    d.mkdir(exist_ok=True)
    p = d / "k1.pem"
    if not p.exists():
        generate_signing_key(p)
    return p


def test_rsa_release_key(tmp_path: Path, image: Path, rsa_key: Path) -> None:
    m = make_release(image, rsa_key, now=NOW)
    assert m.sig_scheme == "rsa-pss-sha256"
    path = write_manifest(m, tmp_path / "m.json")
    verify_release(path, image, rsa_key, now=NOW)


EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "rollout"


def test_the_example_manifest_is_a_real_signed_release() -> None:
    m = verify_release(EXAMPLES / "manifest.json", None, EXAMPLES / "release.pub.pem",
                       now=datetime(2026, 12, 4, tzinfo=timezone.utc))
    assert (m.format, m.version, m.chip, m.secure_version) == (FORMAT, "2.4.0", "esp32c3", 3)


def test_one_reader_for_release_and_rollout(tmp_path: Path, image: Path,
                                            release_keys: tuple[Path, Path, Path]) -> None:
    """What `hilfarm ota release` writes without --url, the rollout reads (and starts)."""
    from pytest_hilfarm.cli import main
    from pytest_hilfarm.rollout import manifest as rollout_manifest

    assert rollout_manifest.load_manifest is read_manifest  # the same code, not a copy
    out = tmp_path / "release.json"
    assert main(["ota", "release", str(image), "--key", str(release_keys[0]), "-o",
                 str(out)]) == 0
    assert "url" not in json.loads(out.read_text())
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"name: fw\nartifact: {{manifest: {out}}}\ngates: {{hil: {{required: "
                    "false}}\n")
    db = str(tmp_path / "r.sqlite")
    assert main(["rollout", "start", "--plan", str(plan), "--db", db,
                 "--release-pubkey", str(release_keys[1]), "--staging-since",
                 "2026-01-01T00:00:00Z"]) == 0
    assert main(["rollout", "export", "--plan", str(plan), "--format", "aws"]) == 2


def test_pre_format_manifests_are_refused_with_the_way_forward(tmp_path: Path) -> None:
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"url": "https://x/app.bin", "sha256": "ab" * 32, "size": 10,
                               "chip": "esp32c3", "version": "2.4.0", "secure_version": 3}))
    with pytest.raises(ManifestError, match="lacks project, created, expires") as exc:
        read_manifest(old)
    assert "hilfarm ota release" in (exc.value.hint or "")
    assert isinstance(exc.value, ConfigError) and isinstance(exc.value, SignatureError)

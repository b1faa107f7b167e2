"""Key files: creation through espsecure, permissions, digests, public keys, HSM config."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import espsecure
import pytest

from pytest_hilfarm.errors import ConfigError, UsageError
from pytest_hilfarm.ota.keys import (
    HsmConfig,
    check_private_key_file,
    generate_signing_key,
    key_digest,
    load_private_key,
    load_public_key,
    parse_digest,
    public_key_pem,
    write_public_key,
)
from pytest_hilfarm.ota.signing import sign_image
from pytest_hilfarm.sim.appbuild import build_app


@pytest.fixture(scope="session")
def rsa_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # RSA-3072 keygen is slow: every OTA test module reuses the keys in the session's basetemp.
    d = tmp_path_factory.getbasetemp() / "ota-session-keys"
    d.mkdir(exist_ok=True)
    p = d / "k1.pem"
    if not p.exists():
        generate_signing_key(p)
    return p


def test_generated_key_is_0600_rsa3072(rsa_key: Path) -> None:
    assert rsa_key.stat().st_mode & 0o777 == 0o600
    key = load_private_key(rsa_key)
    assert key.key_size == 3072  # type: ignore[union-attr]
    assert b"BEGIN RSA PRIVATE KEY" in rsa_key.read_bytes()  # espsecure's format


def test_keygen_leaves_no_temp_files(tmp_path: Path) -> None:
    path = generate_signing_key(tmp_path / "rel.pem", "ed25519")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rel.pem"]
    assert path.stat().st_mode & 0o777 == 0o600


def test_keygen_refuses_to_overwrite(rsa_key: Path) -> None:
    before = rsa_key.read_bytes()
    with pytest.raises(UsageError, match="already exists"):
        generate_signing_key(rsa_key)
    assert rsa_key.read_bytes() == before


def test_keygen_unknown_scheme(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="unknown key scheme"):
        generate_signing_key(tmp_path / "k.pem", "rsa1024")


def test_group_readable_key_refused_with_chmod_hint(tmp_path: Path, rsa_key: Path) -> None:
    loose = tmp_path / "loose.pem"
    loose.write_bytes(rsa_key.read_bytes())
    os.chmod(loose, 0o644)
    with pytest.raises(UsageError) as err:
        load_private_key(loose)
    text = str(err.value)
    assert f"chmod 600 {loose}" in text and "0644" in text
    assert "PRIVATE KEY" not in text
    os.chmod(loose, 0o600)
    assert check_private_key_file(loose) == loose


def test_missing_key_file(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        check_private_key_file(tmp_path / "nope.pem")


def test_unparseable_key_error_does_not_echo_content(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    secret = "-----BEGIN PRIVATE KEY-----\nSECRETSECRETSECRET\n-----END PRIVATE KEY-----\n"
    bad.write_text(secret)
    os.chmod(bad, 0o600)
    with pytest.raises(UsageError) as err:
        load_private_key(bad)
    assert "SECRETSECRET" not in str(err.value)


def test_digest_matches_espsecure_and_signature_block(tmp_path: Path, rsa_key: Path) -> None:
    ours = key_digest(rsa_key)
    out = tmp_path / "digest.bin"
    with rsa_key.open("rb") as f:
        espsecure.digest_sbv2_public_key(f, str(out))
    assert ours == out.read_bytes()
    signed = sign_image(build_app("esp32c3", "keys", "1.0.0"), [rsa_key])
    sector = len(signed) - 4096
    assert hashlib.sha256(signed[sector + 36 : sector + 812]).digest() == ours


def test_public_key_extraction(tmp_path: Path, rsa_key: Path) -> None:
    pub = write_public_key(rsa_key, tmp_path / "k1.pub.pem")
    text = pub.read_bytes()
    assert text.startswith(b"-----BEGIN PUBLIC KEY-----") and b"PRIVATE" not in text
    assert key_digest(pub) == key_digest(rsa_key)
    assert public_key_pem(rsa_key) == text
    assert load_public_key(pub).key_size == 3072  # type: ignore[union-attr]


def test_ed25519_key_has_no_sbv2_digest(tmp_path: Path) -> None:
    rel = generate_signing_key(tmp_path / "rel.pem", "ed25519")
    with pytest.raises(UsageError, match="release-manifest key"):
        key_digest(rel)


def test_parse_digest_forms() -> None:
    raw = bytes(range(32))
    assert parse_digest(raw.hex()) == raw
    assert parse_digest(" ".join(f"{b:02x}" for b in raw)) == raw  # espsecure's print format
    with pytest.raises(UsageError, match="64 hex digits"):
        parse_digest("abcd")


def _write_hsm(tmp_path: Path, body: str, mode: int = 0o600) -> Path:
    p = tmp_path / "hsm.ini"
    p.write_text(body)
    os.chmod(p, mode)
    return p


def test_hsm_config_checks(tmp_path: Path) -> None:
    good = "[hsm_config]\npkcs11_lib = /usr/lib/softhsm/libsofthsm2.so\nslot = 0\nlabel = k\n"
    assert HsmConfig.load(_write_hsm(tmp_path, good)).path.name == "hsm.ini"
    with pytest.raises(ConfigError, match=r"no \[hsm_config\] section"):
        HsmConfig.load(_write_hsm(tmp_path, "[other]\nx = 1\n"))
    with pytest.raises(ConfigError, match="lacks label"):
        HsmConfig.load(_write_hsm(tmp_path, "[hsm_config]\npkcs11_lib = x\nslot = 0\n"))
    with pytest.raises(ConfigError, match="chmod 600"):
        HsmConfig.load(_write_hsm(tmp_path, good + "credentials = 1234\n", 0o644))

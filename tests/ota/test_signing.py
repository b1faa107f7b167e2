"""Secure Boot V2 signing through espsecure and this project's digest-based verifier."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path
from typing import Any

import espsecure
import esptool
import pytest

from pytest_hilfarm.errors import SignatureError, UsageError
from pytest_hilfarm.ota.keys import generate_signing_key, key_digest
from pytest_hilfarm.ota.signing import (
    load_signing_keys,
    max_signature_blocks,
    sign_image,
    signature_info,
    verify_block,
    verify_image,
)
from pytest_hilfarm.sim.appbuild import build_app

BLOCK = 1216


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    # RSA-3072 keygen is slow: every OTA test module reuses the keys in the session's basetemp.
    d = tmp_path_factory.getbasetemp() / "ota-session-keys"
    d.mkdir(exist_ok=True)
    out = []
    for name in ("k1.pem", "k2.pem"):
        p = d / name
        if not p.exists():
            generate_signing_key(p)
        out.append(p)
    return out[0], out[1]


@pytest.fixture(scope="module")
def c3_image() -> bytes:
    return build_app("esp32c3", "signdemo", "1.2.0", secure_version=2)


@pytest.fixture(scope="module")
def c3_two(c3_image: bytes, keys: tuple[Path, Path]) -> bytes:
    return sign_image(c3_image, list(keys))


def _espsecure_verify(signed: bytes, key: Path) -> None:
    data = io.BytesIO(signed)
    with key.open("rb") as k:
        espsecure.verify_signature(version="2", hsm=False, hsm_config=None, keyfile=k,
                                   datafile=data)


def _sector(signed: bytes) -> int:
    return len(signed) - 4096


@pytest.mark.parametrize("chip", ["esp32", "esp32c3"])
def test_round_trip_and_espsecure_agrees(chip: str, keys: tuple[Path, Path],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    image = build_app(chip, "signdemo", "1.0.0")
    signed = sign_image(image, [keys[0]])
    assert capsys.readouterr().out == ""  # espsecure's chatter is captured
    assert signed[: len(image)] == image
    assert len(signed) % 4096 == 0 and signed[len(image) : _sector(signed)].count(0xFF) == \
        _sector(signed) - len(image)
    result = verify_image(signed, [keys[0]])
    assert result.chip == chip and result.accepted_by == 0
    assert result.blocks[0].status == "trusted"
    assert verify_image(signed, [key_digest(keys[0]).hex()]).accepted_by == 0
    _espsecure_verify(signed, keys[0])  # espsecure's own verifier accepts our output


def test_verbose_shows_espsecure_output(c3_image: bytes, keys: tuple[Path, Path],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    sign_image(c3_image, [keys[0]], verbose=True)
    assert "signing key(s) found" in capsys.readouterr().out


def test_signature_info_lists_key_digests(c3_two: bytes, keys: tuple[Path, Path]) -> None:
    info = signature_info(c3_two)
    assert [b.index for b in info] == [0, 1]
    assert [b.key_digest for b in info] == [key_digest(k) for k in keys]
    assert all(b.crc_ok and b.digest_ok and b.scheme == "RSA-3072" for b in info)
    assert signature_info(build_app("esp32c3", "x", "1")) == ()


def test_tampered_content_names_block(c3_two: bytes, keys: tuple[Path, Path]) -> None:
    bad = bytearray(c3_two)
    bad[0x200] ^= 0x01  # inside the DROM segment data
    with pytest.raises(SignatureError) as err:
        verify_image(bytes(bad), [keys[0]])
    assert "signature block 0" in str(err.value)
    assert "modified after signing" in str(err.value)
    with pytest.raises(esptool.FatalError):  # espsecure agrees it is broken
        _espsecure_verify(bytes(bad), keys[0])


def test_tampered_signature_block_crc(c3_two: bytes, keys: tuple[Path, Path]) -> None:
    bad = bytearray(c3_two)
    bad[_sector(c3_two) + BLOCK + 900] ^= 0x40  # block 1's signature bytes
    with pytest.raises(SignatureError, match="signature block 1: CRC32 mismatch"):
        verify_image(bytes(bad), [keys[0]])


def test_tampered_signature_with_fixed_crc(c3_two: bytes, keys: tuple[Path, Path]) -> None:
    # An attacker who also fixes the CRC is caught by the RSA-PSS check.
    bad = bytearray(c3_two)
    start = _sector(c3_two) + BLOCK
    bad[start + 900] ^= 0x40
    struct.pack_into("<I", bad, start + 1196, zlib.crc32(bytes(bad[start : start + 1196])))
    with pytest.raises(SignatureError, match="signature block 1: RSA-PSS signature does not "
                                             "verify"):
        verify_image(bytes(bad), [keys[0]])
    with pytest.raises(esptool.FatalError):  # espsecure: block 1 fails, block 0 is key 1's
        _espsecure_verify(bytes(bad), keys[1])


def test_tampered_key_in_block(c3_two: bytes, keys: tuple[Path, Path]) -> None:
    bad = bytearray(c3_two)
    start = _sector(c3_two)
    bad[start + 500] ^= 0x01  # R (Montgomery constant) of block 0
    struct.pack_into("<I", bad, start + 1196, zlib.crc32(bytes(bad[start : start + 1196])))
    with pytest.raises(SignatureError, match="signature block 0: Montgomery"):
        verify_image(bytes(bad), [keys[0]])


def test_three_blocks_on_c3_and_a_fourth_refused(c3_two: bytes, keys: tuple[Path, Path]) -> None:
    three = sign_image(c3_two, [keys[0]], append=True)  # rotation: a third block
    info = signature_info(three)
    assert len(info) == 3 and info[2].key_digest == key_digest(keys[0])
    assert verify_image(three, [keys[1]]).accepted_by == 1
    _espsecure_verify(three, keys[1])
    with pytest.raises(UsageError, match="at most 3 signature block"):
        sign_image(three, [keys[1]], append=True)


def test_revoked_key_block_is_ignored(c3_two: bytes, keys: tuple[Path, Path]) -> None:
    d0, d1 = key_digest(keys[0]), key_digest(keys[1])
    result = verify_image(c3_two, [d0, d1], revoked=[d0])
    assert result.accepted_by == 1
    assert [v.status for v in result.blocks] == ["revoked", "trusted"]
    with pytest.raises(SignatureError, match=r"block 0 [0-9a-f]{16}\.\.\. \(revoked\)"):
        verify_image(c3_two, [d0], revoked=[d0.hex()])


def test_untrusted_and_unsigned(c3_image: bytes, c3_two: bytes, keys: tuple[Path, Path]) -> None:
    with pytest.raises(SignatureError, match="no signature block is from a trusted"):
        verify_image(c3_two, [bytes(32)])
    with pytest.raises(SignatureError, match="image is not signed"):
        verify_image(c3_image, [keys[0]])
    with pytest.raises(UsageError, match="no trusted key"):
        verify_image(c3_two, [])


def test_esp32_limits(keys: tuple[Path, Path]) -> None:
    assert max_signature_blocks("esp32") == 1 and max_signature_blocks("esp32c3") == 3
    image = build_app("esp32", "signdemo", "1.0.0")
    signed = sign_image(image, [keys[0]])
    with pytest.raises(UsageError, match="cannot be\nappended|cannot be appended"):
        sign_image(signed, [keys[1]], append=True)
    with pytest.raises(UsageError, match="esp32 takes at most 1 signature block"):
        sign_image(image, list(keys))


def test_signing_a_signed_image_without_append_refused(c3_two: bytes,
                                                       keys: tuple[Path, Path]) -> None:
    with pytest.raises(UsageError, match="already signed"):
        sign_image(c3_two, [keys[0]])


def test_loose_key_refused_before_signing(tmp_path: Path, c3_image: bytes,
                                          keys: tuple[Path, Path]) -> None:
    loose = tmp_path / "loose.pem"
    loose.write_bytes(keys[0].read_bytes())
    loose.chmod(0o640)
    with pytest.raises(UsageError, match="chmod 600"):
        sign_image(c3_image, [loose])


def test_hsm_config_passes_through(tmp_path: Path, c3_image: bytes,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "hsm.ini"
    cfg.write_text("[hsm_config]\npkcs11_lib = /x.so\nslot = 0\nlabel = k\ncredentials = 1\n")
    cfg.chmod(0o600)
    seen: dict[str, Any] = {}

    def fake_sign_data(**kw: Any) -> None:
        seen.update(kw, hsm_text=kw["hsm_config"].read())
        Path(kw["output"]).write_bytes(b"signed")

    monkeypatch.setattr(espsecure, "sign_data", fake_sign_data)
    assert sign_image(c3_image, hsm_config=cfg) == b"signed"
    assert seen["hsm"] is True and seen["keyfile"] == [] and seen["version"] == "2"
    assert "pkcs11_lib" in seen["hsm_text"]
    with pytest.raises(UsageError, match="not both"):
        sign_image(c3_image, [tmp_path / "k.pem"], hsm_config=cfg)


def test_preloaded_keys_give_the_same_layout(c3_image: bytes, c3_two: bytes,
                                             keys: tuple[Path, Path]) -> None:
    loaded = load_signing_keys(list(keys))
    assert "PRIVATE" not in repr(loaded) and "private_keys" not in repr(loaded)
    fast = sign_image(c3_image, loaded)
    # RSA-PSS is salted, so only the signature bytes differ from the key-file path.
    assert len(fast) == len(c3_two) and fast[: _sector(fast)] == c3_two[: _sector(c3_two)]
    assert [b.key_digest for b in signature_info(fast)] == \
        [b.key_digest for b in signature_info(c3_two)]
    assert verify_image(fast, [keys[1]]).accepted_by == 1
    _espsecure_verify(fast, keys[0])
    three = sign_image(fast, load_signing_keys([keys[0]]), append=True)
    assert len(signature_info(three)) == 3 and verify_image(three, [keys[0]]).accepted_by == 0
    _espsecure_verify(three, keys[1])
    with pytest.raises(UsageError, match="at most 3"):
        sign_image(three, loaded, append=True)


def test_preloaded_keys_must_be_rsa3072(tmp_path: Path) -> None:
    rel = generate_signing_key(tmp_path / "rel.pem", "ed25519")
    with pytest.raises(UsageError, match="not an RSA-3072 key"):
        load_signing_keys([rel])


def test_verify_block_fits_the_virtual_bootloader_hook(c3_two: bytes) -> None:
    import hashlib

    from pytest_hilfarm.esp.image import parse_image

    sector = parse_image(c3_two).signature_sector
    assert sector is not None
    digest = hashlib.sha256(c3_two[: sector.offset]).digest()
    assert all(verify_block(b, digest) for b in sector.blocks)
    assert not verify_block(sector.blocks[0], bytes(32))
    bad = bytearray(c3_two)
    start = sector.offset
    bad[start + 900] ^= 1
    struct.pack_into("<I", bad, start + 1196, zlib.crc32(bytes(bad[start : start + 1196])))
    tampered = parse_image(bytes(bad)).signature_sector
    assert tampered is not None and not verify_block(tampered.blocks[0], digest)


def test_hsm_without_pkcs11_explains(tmp_path: Path, c3_image: bytes) -> None:
    try:
        import pkcs11  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("python-pkcs11 is installed; the missing-module path cannot be shown")
    cfg = tmp_path / "hsm.ini"
    cfg.write_text("[hsm_config]\npkcs11_lib = /x.so\nslot = 0\nlabel = k\ncredentials = 1\n")
    cfg.chmod(0o600)
    with pytest.raises(UsageError, match="pip install python-pkcs11"):
        sign_image(c3_image, hsm_config=cfg)

"""``hilfarm ota ...`` end to end through ``pytest_hilfarm.cli.main``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pytest_hilfarm.cli import main
from pytest_hilfarm.esp.partitions import two_ota_layout
from pytest_hilfarm.ota.keys import generate_signing_key, key_digest
from pytest_hilfarm.sim.appbuild import build_app


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


def _secret_lines(key: Path) -> list[str]:
    """The base64 body lines of a PEM private key (what must never be printed)."""
    return [line for line in key.read_text().splitlines() if line and "-----" not in line]


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _assert_no_secret(text: str, *keys: Path) -> None:
    assert "PRIVATE KEY" not in text
    for key in keys:
        for line in _secret_lines(key):
            assert line not in text


def test_full_flow(tmp_path: Path, keys: tuple[Path, Path],
                   capsys: pytest.CaptureFixture[str]) -> None:
    k1, k2 = keys
    app = tmp_path / "app.bin"
    app.write_bytes(build_app("esp32c3", "clidemo", "1.0.0", secure_version=1))
    signed = tmp_path / "signed.bin"
    rotated = tmp_path / "rotated.bin"
    d1, d2 = key_digest(k1).hex(), key_digest(k2).hex()
    seen = ""

    code, out, err = _run(capsys, "ota", "sign", str(app), "--key", str(k1), "-o", str(signed))
    seen += out + err
    assert code == 0 and f"block 0: RSA-3072 key digest {d1}" in out
    assert "signing key(s) found" not in out  # espsecure's chatter stays out

    code, out, err = _run(capsys, "ota", "sign", str(signed), "--key", str(k2), "--append",
                          "-o", str(rotated))
    seen += out + err
    assert code == 0 and "2 signature block(s)" in out

    code, out, err = _run(capsys, "ota", "verify", str(rotated), "--key", str(k1))
    seen += out + err
    assert code == 0 and "verified by block 0" in out

    code, out, err = _run(capsys, "ota", "verify", str(rotated), "--digest", d1, "--digest", d2,
                          "--revoked", d1)
    seen += out + err
    assert code == 0 and "verified by block 1" in out and f"key {d1} (revoked)" in out

    code, out, err = _run(capsys, "ota", "verify", str(rotated), "--digest", d1, "--revoked", d1)
    assert code == 1 and "(revoked)" in err and err.startswith("hilfarm: error:")

    digest_file = tmp_path / "digest.bin"
    code, out, err = _run(capsys, "ota", "digest", str(k1), "-o", str(digest_file))
    seen += out + err
    assert code == 0 and out.strip().endswith(d1) and digest_file.read_bytes().hex() == d1

    table = tmp_path / "pt.bin"
    table.write_bytes(two_ota_layout("4MB").encode())
    code, out, err = _run(capsys, "ota", "inspect", str(rotated), "--partition-table", str(table))
    seen += out + err
    assert code == 0 and "project:        clidemo" in out and "fits" in out
    assert f"block 1: RSA-3072 key digest {d2}" in out
    code, out, err = _run(capsys, "ota", "inspect", str(rotated), "--partition-size", "4K",
                          "--json")
    assert code == 1 and json.loads(out)["fits"] is False

    rel = tmp_path / "release.pem"
    pub = tmp_path / "release.pub"
    code, out, err = _run(capsys, "ota", "keygen", str(rel), "--scheme", "ed25519",
                          "--pubkey-out", str(pub))
    seen += out + err
    assert code == 0 and rel.stat().st_mode & 0o777 == 0o600

    manifest = tmp_path / "release.json"
    code, out, err = _run(capsys, "ota", "release", str(rotated), "--key", str(rel), "--url",
                          "https://fw.example/clidemo.bin", "--expires-days", "3",
                          "-o", str(manifest))
    seen += out + err
    assert code == 0 and "esp32c3 clidemo 1.0.0 (secure_version 1)" in out

    code, out, err = _run(capsys, "ota", "verify-release", str(manifest), "--image", str(rotated),
                          "--pubkey", str(pub))
    seen += out + err
    assert code == 0 and out.startswith("OK:")

    code, out, err = _run(capsys, "ota", "verify-release", str(manifest), "--image", str(app),
                          "--pubkey", str(pub))
    assert code == 1 and "manifest says" in err

    code, out, err = _run(capsys, "ota", "pubkey", str(k1))
    seen += out + err
    assert code == 0 and out.startswith("-----BEGIN PUBLIC KEY-----")

    _assert_no_secret(seen + json.dumps(json.loads(manifest.read_text())), k1, k2, rel)


def test_keygen_rsa_prints_digest_not_key(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "new.pem"
    code, out, err = _run(capsys, "ota", "keygen", str(key))
    assert code == 0 and key.stat().st_mode & 0o777 == 0o600
    assert key_digest(key).hex() in out
    _assert_no_secret(out + err, key)
    code, out, err = _run(capsys, "ota", "keygen", str(key))
    assert code == 2 and "already exists" in err


def test_loose_key_refused(tmp_path: Path, keys: tuple[Path, Path],
                           capsys: pytest.CaptureFixture[str]) -> None:
    loose = tmp_path / "loose.pem"
    loose.write_bytes(keys[0].read_bytes())
    loose.chmod(0o644)
    app = tmp_path / "app.bin"
    app.write_bytes(build_app("esp32", "clidemo", "1.0.0"))
    code, out, err = _run(capsys, "ota", "sign", str(app), "--key", str(loose), "-o",
                          str(tmp_path / "s.bin"))
    assert code == 2 and f"chmod 600 {loose}" in err
    _assert_no_secret(out + err, loose)
    code, out, err = _run(capsys, "ota", "digest", str(loose))
    assert code == 2 and "chmod 600" in err


def test_esp32_append_refused(tmp_path: Path, keys: tuple[Path, Path],
                              capsys: pytest.CaptureFixture[str]) -> None:
    app = tmp_path / "app.bin"
    app.write_bytes(build_app("esp32", "clidemo", "1.0.0"))
    signed = tmp_path / "s.bin"
    assert main(["ota", "sign", str(app), "--key", str(keys[0]), "-o", str(signed)]) == 0
    code, out, err = _run(capsys, "ota", "sign", str(signed), "--key", str(keys[1]), "--append",
                          "-o", str(tmp_path / "s2.bin"))
    assert code == 2 and "single Secure Boot V2 key digest" in err
    code, out, err = _run(capsys, "ota", "sign", str(app), "--key", str(keys[0]), "-o", str(app))
    assert code == 2 and "overwrite the input" in err


def test_bad_digest_argument(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    app = tmp_path / "app.bin"
    app.write_bytes(build_app("esp32c3", "clidemo", "1.0.0"))
    code, out, err = _run(capsys, "ota", "verify", str(app), "--digest", "abc")
    assert code == 2 and "--digest" in err and "64 hex digits" in err


def test_group_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ota"]) == 2
    assert "verify-release" in capsys.readouterr().out


def test_verify_json_and_exit_codes(tmp_path: Path, keys: tuple[Path, Path],
                                    capsys: pytest.CaptureFixture[str]) -> None:
    k1, k2 = keys
    app = tmp_path / "app.bin"
    app.write_bytes(build_app("esp32c3", "clidemo", "1.0.0"))
    signed = tmp_path / "signed.bin"
    assert main(["ota", "sign", str(app), "--key", str(k1), "-o", str(signed)]) == 0
    capsys.readouterr()
    d1 = key_digest(k1).hex()

    code, out, err = _run(capsys, "ota", "verify", str(signed), "--key", str(k1), "--json")
    assert (code, err) == (0, "")
    assert json.loads(out) == {
        "image": str(signed), "ok": True, "chip": "esp32c3", "accepted_by": 0,
        "signed_length": json.loads(out)["signed_length"],
        "blocks": [{"index": 0, "key_digest": d1, "status": "trusted"}],
    }
    assert json.loads(out)["signed_length"] > 0

    # Signed by another key: the verify ran and failed (1), still as JSON.
    code, out, err = _run(capsys, "ota", "verify", str(signed), "--key", str(k2), "--json")
    result = json.loads(out)
    assert code == 1 and result["ok"] is False and result["image"] == str(signed)
    assert "trusted" in result["error"]

    # An unsigned image fails the verify too; a missing key file is a usage error (2).
    code, out, _ = _run(capsys, "ota", "verify", str(app), "--key", str(k1), "--json")
    assert code == 1 and json.loads(out)["ok"] is False
    code, out, err = _run(capsys, "ota", "verify", str(signed), "--key",
                          str(tmp_path / "none.pem"), "--json")
    assert code == 2 and out == "" and "none.pem" in err

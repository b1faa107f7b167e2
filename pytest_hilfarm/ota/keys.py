"""Signing keys for Secure Boot V2 and for release manifests: create, load, digest, HSM config.

Secure Boot V2 keys (RSA-3072 for ESP32/S2/C3; notes §4.1) are generated through espsecure's
``generate_signing_key`` so they are exactly what ``espsecure sign-data`` expects; release-manifest
keys (Ed25519) through ``cryptography``. Every private key file this module creates is mode 0600,
and every private key file it reads must not be readable by group or others.

It must never print, log or put private key material into an error message (errors name the
file, never its content), and never weakens a key file's permissions.
"""

from __future__ import annotations

import configparser
import contextlib
import io
import os
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import esptool
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from pytest_hilfarm.errors import ConfigError, UsageError

# espsecure 5.6 `generate-signing-key --version 2 --scheme ...` choices (notes §4.4).
SBV2_SCHEMES = ("rsa3072", "ecdsa192", "ecdsa256", "ecdsa384")
# Release manifests are signed with Ed25519 (see ota/manifest.py for why).
RELEASE_SCHEMES = ("ed25519",)
SCHEMES = SBV2_SCHEMES + RELEASE_SCHEMES

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey


@contextlib.contextmanager
def espsecure_output(verbose: bool = False) -> Iterator[io.StringIO]:
    """Keep espsecure's console chatter out of the user's output unless ``verbose``.

    esptool 5.6's logger follows a reassigned ``sys.stdout`` (``EspLog.print`` docstring), so a
    redirect catches it without swapping the process-wide logger singleton. The captured text is
    yielded so callers can attach it to an error.
    """
    buf = io.StringIO()
    if verbose:
        yield buf
        return
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        yield buf


def check_private_key_file(path: str | Path) -> Path:
    """Refuse a private key file that group or others can read (or that does not exist).

    Same rule as OpenSSH's "UNPROTECTED PRIVATE KEY FILE" check: a signing key others can read
    is as good as published, so the farm will not use it until its owner fixes the mode.
    """
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise UsageError("key file does not exist", where=str(p),
                         hint="create one with `hilfarm ota keygen FILE`") from None
    except OSError as exc:
        raise UsageError(f"cannot read key file: {exc.strerror}", where=str(p)) from None
    if not stat.S_ISREG(st.st_mode):
        raise UsageError("key path is not a regular file", where=str(p))
    if os.name == "posix" and st.st_mode & 0o077:
        raise UsageError(
            f"private key file is accessible by group/others (mode "
            f"{stat.S_IMODE(st.st_mode):04o}); refusing to use it",
            where=str(p),
            hint=f"chmod 600 {p}  (and consider the key compromised if others could read it)",
        )
    return p


def _read_pem(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read key file: {exc.strerror}", where=str(path)) from None


def _is_private_pem(data: bytes) -> bool:
    return b"PRIVATE KEY-----" in data


def load_private_key(path: str | Path, *, for_public_half: bool = False) -> PrivateKey:
    """Load an unencrypted PEM private key after the permission check.

    ``for_public_half`` skips OpenSSL's RSA consistency check (about 0.2 s for RSA-3072): that
    check protects private-key operations, and only n and e are used when it is set.
    """
    p = check_private_key_file(path)
    data = _read_pem(p)
    try:
        key = serialization.load_pem_private_key(
            data, password=None, unsafe_skip_rsa_key_validation=for_public_half)
    except (ValueError, TypeError) as exc:
        # The cryptography message never contains key bytes, but keep only its first line.
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UsageError(f"not a usable unencrypted PEM private key ({reason})", where=str(p),
                         hint="pass a key written by `hilfarm ota keygen` or espsecure") from None
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey |
                      ed25519.Ed25519PrivateKey):
        raise UsageError(f"unsupported key type {type(key).__name__}", where=str(p),
                         hint="use RSA-3072 (Secure Boot V2) or Ed25519 (release manifests)")
    return key


def load_public_key(path: str | Path) -> PublicKey:
    """A public key from a public PEM, or derived from a private PEM (permission-checked)."""
    p = Path(path)
    data = _read_pem(p)
    if _is_private_pem(data):
        return load_private_key(p, for_public_half=True).public_key()
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        raise UsageError("not a PEM public key", where=str(p),
                         hint="export one with `hilfarm ota pubkey KEY -o PUB`") from None
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey |
                      ed25519.Ed25519PublicKey):
        raise UsageError(f"unsupported public key type {type(key).__name__}", where=str(p))
    return key


def public_key_pem(path: str | Path) -> bytes:
    """SubjectPublicKeyInfo PEM of a key file (private or public)."""
    return load_public_key(path).public_bytes(serialization.Encoding.PEM,
                                              serialization.PublicFormat.SubjectPublicKeyInfo)


def _check_new_file(path: Path) -> None:
    if path.exists():
        raise UsageError("file already exists; refusing to overwrite a key", where=str(path),
                         hint="choose another name, or remove the old file deliberately")
    if not path.parent.is_dir():
        raise UsageError("directory does not exist", where=str(path.parent))


def _publish_private(tmp: Path, target: Path) -> None:
    """Move a finished 0600 key into place without ever exposing it or overwriting a file."""
    os.chmod(tmp, 0o600)
    try:
        os.link(tmp, target)  # fails if target appeared meanwhile (no silent overwrite)
    except FileExistsError:
        raise UsageError("file already exists; refusing to overwrite a key",
                         where=str(target)) from None


def generate_signing_key(path: str | Path, scheme: str = "rsa3072", *,
                         verbose: bool = False) -> Path:
    """Create a new private key at ``path`` with mode 0600; returns the path.

    Secure Boot V2 schemes go through ``espsecure.generate_signing_key(version="2", ...)``.
    espsecure writes with the process umask (usually 0644), so it writes into a fresh 0700
    directory next to the target and the file is made 0600 before it is linked into place.
    """
    target = Path(path)
    if scheme not in SCHEMES:
        raise UsageError(f"unknown key scheme {scheme!r}", hint=f"use one of {', '.join(SCHEMES)}")
    _check_new_file(target)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".hilfarm-keygen-") as tmpdir:
        tmp = Path(tmpdir) / "key.pem"
        if scheme in SBV2_SCHEMES:
            import espsecure

            try:
                with espsecure_output(verbose):
                    espsecure.generate_signing_key(version="2", scheme=scheme, keyfile=str(tmp))
            except esptool.FatalError as exc:
                raise UsageError(f"espsecure could not generate the key: {exc}",
                                 where=str(target)) from None
        else:
            pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption())
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
        _publish_private(tmp, target)
    return target


def write_public_key(keyfile: str | Path, out: str | Path) -> Path:
    """Write the public half of ``keyfile`` as PEM (safe to share; mode 0644)."""
    o = Path(out)
    o.write_bytes(public_key_pem(keyfile))
    return o


def key_digest(keyfile: str | Path, *, verbose: bool = False) -> bytes:
    """The 32-byte Secure Boot V2 public key digest an eFuse BLOCK_KEYx holds for this key.

    Computed by espsecure's own ``_digest_sbv2_public_key`` (the function behind
    ``digest-sbv2-public-key``): RSA ``sha256(n || e || R || M')`` = ``sha256(block[36:812])``
    (secure-boot-v2.rst; notes §4.3). It is fed the public PEM only, so private bytes never
    reach espsecure's code paths that print.
    """
    import espsecure

    key = load_public_key(keyfile)
    if isinstance(key, ed25519.Ed25519PublicKey):
        raise UsageError("an Ed25519 key is a release-manifest key, not a Secure Boot V2 key",
                         where=str(keyfile), hint="pass an RSA-3072 key made with --scheme rsa3072")
    pem = key.public_bytes(serialization.Encoding.PEM,
                           serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        with espsecure_output(verbose):
            return bytes(espsecure._digest_sbv2_public_key(io.BytesIO(pem)))
    except esptool.FatalError as exc:
        raise UsageError(f"not a Secure Boot V2 key: {exc}", where=str(keyfile)) from None


def parse_digest(text: str, where: str = "key digest") -> bytes:
    """A 32-byte digest from 64 hex digits (spaces and colons allowed, as espsecure prints)."""
    cleaned = text.replace(" ", "").replace(":", "").lower()
    if cleaned.startswith("0x"):
        cleaned = cleaned[2:]
    try:
        raw = bytes.fromhex(cleaned)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise UsageError(f"{text!r} is not a SHA-256 key digest (64 hex digits)", where=where,
                         hint="get one with `hilfarm ota digest KEY` or `hilfarm ota inspect`")
    return raw


@dataclass(frozen=True)
class HsmConfig:
    """An espsecure HSM (PKCS#11) config file, checked for the keys espsecure requires.

    The file itself is handed to espsecure unchanged (``hsm=True, hsm_config=<file>``); the
    check here only turns espsecure's ``NoOptionError`` into a message naming the file.
    Format (espsecure esp_hsm_sign ``read_hsm_config``): section ``[hsm_config]`` with
    ``pkcs11_lib``, ``slot``, ``label`` and optionally ``credentials`` (else a PIN prompt).
    """

    path: Path

    @classmethod
    def load(cls, path: str | Path) -> HsmConfig:
        p = Path(path)
        parser = configparser.ConfigParser()
        try:
            with p.open(encoding="utf-8") as f:
                parser.read_file(f)
        except OSError as exc:
            raise ConfigError(f"cannot read HSM config: {exc.strerror}", where=str(p)) from None
        except configparser.Error as exc:
            raise ConfigError(f"HSM config is not an INI file: {exc.message}",
                              where=str(p)) from None
        if not parser.has_section("hsm_config"):
            raise ConfigError("HSM config has no [hsm_config] section", where=str(p),
                              hint="see espsecure's HSM docs: pkcs11_lib, slot, label")
        missing = [k for k in ("pkcs11_lib", "slot", "label")
                   if not parser.has_option("hsm_config", k)]
        if missing:
            raise ConfigError(f"HSM config lacks {', '.join(missing)}",
                              where=f"{p}: [hsm_config]")
        if parser.has_option("hsm_config", "credentials") and os.name == "posix" and \
                p.stat().st_mode & 0o077:
            raise ConfigError(
                "HSM config holds the HSM PIN (credentials) but is readable by group/others",
                where=str(p), hint=f"chmod 600 {p}")
        return cls(p)

    def open(self) -> Any:
        """A text file object for espsecure's ``hsm_config`` argument (caller closes it)."""
        return self.path.open(encoding="utf-8")


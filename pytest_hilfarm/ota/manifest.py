"""Signed release manifests: what a release is (image hash, size, chip, versions) and until when.

A manifest is one flat JSON object (``FORMAT``): chip, project, version, secure_version, sha256,
size, created, expires, key_id, sig_scheme, an optional url and the signature. ``signature`` is
base64 of an Ed25519 (default) or RSA-PSS-SHA256 signature over the canonical JSON of every other
field (sorted keys, no whitespace, UTF-8), so adding, removing or changing any field breaks it.
There is one format and one reader (:func:`read_manifest`): ``hilfarm ota release`` writes it,
``hilfarm rollout`` and the exporters read it with the same code (``rollout`` re-exports it).
The reader checks shape and plausibility (chip, hash, size, eFuse-sized secure_version, URL
scheme); trust (signature, key, expiry) is :func:`verify_release`'s job.

Why not TUF metadata (``tuf.api.metadata``)? TUF's protection comes from its four roles (root,
targets, snapshot, timestamp) and a repository a client walks; one release signed by one key
would use the Targets envelope alone and get none of that, while the rollout reader (and device
job documents) expect a flat object. TUF fits a later fleet-wide update repository; the
``custom`` field of a TargetFile could then carry these same fields (notes §7.3).

This module never fetches an image, never prints key material and never writes private keys.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from pytest_hilfarm.errors import ConfigError, ImageError, SignatureError, UsageError
from pytest_hilfarm.esp.chips import CHIPS
from pytest_hilfarm.esp.image import parse_image
from pytest_hilfarm.ota.keys import PublicKey, load_private_key, load_public_key

FORMAT = "hilfarm-release/1"
DEFAULT_EXPIRES = timedelta(days=30)
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
# Every chip esptool knows (a read-only mapping of name to its record; `in` and iteration work).
KNOWN_CHIPS = CHIPS
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ManifestError(ConfigError, SignatureError):
    """A manifest file is malformed or implausible.

    It is a :class:`ConfigError` (a bad input file) and a :class:`SignatureError` (a release
    that cannot be trusted as written), so callers catching either keep working.
    """


def _utc(dt: datetime) -> datetime:
    if dt.tzinfo is None:
        raise UsageError(f"time {dt.isoformat()} has no timezone", hint="pass an aware datetime")
    return dt.astimezone(timezone.utc)


def _iso(dt: datetime) -> str:
    return _utc(dt).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(text: Any, where: str) -> datetime:
    if not isinstance(text, str):
        raise SignatureError(f"{text!r} is not an ISO 8601 time", where=where)
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise SignatureError(f"{text!r} is not an ISO 8601 time", where=where) from None
    if dt.tzinfo is None:
        raise SignatureError(f"time {text!r} has no timezone", where=where)
    return dt.astimezone(timezone.utc)


def key_id(public_key: PublicKey) -> str:
    """SHA-256 hex of the DER SubjectPublicKeyInfo: names the release key without revealing it."""
    der = public_key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


@dataclass(frozen=True)
class Manifest:
    """One signed release (see the module docstring for the wire format)."""

    chip: str
    project: str
    version: str
    secure_version: int
    sha256: str
    size: int
    created: str  # ISO 8601 UTC, "...Z"
    expires: str
    key_id: str
    sig_scheme: str  # "ed25519" or "rsa-pss-sha256"
    url: str | None = None
    format: str = FORMAT
    signature: str | None = None

    def payload(self) -> dict[str, Any]:
        """Every field but ``signature`` (and no ``url`` key when there is no URL)."""
        data = asdict(self)
        data.pop("signature")
        if data["url"] is None:
            data.pop("url")
        return data

    def signed_bytes(self) -> bytes:
        return canonical_json(self.payload())

    def to_dict(self) -> dict[str, Any]:
        data = self.payload()
        if self.signature is not None:
            data["signature"] = self.signature
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @property
    def expires_at(self) -> datetime:
        return _parse_time(self.expires, "manifest: expires")

    def job_document(self) -> dict[str, Any]:
        """The device-facing OTA document the exporters embed (notes §6.1, custom document)."""
        doc: dict[str, Any] = {"operation": "ota", "url": self.url, "sha256": self.sha256,
                               "size": self.size, "chip": self.chip, "version": self.version,
                               "secure_version": self.secure_version}
        if self.signature is not None:
            doc["signature"] = self.signature
        return doc


def canonical_json(data: dict[str, Any]) -> bytes:
    """The bytes that are signed: sorted keys, no whitespace, UTF-8."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _sign(private_key: Any, data: bytes, where: str) -> tuple[str, bytes]:
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        return "ed25519", private_key.sign(data)
    if isinstance(private_key, rsa.RSAPrivateKey):
        return "rsa-pss-sha256", private_key.sign(data, _PSS, hashes.SHA256())
    raise UsageError("a release key must be Ed25519 or RSA", where=where,
                     hint="create one with `hilfarm ota keygen KEY --scheme ed25519`")


def _scheme_of(private_key: Any) -> str:
    return "ed25519" if isinstance(private_key, ed25519.Ed25519PrivateKey) else "rsa-pss-sha256"


def make_release(
    image: str | Path,
    key: str | Path,
    *,
    url: str | None = None,
    expires_in: timedelta = DEFAULT_EXPIRES,
    now: datetime | None = None,
) -> Manifest:
    """Describe and sign the image file ``image`` with the release key file ``key``."""
    if expires_in <= timedelta(0):
        raise UsageError(f"expiry must be in the future, got {expires_in}")
    if url is not None and not url.startswith(("https://", "http://")):
        raise UsageError(f"url {url!r} is not an http(s) URL",
                         hint="devices fetch the image over HTTP(S); give its full URL")
    path = Path(image)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read image: {exc.strerror}", where=str(path)) from None
    parsed = parse_image(data, verify=True)
    if parsed.app_desc is None or parsed.chip is None:
        raise ImageError("not an app image (no esp_app_desc_t or unknown chip)", where=str(path),
                         hint="a release is an app .bin as built by ESP-IDF")
    private_key = load_private_key(key)
    created = _utc(now or datetime.now(timezone.utc))
    unsigned = Manifest(
        chip=parsed.chip, project=parsed.app_desc.project_name, version=parsed.app_desc.version,
        secure_version=parsed.app_desc.secure_version, sha256=hashlib.sha256(data).hexdigest(),
        size=len(data), created=_iso(created), expires=_iso(created + expires_in),
        key_id=key_id(private_key.public_key()), sig_scheme=_scheme_of(private_key), url=url)
    _scheme, sig = _sign(private_key, unsigned.signed_bytes(), str(key))
    return Manifest(**{**asdict(unsigned), "signature": base64.b64encode(sig).decode()})


def write_manifest(manifest: Manifest, path: str | Path) -> Path:
    p = Path(path)
    p.write_text(manifest.to_json(), encoding="utf-8")
    return p


_STR_FIELDS = ("chip", "project", "version", "sha256", "created", "expires", "key_id",
               "sig_scheme", "format")


def manifest_from_dict(data: Any, where: str) -> Manifest:
    """Check a decoded manifest's shape and plausibility (not its signature).

    Raises :class:`ManifestError` naming the field, e.g. ``release.json: secure_version``.
    """
    if not isinstance(data, dict):
        raise ManifestError("a release manifest must be a JSON object", where=where,
                            hint="write it with `hilfarm ota release IMAGE --key KEY -o FILE`")
    known = {f.name for f in fields(Manifest)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ManifestError(f"unknown manifest field(s) {', '.join(unknown)}", where=where,
                            hint="the manifest was edited or written by another tool")
    missing = [k for k in _STR_FIELDS + ("secure_version", "size") if k not in data]
    if missing:
        raise ManifestError(f"release manifest lacks {', '.join(missing)}", where=where,
                            hint="`hilfarm ota release IMAGE --key KEY [--url URL] -o FILE` "
                                 f"writes every field ({FORMAT})")
    if data["format"] != FORMAT:
        raise ManifestError(f"manifest format is {data['format']!r}, expected {FORMAT!r}",
                            where=f"{where}: format")
    for k in _STR_FIELDS:
        if not isinstance(data[k], str):
            raise ManifestError(f"{k} must be a string", where=f"{where}: {k}")
    for k in ("url", "signature"):
        if data.get(k) is not None and (not isinstance(data[k], str) or not data[k]):
            raise ManifestError(f"{k} must be a non-empty string when present",
                                where=f"{where}: {k}")
    url = data.get("url")
    if url is not None and not url.startswith(("https://", "http://")):
        raise ManifestError(f"manifest url {url!r} is not an http(s) URL", where=f"{where}: url",
                            hint="devices fetch the image over HTTP(S); give its full URL")
    if not _SHA256.match(data["sha256"]):
        raise ManifestError(f"manifest sha256 {data['sha256']!r} is not 64 lowercase hex digits",
                            where=f"{where}: sha256", hint="use the SHA-256 of the signed .bin")
    size = data["size"]
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ManifestError(f"manifest size {size!r} must be a positive integer (bytes)",
                            where=f"{where}: size")
    chip = data["chip"]
    if chip not in KNOWN_CHIPS:
        raise ManifestError(f"manifest chip {chip!r} is not an ESP32-family chip",
                            where=f"{where}: chip", hint=f"one of {', '.join(KNOWN_CHIPS)}")
    if not data["version"].strip():
        raise ManifestError("manifest version must be a non-empty string",
                            where=f"{where}: version")
    secure_version = data["secure_version"]
    bits = CHIPS[chip].secure_version_bits
    if (isinstance(secure_version, bool) or not isinstance(secure_version, int)
            or not 0 <= secure_version <= bits):
        raise ManifestError(
            f"manifest secure_version {secure_version!r} must be an integer 0..{bits} for {chip}",
            where=f"{where}: secure_version",
            hint="the eFuse counter has that many bits; a larger value can never be accepted")
    for k in ("created", "expires"):
        try:
            _parse_time(data[k], f"{where}: {k}")
        except SignatureError as exc:
            raise ManifestError(exc.what, where=exc.where) from None
    return Manifest(**data)


def read_manifest(path: str | Path) -> Manifest:
    """Load a manifest file (shape only; use :func:`verify_release` to trust it)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ManifestError(f"cannot read release manifest: {exc.strerror}", where=str(p),
                            hint="pass the manifest written by `hilfarm ota release`") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"release manifest is not JSON: {exc.msg}",
                            where=f"{p}:{exc.lineno}") from None
    return manifest_from_dict(data, str(p))


def _verify_signature(manifest: Manifest, public_key: PublicKey, where: str) -> None:
    if manifest.signature is None:
        raise SignatureError("manifest is unsigned (no signature field)", where=where,
                             hint="sign it with `hilfarm ota release IMAGE --key KEY -o FILE`")
    try:
        sig = base64.b64decode(manifest.signature, validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError("manifest signature is not base64", where=f"{where}: signature") \
            from None
    if manifest.key_id != key_id(public_key):
        raise SignatureError(
            f"manifest was signed by key {manifest.key_id[:16]}..., not the trusted key "
            f"{key_id(public_key)[:16]}...", where=f"{where}: key_id",
            hint="verify with the release key's public half, or re-sign with the right key")
    data = manifest.signed_bytes()
    try:
        if manifest.sig_scheme == "ed25519" and isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(sig, data)
        elif manifest.sig_scheme == "rsa-pss-sha256" and isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(sig, data, _PSS, hashes.SHA256())
        elif isinstance(public_key, ec.EllipticCurvePublicKey):
            raise SignatureError("ECDSA release keys are not supported", where=where)
        else:
            raise SignatureError(f"signature scheme {manifest.sig_scheme!r} does not match the "
                                 "trusted key's type", where=f"{where}: sig_scheme")
    except InvalidSignature:
        raise SignatureError(
            "manifest signature does not verify: a field was changed after signing",
            where=where, hint="do not edit a signed manifest; make a new release") from None


def verify_release(
    manifest_path: str | Path,
    image_path: str | Path | None,
    trusted_public_key: str | Path,
    *,
    now: datetime | None = None,
) -> Manifest:
    """Trust a manifest: signed by the trusted key, unchanged, not expired, and (with
    ``image_path``) describing that exact image (sha256, size, chip).

    Raises :class:`SignatureError` for unsigned, tampered, wrong-key or expired manifests and
    :class:`ImageError` for an image that does not match it.
    """
    where = str(manifest_path)
    manifest = read_manifest(manifest_path)
    _verify_signature(manifest, load_public_key(trusted_public_key), where)
    at = _utc(now or datetime.now(timezone.utc))
    expires = _parse_time(manifest.expires, f"{where}: expires")
    if at >= expires:
        raise SignatureError(f"manifest expired at {manifest.expires} (now {_iso(at)})",
                             where=f"{where}: expires",
                             hint="an expired manifest may be a replayed old release; "
                                  "make a fresh one with `hilfarm ota release`")
    if _parse_time(manifest.created, f"{where}: created") > expires:
        raise SignatureError("manifest was created after it expires", where=f"{where}: created")
    if image_path is not None:
        _check_image(manifest, Path(image_path), where)
    return manifest


def _check_image(manifest: Manifest, path: Path, where: str) -> None:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read image: {exc.strerror}", where=str(path)) from None
    if len(data) != manifest.size:
        raise ImageError(f"image is {len(data)} bytes, manifest says {manifest.size}",
                         where=str(path), hint=f"this is not the image released by {where}")
    digest = hashlib.sha256(data).hexdigest()
    if digest != manifest.sha256:
        raise ImageError(f"image sha256 {digest} does not match manifest {manifest.sha256}",
                         where=str(path), hint=f"this is not the image released by {where}")
    chip = parse_image(data, verify=False).chip
    if chip != manifest.chip:
        raise ImageError(f"image is for {chip or 'an unknown chip'}, manifest says "
                         f"{manifest.chip}", where=str(path))

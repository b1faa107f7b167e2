"""Release manifest: the artifact a rollout ships, loaded from a JSON file and validated.

The OTA module produces and signs these manifests; this module only checks that the fields a
rollout and its exporters rely on are present and plausible. It does not verify the signature
(that needs the OTA module's keys) and never downloads the firmware.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from pytest_hilfarm.errors import ConfigError

# eFuse secure_version field sizes in bits (notes §3.4): the counter is stored as set bits, so a
# secure_version above the field size can never be burned and the device would refuse the image.
_SECURE_VERSION_BITS = MappingProxyType({"esp32": 32, "esp32c2": 4, "esp32c5": 9})
_DEFAULT_SECURE_VERSION_BITS = 16
_KNOWN_CHIPS = (
    "esp32", "esp32s2", "esp32s3", "esp32c2", "esp32c3", "esp32c5", "esp32c6", "esp32c61",
    "esp32h2", "esp32p4",
)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Manifest:
    """One signed release: where to fetch it and what a device checks before installing."""

    url: str
    sha256: str
    size: int
    chip: str
    version: str
    secure_version: int
    signature: str | None = None

    def job_document(self) -> dict[str, Any]:
        """The device-facing OTA document the exporters embed (notes §6.1, custom document)."""
        doc: dict[str, Any] = {
            "operation": "ota",
            "url": self.url,
            "sha256": self.sha256,
            "size": self.size,
            "chip": self.chip,
            "version": self.version,
            "secure_version": self.secure_version,
        }
        if self.signature is not None:
            doc["signature"] = self.signature
        return doc


def manifest_from_dict(data: Any, where: str) -> Manifest:
    """Validate a decoded manifest; ``where`` names its source in error messages."""
    if not isinstance(data, dict):
        raise ConfigError("a release manifest must be a JSON object", where=where,
                          hint="write {\"url\": ..., \"sha256\": ..., ...}")
    required = ("url", "sha256", "size", "chip", "version", "secure_version")
    missing = [k for k in required if k not in data]
    if missing:
        raise ConfigError(f"release manifest lacks {', '.join(missing)}", where=where,
                          hint="`hilfarm ota release IMAGE --key KEY --url URL -o MANIFEST` "
                               "writes every field")
    url = data["url"]
    if not isinstance(url, str) or not url.startswith(("https://", "http://")):
        raise ConfigError(f"manifest url {url!r} is not an http(s) URL", where=f"{where}: url",
                          hint="devices fetch the image over HTTPS; give its full URL")
    sha = data["sha256"]
    if not isinstance(sha, str) or not _SHA256.match(sha.lower()):
        raise ConfigError(f"manifest sha256 {sha!r} is not 64 hex digits",
                          where=f"{where}: sha256", hint="use the SHA-256 of the signed .bin")
    size = data["size"]
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ConfigError(f"manifest size {size!r} must be a positive integer (bytes)",
                          where=f"{where}: size")
    chip = data["chip"]
    if chip not in _KNOWN_CHIPS:
        raise ConfigError(f"manifest chip {chip!r} is not an ESP32-family chip",
                          where=f"{where}: chip", hint=f"one of {', '.join(_KNOWN_CHIPS)}")
    version = data["version"]
    if not isinstance(version, str) or not version.strip():
        raise ConfigError("manifest version must be a non-empty string", where=f"{where}: version")
    secure_version = data["secure_version"]
    bits = _SECURE_VERSION_BITS.get(chip, _DEFAULT_SECURE_VERSION_BITS)
    if (isinstance(secure_version, bool) or not isinstance(secure_version, int)
            or not 0 <= secure_version <= bits):
        raise ConfigError(
            f"manifest secure_version {secure_version!r} must be an integer 0..{bits} for {chip}",
            where=f"{where}: secure_version",
            hint="the eFuse counter has that many bits; a larger value can never be accepted",
        )
    signature = data.get("signature")
    if signature is not None and (not isinstance(signature, str) or not signature):
        raise ConfigError("manifest signature must be a non-empty string (base64) when present",
                          where=f"{where}: signature")
    return Manifest(url=url, sha256=sha.lower(), size=size, chip=chip, version=version,
                    secure_version=secure_version, signature=signature)


def load_manifest(path: str | Path) -> Manifest:
    """Read and validate a manifest JSON file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read release manifest: {exc.strerror}", where=str(p),
                          hint="pass the manifest written by the signing step") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"release manifest is not JSON: {exc.msg}",
                          where=f"{p}:{exc.lineno}") from exc
    return manifest_from_dict(data, str(p))

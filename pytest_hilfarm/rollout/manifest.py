"""The release manifest a rollout ships: the OTA module's one format and one reader.

``hilfarm ota release`` writes ``hilfarm-release/1`` manifests and this is the same record and
the same reader (:mod:`pytest_hilfarm.ota.manifest`), so what a release step writes is exactly
what a rollout accepts (``url`` is optional in both). Only the AWS IoT Jobs exporter needs a URL
(the device downloads the image itself) and says so. Nothing here verifies the signature; that
is ``--release-pubkey`` (``verify_release``).
"""

from __future__ import annotations

from pytest_hilfarm.ota.manifest import (
    FORMAT,
    KNOWN_CHIPS,
    Manifest,
    ManifestError,
    manifest_from_dict,
    read_manifest,
)

load_manifest = read_manifest

__all__ = ["FORMAT", "KNOWN_CHIPS", "Manifest", "ManifestError", "load_manifest",
           "manifest_from_dict", "read_manifest"]

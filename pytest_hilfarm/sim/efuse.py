"""A virtual board's eFuses as they are burned: Secure Boot, key digests, anti-rollback.

Bits only go up, as on a chip: :func:`burn_efuse` refuses what the eFuse fields cannot hold
(a fourth key digest, a secure version beyond the field) and never clears a bit.
"""

from __future__ import annotations

from dataclasses import replace

from pytest_hilfarm.errors import UsageError
from pytest_hilfarm.esp.chips import CHIPS
from pytest_hilfarm.ota.signing import max_signature_blocks
from pytest_hilfarm.sim.boot import BootEfuse


def secure_version_bits(chip: str) -> int:
    """Width of ``chip``'s anti-rollback eFuse field (the highest ``secure_version`` it holds)."""
    return CHIPS[chip].secure_version_bits


def burn_efuse(
    efuse: BootEfuse,
    chip: str,
    *,
    key_digest: bytes | None = None,
    secure_version: int | None = None,
    secure_boot: bool = False,
    anti_rollback: bool = False,
    signed_apps: bool = False,
) -> BootEfuse:
    """The eFuse record after burning what is asked; raises UsageError for what eFuses cannot do.

    eFuse bits only go from 0 to 1: a digest fills the next free ``SECURE_BOOT_DIGESTx`` key
    block (1 on ESP32, 3 on S2/C3), the secure version only rises (it is a count of set bits),
    and enable flags stay enabled. Burning what is already burned changes nothing.
    ``anti_rollback`` and ``signed_apps`` stand for the bootloader options
    ``CONFIG_BOOTLOADER_APP_ANTI_ROLLBACK`` and ``CONFIG_SECURE_SIGNED_APPS_NO_SECURE_BOOT``:
    on a real board they come with the bootloader build, here they live with the eFuses and
    are as one-way (a bootloader that checks signatures is not replaced by one that does not).
    """
    where = f"virtual eFuses of a {chip}"
    out = efuse
    if key_digest is not None:
        if len(key_digest) != 32:
            raise UsageError(f"a key digest is 32 bytes, got {len(key_digest)}", where=where,
                             hint="pass 64 hex digits (`hilfarm ota digest KEY`)")
        if key_digest not in out.key_digests:
            limit = max_signature_blocks(chip)
            if len(out.key_digests) >= limit:
                raise UsageError(
                    f"all {limit} Secure Boot key digest block(s) are already burned",
                    where=where,
                    hint="eFuse key blocks cannot be rewritten; use a key whose digest is "
                    "already burned")
            out = replace(out, key_digests=out.key_digests + (key_digest,))
    if secure_version is not None:
        bits = secure_version_bits(chip)
        if not 0 <= secure_version <= bits:
            raise UsageError(
                f"secure_version {secure_version} does not fit the {bits}-bit anti-rollback "
                "eFuse field", where=where, hint=f"use 0..{bits}")
        if secure_version < out.secure_version:
            raise UsageError(
                f"the anti-rollback eFuse already holds secure_version {out.secure_version}; "
                f"eFuse bits only go from 0 to 1, so it cannot be lowered to {secure_version}",
                where=where, hint="burn a value >= the current one")
        out = replace(out, secure_version=secure_version)
    if secure_boot:
        if not out.key_digests:
            raise UsageError(
                "Secure Boot cannot be enabled before a key digest is burned: nothing would "
                "boot", where=where, hint="burn a key digest first (burn-key-digest)")
        out = replace(out, secure_boot_enabled=True)
    if anti_rollback:
        out = replace(out, anti_rollback=True)
    if signed_apps:
        out = replace(out, signed_apps_no_secure_boot=True)
    return out

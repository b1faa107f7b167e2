"""Secure Boot V2 code signing (through espsecure) and verification against eFuse key digests.

``sign_image`` calls espsecure's Python ``sign_data`` (RSA-3072 signature blocks, notes §4.2/4.4)
and adds the chip rules espsecure leaves to the caller: ESP32 and ESP32-C2 hold one signature
block, the other chips up to three (``SOC_EFUSE_SECURE_BOOT_KEY_DIGESTS``; notes §4.1).
``verify_image`` is this module's own verifier (``cryptography`` + espsecure's RSA helpers): a
farm, like the ROM, trusts key *digests* burned into eFuse, not key files, and a device fails
closed on any malformed block, so every block is checked (magic, CRC, image digest, Montgomery
constants, RSA-PSS signature) and the failing one is named.

It never prints: espsecure's console output is captured unless ``verbose``. It does not read or
write eFuses or boards (that is the virtual rack's job) and never logs key material.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import tempfile
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import esptool
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

from pytest_hilfarm.errors import ImageError, SignatureError, UsageError
from pytest_hilfarm.esp.image import (
    MAX_SIG_BLOCKS,
    SIG_BLOCK_MAGIC,
    SIG_BLOCK_SIZE,
    SIG_SECTOR_SIZE,
    AppImage,
    SignatureBlock,
    parse_image,
)
from pytest_hilfarm.ota.keys import (
    HsmConfig,
    check_private_key_file,
    espsecure_output,
    key_digest,
    load_private_key,
    parse_digest,
)

SIG_VERSION_RSA = 0x02
SIG_VERSION_ECDSA = 0x03
# soc_caps.h SOC_EFUSE_SECURE_BOOT_KEY_DIGESTS: 1 on ESP32 (rev >= 3) and C2, 3 elsewhere.
_MAX_BLOCKS = {"esp32": 1, "esp32c2": 1}
# espsecure: "--append-signatures is not valid for ESP32 and ESP32-C2" (notes §4.4).
_NO_APPEND = ("esp32", "esp32c2")
# RSA block layout (notes §4.2): "<BBxx32s384sI384sI384s" + CRC32 + 16 zero bytes.
_CRC_AT = 1196


def max_signature_blocks(chip: str) -> int:
    """How many signature blocks (trusted key digests) ``chip``'s Secure Boot V2 can use."""
    return _MAX_BLOCKS.get(chip, MAX_SIG_BLOCKS)


@dataclass(frozen=True)
class BlockInfo:
    """One signature block as found in an image (no trust decision)."""

    index: int
    offset: int  # from the image start
    scheme: str  # "RSA-3072", "ECDSA" or "unknown (version N)"
    key_digest: bytes | None  # what eFuse must hold for this key; None when unreadable
    crc_ok: bool
    digest_ok: bool  # the block's image digest equals sha256(signed content)

    @property
    def key_digest_hex(self) -> str:
        return self.key_digest.hex() if self.key_digest else "-"


@dataclass(frozen=True)
class BlockVerdict:
    """A verified block and what the trust list says about its key."""

    index: int
    key_digest: bytes
    status: str  # "trusted", "revoked" or "untrusted"


@dataclass(frozen=True)
class Verification:
    """Outcome of :func:`verify_image`: every block verified; ``accepted_by`` is the first
    block whose key is trusted and not revoked (the one a device would boot on).
    """

    chip: str | None
    signed_length: int
    blocks: tuple[BlockVerdict, ...]
    accepted_by: int


def _parse(image: bytes) -> AppImage:
    # verify=False: a tampered byte must surface as a signature failure naming the block,
    # not as an image checksum error before the signature is even looked at.
    return parse_image(image, verify=False)


def _block_scheme(version: int) -> str:
    if version == SIG_VERSION_RSA:
        return "RSA-3072"
    if version == SIG_VERSION_ECDSA:
        return "ECDSA"
    return f"unknown (version {version})"


def signature_info(image: bytes) -> tuple[BlockInfo, ...]:
    """The Secure Boot V2 blocks of a signed image with their key digests (empty if unsigned).

    Equivalent to ``espsecure signature-info-v2`` but returns records and does not stop at a
    mismatching digest, so a report can show every block.
    """
    parsed = _parse(image)
    sector = parsed.signature_sector
    if sector is None:
        return ()
    content_digest = hashlib.sha256(image[: sector.offset]).digest()
    return tuple(
        BlockInfo(b.index, b.offset, _block_scheme(b.version), b.key_digest, b.crc_ok,
                  b.image_digest == content_digest)
        for b in sector.blocks
    )


@dataclass(frozen=True)
class SigningKeys:
    """RSA-3072 private keys loaded (and validated) once, for signing many images.

    Loading a key costs about 0.2-0.3 s (OpenSSL's RSA consistency check), which is most of the
    cost of signing one 1 MB image; ``sign_image`` with this record signs with the loaded keys
    and hands espsecure the pre-calculated signatures (``sign_data(pub_key=, signature=)``, the
    path espsecure's HSM signing takes), so espsecure still builds and checks every block.
    """

    paths: tuple[Path, ...]
    private_keys: tuple[rsa.RSAPrivateKey, ...] = field(repr=False)
    public_pems: tuple[bytes, ...] = field(repr=False)

    def __len__(self) -> int:
        return len(self.paths)


def load_signing_keys(paths: Sequence[str | Path]) -> SigningKeys:
    """Load Secure Boot V2 signing keys once (permission-checked; RSA-3072 only)."""
    loaded: list[rsa.RSAPrivateKey] = []
    for p in paths:
        key = load_private_key(p)
        if not isinstance(key, rsa.RSAPrivateKey) or key.key_size != 3072:
            raise UsageError("not an RSA-3072 key; ESP32/S2/C3 Secure Boot V2 is RSA-3072 only",
                             where=str(p), hint="create one with `hilfarm ota keygen KEY`")
        loaded.append(key)
    pems = tuple(k.public_key().public_bytes(serialization.Encoding.PEM,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)
                 for k in loaded)
    return SigningKeys(tuple(Path(p) for p in paths), tuple(loaded), pems)


def _presign(keys: SigningKeys, content: bytes) -> tuple[list[io.BytesIO], list[io.BytesIO]]:
    digest = hashlib.sha256(content).digest()
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)  # notes §4.2
    sigs = [io.BytesIO(k.sign(digest, pss, utils.Prehashed(hashes.SHA256())))
            for k in keys.private_keys]
    return [io.BytesIO(pem) for pem in keys.public_pems], sigs


def sign_image(
    image: bytes,
    keys: Sequence[str | Path] | SigningKeys = (),
    *,
    append: bool = False,
    hsm_config: str | Path | None = None,
    verbose: bool = False,
) -> bytes:
    """Return ``image`` signed with each key (one block per key), via ``espsecure.sign_data``.

    ``append`` keeps the blocks already present (key rotation on S2/C3: sign with the new key
    while the old one is still trusted). Without it, an already signed image is refused rather
    than signed again: espsecure would otherwise treat the old sector as content (notes §4.4).
    ``hsm_config`` signs with a PKCS#11 HSM instead of key files (espsecure ``--hsm``).
    ``keys`` may be a :class:`SigningKeys` record to skip loading the keys for every image.
    """
    parsed = _parse(image)
    chip = parsed.chip
    if chip is None:
        raise ImageError(f"image has unknown chip_id {parsed.header.chip_id}",
                         where="image offset 0xc", hint="sign an image built for a known chip")
    hsm = HsmConfig.load(hsm_config) if hsm_config is not None else None
    if hsm is not None and keys:
        raise UsageError("give key files or an HSM config, not both")
    if hsm is None and not keys:
        raise UsageError("no signing key given", hint="pass --key KEYFILE (or --hsm-config)")
    preloaded = keys if isinstance(keys, SigningKeys) else None
    key_paths = [] if isinstance(keys, SigningKeys) else [check_private_key_file(k) for k in keys]
    new_blocks = 1 if hsm is not None else len(keys)
    limit = max_signature_blocks(chip)
    existing = parsed.signature_sector.blocks if parsed.signature_sector else ()
    if append:
        if chip in _NO_APPEND:
            raise UsageError(
                f"{chip} holds a single Secure Boot V2 key digest, so signatures cannot be "
                "appended (espsecure: --append-signatures is not valid for ESP32 and ESP32-C2)",
                hint="sign the unsigned image with the one key the device trusts")
        if parsed.signature_sector is not None and parsed.signature_sector.offset + \
                SIG_SECTOR_SIZE != len(image):
            raise ImageError("the signature sector is not at the end of the file",
                             where=f"image offset 0x{parsed.signature_sector.offset:x}")
    elif existing:
        raise UsageError(
            f"image is already signed ({len(existing)} signature block(s))",
            hint="pass --append to add a block for key rotation, or sign the unsigned image")
    valid_existing = [b for b in existing if b.crc_ok]
    if len(valid_existing) + new_blocks > limit:
        raise UsageError(
            f"{chip} takes at most {limit} signature block(s); the image has "
            f"{len(valid_existing)} and {new_blocks} more were requested",
            hint="revoke and drop an old key first" if limit > 1 else
            "ESP32 and ESP32-C2 trust exactly one key")

    import espsecure

    data = image
    pub_keys: list[io.BytesIO] = []
    signatures: list[io.BytesIO] = []
    if preloaded is not None:
        if append and valid_existing:
            content = image[: len(image) - SIG_SECTOR_SIZE]  # what espsecure keeps as content
        else:
            append = False
            # espsecure requires pre-calculated signatures over 4 KiB-aligned data; pad exactly
            # as it would (0xFF up to the sector boundary).
            data = content = image + b"\xff" * (-len(image) % SIG_SECTOR_SIZE)
        pub_keys, signatures = _presign(preloaded, content)

    with tempfile.TemporaryDirectory(prefix="hilfarm-sign-") as tmp:
        out = os.path.join(tmp, "signed.bin")
        datafile = io.BytesIO(data)
        datafile.name = os.path.join(tmp, "image.bin")  # sign_data compares input/output names
        handles = [p.open("rb") for p in key_paths]
        hsm_file = hsm.open() if hsm is not None else None
        try:
            with espsecure_output(verbose) as chatter:
                espsecure.sign_data(
                    version="2", keyfile=handles, output=out, append_signatures=append,
                    hsm=hsm is not None, hsm_config=hsm_file, pub_key=pub_keys,
                    signature=signatures,
                    datafile=datafile, skip_padding=False)
        except esptool.FatalError as exc:
            raise SignatureError(f"espsecure could not sign the image: {exc}",
                                 hint=_tail(chatter.getvalue())) from None
        except ImportError as exc:
            # espsecure's HSM support needs python-pkcs11, which it does not install itself.
            raise UsageError(f"HSM signing is unavailable: {exc}", where=str(hsm_config),
                             hint="pip install python-pkcs11") from None
        finally:
            for h in handles:
                h.close()
            if hsm_file is not None:
                hsm_file.close()
        with open(out, "rb") as f:
            return f.read()


def _tail(text: str, lines: int = 3) -> str | None:
    kept = [line for line in text.splitlines() if line.strip()][-lines:]
    return " | ".join(kept) if kept else None


def _resolve_trusted(trusted: Iterable[bytes | str | Path]) -> list[bytes]:
    out: list[bytes] = []
    for item in trusted:
        if isinstance(item, bytes):
            if len(item) != 32:
                raise UsageError(f"a key digest is 32 bytes, got {len(item)}")
            out.append(item)
        elif isinstance(item, str) and len(item.replace(" ", "").replace(":", "")) == 64 \
                and not Path(item).exists():
            out.append(parse_digest(item))
        else:
            out.append(key_digest(item))
    return out


def _check_rsa_block(blk: bytes, index: int, content_digest: bytes) -> None:
    where = f"signature block {index}"
    n = int.from_bytes(blk[36:420], "little")
    (e,) = struct.unpack_from("<I", blk, 420)
    rinv = int.from_bytes(blk[424:808], "little")
    (m_prime,) = struct.unpack_from("<I", blk, 808)
    signature = blk[812:1196][::-1]  # stored little-endian for the RSA peripheral
    if n.bit_length() != 3072 or e < 3 or e % 2 == 0:
        raise SignatureError(f"{where}: the public key in the block is not a valid RSA-3072 key",
                             where=where, hint="the block is corrupt or was not made by espsecure")
    public_key = rsa.RSAPublicNumbers(e, n).public_key()
    import espsecure

    # R and M' are Montgomery constants the chip's RSA peripheral uses; the eFuse digest covers
    # them, so a block whose constants do not belong to n would fail on a device.
    prim = espsecure._get_sbv2_rsa_primitives(public_key)
    if prim.rinv != rinv or prim.m & 0xFFFFFFFF != m_prime:
        raise SignatureError(f"{where}: Montgomery constants R/M' do not match the key's modulus",
                             where=where, hint="the block was altered; re-sign the image")
    try:
        public_key.verify(signature, content_digest,
                          padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32),
                          utils.Prehashed(hashes.SHA256()))
    except InvalidSignature:
        raise SignatureError(
            f"{where}: RSA-PSS signature does not verify with the key in the block",
            where=where, hint="the signature bytes were altered; re-sign the image") from None


def verify_block(block: SignatureBlock, content_digest: bytes) -> bool:
    """True when one RSA block's signature verifies over ``content_digest`` with its own key.

    Shaped for ``sim.boot.SignatureVerifier`` (the virtual bootloader decides trust from the
    block's ``key_digest`` itself); never raises for a bad block.
    """
    if block.version != SIG_VERSION_RSA or not block.crc_ok or len(block.raw) < SIG_BLOCK_SIZE \
            or block.raw[4:36] != content_digest:
        return False
    try:
        _check_rsa_block(block.raw, block.index, content_digest)
    except SignatureError:
        return False
    return True


def verify_image(
    image: bytes,
    trusted: Iterable[bytes | str | Path],
    *,
    revoked: Iterable[bytes | str | Path] = (),
) -> Verification:
    """Verify every signature block and accept the image if a trusted, unrevoked key signed it.

    ``trusted`` and ``revoked`` are key digests (32 bytes or 64 hex digits, what eFuse
    BLOCK_KEYx holds) or key files (public or private PEM). A malformed or non-verifying block
    raises :class:`SignatureError` naming it, even if another block is good: a farm signs its
    own images, so a broken block means tampering or a tooling bug. A revoked key's block is
    verified but ignored for trust (eFuse ``KEY_REVOKEx``).
    """
    trusted_digests = _resolve_trusted(trusted)
    revoked_digests = set(_resolve_trusted(revoked))
    if not trusted_digests:
        raise UsageError("no trusted key given", hint="pass --key KEYFILE or --digest HEX")
    parsed = _parse(image)
    sector = parsed.signature_sector
    if sector is None:
        raise SignatureError("image is not signed: no Secure Boot V2 signature block after the "
                             f"image (looked at offset 0x{_next_sector(parsed.length):x})",
                             hint="sign it with `hilfarm ota sign IMAGE --key KEY -o OUT`")
    content_digest = hashlib.sha256(image[: sector.offset]).digest()
    raw_sector = image[sector.offset : sector.offset + SIG_SECTOR_SIZE]
    verdicts: list[BlockVerdict] = []
    for i in range(MAX_SIG_BLOCKS):
        blk = raw_sector[i * SIG_BLOCK_SIZE : (i + 1) * SIG_BLOCK_SIZE]
        where = f"signature block {i} (image offset 0x{sector.offset + i * SIG_BLOCK_SIZE:x})"
        if len(blk) < SIG_BLOCK_SIZE or blk == b"\xff" * SIG_BLOCK_SIZE:
            break  # unused space is 0xFF (espsecure pads the sector)
        if blk[0] != SIG_BLOCK_MAGIC:
            if i == 0:
                raise SignatureError(f"signature block 0 has magic 0x{blk[0]:02x}, expected "
                                     f"0x{SIG_BLOCK_MAGIC:02x}", where=where)
            raise SignatureError(
                f"signature block {i} has magic 0x{blk[0]:02x} (expected 0x{SIG_BLOCK_MAGIC:02x} "
                "or unused 0xFF)", where=where, hint="the signature sector was altered")
        (stored_crc,) = struct.unpack_from("<I", blk, _CRC_AT)
        calc_crc = zlib.crc32(blk[:_CRC_AT]) & 0xFFFFFFFF
        if stored_crc != calc_crc:
            raise SignatureError(
                f"signature block {i}: CRC32 mismatch (stored 0x{stored_crc:08x}, calculated "
                f"0x{calc_crc:08x})", where=where, hint="the signature block was altered")
        if blk[1] != SIG_VERSION_RSA:
            raise SignatureError(
                f"signature block {i}: scheme {_block_scheme(blk[1])} is not RSA-3072, the only "
                "Secure Boot V2 scheme of ESP32/S2/C3/S3 (notes §4.1)", where=where)
        if blk[4:36] != content_digest:
            raise SignatureError(
                f"signature block {i}: image digest {blk[4:36].hex()} does not match the "
                f"SHA-256 of the signed content {content_digest.hex()}", where=where,
                hint="the image content was modified after signing")
        _check_rsa_block(blk, i, content_digest)
        digest = hashlib.sha256(blk[36:812]).digest()
        if digest in revoked_digests:
            status = "revoked"
        elif digest in trusted_digests:
            status = "trusted"
        else:
            status = "untrusted"
        verdicts.append(BlockVerdict(i, digest, status))
    if not verdicts:
        raise SignatureError("image has an empty signature sector", where=f"image offset "
                             f"0x{sector.offset:x}", hint="sign the image")
    accepted = [v.index for v in verdicts if v.status == "trusted"]
    if not accepted:
        listing = ", ".join(f"block {v.index} {v.key_digest.hex()[:16]}... ({v.status})"
                            for v in verdicts)
        raise SignatureError(
            f"no signature block is from a trusted, unrevoked key: {listing}",
            hint="trust the signing key's digest (`hilfarm ota digest KEY`) or re-sign with a "
                 "trusted key")
    return Verification(parsed.chip, sector.offset, tuple(verdicts), accepted[0])


def _next_sector(length: int) -> int:
    return (length + SIG_SECTOR_SIZE - 1) // SIG_SECTOR_SIZE * SIG_SECTOR_SIZE

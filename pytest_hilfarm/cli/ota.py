"""``hilfarm ota``: inspect, keygen, sign, verify, digest, pubkey, release, verify-release.

Only argument parsing and printing; the work is in ``pytest_hilfarm.ota``. Handlers return an
exit code and raise ``pytest_hilfarm.errors`` types, which ``cli.main`` prints. Nothing here ever
prints a private key: outputs are file paths, public keys, digests and reports.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

from pytest_hilfarm.cli.common import NEGATIVE, OK, example
from pytest_hilfarm.errors import ImageError, SignatureError, UsageError


def _size(text: str) -> int:
    from pytest_hilfarm.esp.partitions import parse_size

    try:
        return parse_size(text)
    except ImageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_days(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of days") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} days: the expiry must be in the future")
    return value


def _read_image(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read image: {exc.strerror}", where=path) from None


def _check_not_input(path: str, source: str) -> None:
    out = Path(path)
    if out.exists() and out.resolve() == Path(source).resolve():
        raise UsageError("output would overwrite the input image", where=path,
                         hint="write the signed image to a new file with -o")


def _write_new(path: str, data: bytes) -> None:
    out = Path(path)
    try:
        out.write_bytes(data)
    except OSError as exc:
        raise UsageError(f"cannot write: {exc.strerror}", where=path) from None


def _cmd_inspect(args: argparse.Namespace) -> int:
    from pytest_hilfarm.ota.describe import format_report, inspect_image

    report = inspect_image(args.image, args.partition_size, partition_table=args.partition_table)
    if args.json:
        from dataclasses import asdict

        data = asdict(report)
        data["blocks"] = [{**asdict(b), "key_digest": b.key_digest_hex} for b in report.blocks]
        print(json.dumps(data, indent=2))
    else:
        print(format_report(report), end="")
    # Non-zero when something is wrong, so scripts can gate on it.
    return 0 if report.intact and report.fits is not False else 1


def _cmd_keygen(args: argparse.Namespace) -> int:
    from pytest_hilfarm.ota.keys import generate_signing_key, key_digest, write_public_key

    path = generate_signing_key(args.keyfile, args.scheme, verbose=args.verbose)
    print(f"wrote {args.scheme} private key {path} (mode 0600; keep it secret)")
    if args.pubkey_out:
        write_public_key(path, args.pubkey_out)
        print(f"wrote public key {args.pubkey_out}")
    if args.scheme == "rsa3072":
        print(f"key digest (eFuse SECURE_BOOT_DIGESTx): {key_digest(path).hex()}")
    return 0


def _cmd_sign(args: argparse.Namespace) -> int:
    from pytest_hilfarm.ota.signing import sign_image, signature_info

    _check_not_input(args.output, args.image)
    signed = sign_image(_read_image(args.image), args.key or (), append=args.append,
                        hsm_config=args.hsm_config, verbose=args.verbose)
    _write_new(args.output, signed)
    blocks = signature_info(signed)
    print(f"wrote {args.output} ({len(signed)} bytes, {len(blocks)} signature block(s))")
    for b in blocks:
        print(f"  block {b.index}: {b.scheme} key digest {b.key_digest_hex}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from pytest_hilfarm.ota.keys import parse_digest
    from pytest_hilfarm.ota.signing import verify_image

    trusted: list[Any] = [Path(k) for k in args.key or ()]
    trusted += [parse_digest(d, "--digest") for d in args.digest or ()]
    revoked = [parse_digest(d, "--revoked") for d in args.revoked or ()]
    image = _read_image(args.image)
    if not args.json:
        result = verify_image(image, trusted, revoked=revoked)
        for v in result.blocks:
            print(f"block {v.index}: signature valid, key {v.key_digest.hex()} ({v.status})")
        print(f"OK: {args.image} verified by block {result.accepted_by}")
        return OK
    try:
        result = verify_image(image, trusted, revoked=revoked)
    except SignatureError as exc:  # the verify ran and failed: a result, not a crash
        print(json.dumps({"image": args.image, "ok": False, "error": str(exc)}, indent=2))
        return NEGATIVE
    print(json.dumps({
        "image": args.image, "ok": True, "chip": result.chip, "accepted_by": result.accepted_by,
        "signed_length": result.signed_length,
        "blocks": [{"index": v.index, "key_digest": v.key_digest.hex(), "status": v.status}
                   for v in result.blocks],
    }, indent=2))
    return OK


def _cmd_digest(args: argparse.Namespace) -> int:
    from pytest_hilfarm.ota.keys import key_digest

    digest = key_digest(args.keyfile, verbose=args.verbose)
    if args.output:
        Path(args.output).write_bytes(digest)  # raw 32 bytes, like espsecure -o
        print(f"wrote {args.output}")
    print(digest.hex())
    return 0


def _cmd_pubkey(args: argparse.Namespace) -> int:
    from pytest_hilfarm.ota.keys import public_key_pem, write_public_key

    if args.output:
        write_public_key(args.keyfile, args.output)
        print(f"wrote {args.output}")
    else:
        print(public_key_pem(args.keyfile).decode(), end="")
    return 0


def _cmd_release(args: argparse.Namespace) -> int:
    from pytest_hilfarm.ota.manifest import make_release, write_manifest

    manifest = make_release(args.image, args.key, url=args.url,
                            expires_in=timedelta(days=args.expires_days))
    write_manifest(manifest, args.output)
    print(f"wrote {args.output}: {manifest.chip} {manifest.project} {manifest.version} "
          f"(secure_version {manifest.secure_version}), expires {manifest.expires}")
    return 0


def _cmd_verify_release(args: argparse.Namespace) -> int:
    from pytest_hilfarm.ota.manifest import verify_release

    try:
        m = verify_release(args.manifest, args.image, args.pubkey)
    except ImageError as exc:
        if args.image is None:
            raise
        # The manifest verified but describes another image: the check's result, not misuse.
        print(f"hilfarm: error: {exc}", file=sys.stderr)
        return NEGATIVE
    what = f" and {args.image} matches it" if args.image else ""
    print(f"OK: {args.manifest} is signed by the trusted key, valid until {m.expires}{what}")
    return 0


def register(subparsers: Any) -> None:
    """Add the ``ota`` command group."""
    ota = subparsers.add_parser("ota", help="OTA images: inspect, sign, verify, release manifests",
                                epilog=example("hilfarm ota inspect build/app.bin",
                                               "hilfarm ota verify signed.bin --key release.pem"))
    sub = ota.add_subparsers(dest="ota_command", metavar="ACTION")
    ota.set_defaults(handler=lambda a: (ota.print_help(), 2)[1])

    def verbose(p: argparse.ArgumentParser) -> None:
        p.add_argument("-v", "--verbose", action="store_true",
                       help="show espsecure's own output")

    p = sub.add_parser("inspect", help="chip, versions, hash check, signature blocks, fit",
                       description="Chip, versions, hash check, signature blocks and fit of an "
                       "app image. Exit code 1 when the image is not intact or does not fit.",
                       epilog=example("hilfarm ota inspect build/app.bin --partition-size 1M",
                                      "hilfarm ota inspect build/app.bin --json"))
    p.add_argument("image", help="ESP-IDF app image (.bin)")
    fit = p.add_mutually_exclusive_group()
    fit.add_argument("--partition-size", type=_size, metavar="N",
                     help="slot size to check the fit against (e.g. 1M, 0x100000)")
    fit.add_argument("--partition-table", metavar="FILE",
                     help="binary partition table; the fit is checked against ota_0")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=_cmd_inspect)

    p = sub.add_parser("keygen", help="create a private key (mode 0600)",
                       epilog=example("hilfarm ota keygen secure-boot.pem --pubkey-out sb-pub.pem",
                                      "hilfarm ota keygen release.pem --scheme ed25519"))
    p.add_argument("keyfile", help="private key file to create (PEM)")
    p.add_argument("--scheme", default="rsa3072", choices=("rsa3072", "ed25519"),
                   help="rsa3072: Secure Boot V2 signing key (ESP32/S2/C3); ed25519: release "
                        "manifest key (default: %(default)s)")
    p.add_argument("--pubkey-out", metavar="FILE", help="also write the public key here")
    verbose(p)
    p.set_defaults(handler=_cmd_keygen)

    p = sub.add_parser("sign", help="add Secure Boot V2 signature block(s) via espsecure",
                       epilog=example("hilfarm ota sign build/app.bin --key secure-boot.pem "
                                      "-o signed.bin"))
    p.add_argument("image", help="app image to sign (left unchanged)")
    p.add_argument("--key", action="append", metavar="KEYFILE",
                   help="RSA-3072 private key; repeat for several blocks (max 3; ESP32: 1)")
    p.add_argument("--append", action="store_true",
                   help="keep existing blocks (key rotation; not on ESP32)")
    p.add_argument("-o", "--output", required=True, help="signed image to write")
    p.add_argument("--hsm-config", metavar="FILE",
                   help="sign with a PKCS#11 HSM (espsecure --hsm-config format)")
    verbose(p)
    p.set_defaults(handler=_cmd_sign)

    p = sub.add_parser("verify", help="verify every signature block against trusted keys",
                       description="Verify every signature block of an image against trusted "
                       "keys. Exit code 1 when a block does not verify or no trusted key signed "
                       "it, 2 when an argument (key, digest, image) is bad.",
                       epilog=example("hilfarm ota verify signed.bin --key sb-pub.pem",
                                      "hilfarm ota verify signed.bin --digest $(hilfarm ota "
                                      "digest sb-pub.pem) --json"))
    p.add_argument("image", help="signed app image")
    p.add_argument("--key", action="append", metavar="KEYFILE", help="trusted key (PEM)")
    p.add_argument("--digest", action="append", metavar="HEX",
                   help="trusted key digest, as burned into eFuse (64 hex digits)")
    p.add_argument("--revoked", action="append", metavar="HEX", help="revoked key digest")
    p.add_argument("--json", action="store_true",
                   help="machine-readable result (blocks, key digests, which block is trusted)")
    p.set_defaults(handler=_cmd_verify)

    p = sub.add_parser("digest", help="Secure Boot V2 public key digest (eFuse value)",
                       epilog=example("hilfarm ota digest sb-pub.pem -o digest.bin"))
    p.add_argument("keyfile", help="RSA-3072 key file (public or private PEM)")
    p.add_argument("-o", "--output", help="also write the raw 32 bytes here")
    verbose(p)
    p.set_defaults(handler=_cmd_digest)

    p = sub.add_parser("pubkey", help="print or write the public half of a key",
                       epilog=example("hilfarm ota pubkey release.pem -o release-pub.pem"))
    p.add_argument("keyfile", help="private key file (PEM)")
    p.add_argument("-o", "--output", help="write the public key here (default: print it)")
    p.set_defaults(handler=_cmd_pubkey)

    p = sub.add_parser("release", help="write a signed release manifest for an image",
                       epilog=example("hilfarm ota release signed.bin --key release.pem "
                                      "--url https://fw.example.com/app-1.2.0.bin "
                                      "-o app-1.2.0.manifest.json"))
    p.add_argument("image", help="the (signed) app image the manifest describes")
    p.add_argument("--key", required=True, metavar="RELEASE_KEY",
                   help="Ed25519 (or RSA) release key")
    p.add_argument("--url", help="where devices download the image (http/https)")
    p.add_argument("--expires-days", type=_positive_days, default=30.0, metavar="N",
                   help="manifest lifetime in days (default: %(default)s)")
    p.add_argument("-o", "--output", required=True, metavar="MANIFEST",
                   help="manifest file to write (JSON)")
    p.set_defaults(handler=_cmd_release)

    p = sub.add_parser("verify-release", help="check a manifest's signature, expiry and image",
                       epilog=example("hilfarm ota verify-release app-1.2.0.manifest.json "
                                      "--image signed.bin --pubkey release-pub.pem"))
    p.add_argument("manifest", help="release manifest (JSON) to check")
    p.add_argument("--image", help="image the manifest must describe (sha256, size, chip)")
    p.add_argument("--pubkey", required=True, help="trusted release public key (PEM)")
    p.set_defaults(handler=_cmd_verify_release)

"""Sign + verify throughput for a 1 MB app image: in-process API vs the espsecure CLI per image.

Issue 5, section 6. The image is a real ESP32-C3 app from ``sim/appbuild.build_app`` padded to
1 MB. "In-process" is ``ota.signing.sign_image`` + ``verify_image`` (espsecure's ``sign_data``
under the hood, our digest-based verifier), once with a key file per call (espsecure loads and
validates the key every time) and once with keys preloaded by ``load_signing_keys``; "CLI" is
``python -m espsecure sign-data`` then ``verify-signature`` in a fresh subprocess per image, as a
shell script or Makefile would do it.
Each side signs and verifies the same images with the same RSA-3072 key, and checks the result.

Run: ``python bench/bench_ota_sign.py [--images 10] [--cli-images 4]``. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pytest_hilfarm.ota.keys import generate_signing_key, key_digest  # noqa: E402
from pytest_hilfarm.ota.signing import (  # noqa: E402
    SigningKeys,
    load_signing_keys,
    sign_image,
    verify_image,
)
from pytest_hilfarm.sim.appbuild import build_app  # noqa: E402


def _in_process(images: list[bytes], key: Path, preloaded: bool) -> float:
    digest = key_digest(key)
    start = time.perf_counter()
    keys: list[Path] | SigningKeys = load_signing_keys([key]) if preloaded else [key]
    for image in images:
        signed = sign_image(image, keys)
        verify_image(signed, [digest])
    return time.perf_counter() - start


def _cli(images: list[bytes], key: Path, work: Path) -> float:
    paths = []
    for i, image in enumerate(images):
        p = work / f"app{i}.bin"
        p.write_bytes(image)
        paths.append(p)
    start = time.perf_counter()
    for p in paths:
        out = p.with_suffix(".signed.bin")
        subprocess.run([sys.executable, "-m", "espsecure", "sign-data", "--version", "2",
                        "--keyfile", str(key), "--output", str(out), str(p)],
                       check=True, capture_output=True)
        subprocess.run([sys.executable, "-m", "espsecure", "verify-signature", "--version", "2",
                        "--keyfile", str(key), str(out)], check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=10, help="images for the in-process run")
    ap.add_argument("--cli-images", type=int, default=4, help="images for the CLI run")
    args = ap.parse_args()
    # Distinct versions so no run can reuse another image's bytes.
    images = [build_app("esp32c3", "bench", f"1.0.{i}", pad_to="1MB")
              for i in range(max(args.images, args.cli_images))]
    size = len(images[0])
    with tempfile.TemporaryDirectory(prefix="bench-hilfarm-ota-") as tmp:
        work = Path(tmp)
        key = generate_signing_key(work / "key.pem")
        _in_process(images[:1], key, False)  # warm up imports and caches
        api_s = _in_process(images[: args.images], key, False)
        pre_s = _in_process(images[: args.images], key, True)
        cli_s = _cli(images[: args.cli_images], key, work)
    api_rate = args.images / api_s
    pre_rate = args.images / pre_s
    cli_rate = args.cli_images / cli_s
    print(f"Sign + verify, {size} byte ESP32-C3 image, RSA-3072, Python "
          f"{sys.version.split()[0]}\n")
    print("| path | images | seconds | images/s | ms/image |")
    print("|---|---:|---:|---:|---:|")
    print(f"| in-process API, key file per image | {args.images} | {api_s:.2f} | "
          f"{api_rate:.1f} | {1000 / api_rate:.0f} |")
    print(f"| in-process API, keys preloaded (load_signing_keys) | {args.images} | "
          f"{pre_s:.2f} | {pre_rate:.1f} | {1000 / pre_rate:.0f} |")
    print(f"| espsecure CLI per image (sign-data + verify-signature) | {args.cli_images} | "
          f"{cli_s:.2f} | {cli_rate:.2f} | {1000 / cli_rate:.0f} |")
    print(f"\nratio vs CLI: key file per image {api_rate / cli_rate:.1f}x, "
          f"preloaded keys {pre_rate / cli_rate:.1f}x")


if __name__ == "__main__":
    main()

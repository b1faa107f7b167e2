"""``hilfarm ota inspect``: what an app image is, whether it is intact, signed, and fits a slot.

Reads one image file and, optionally, a binary partition table, and reports chip, project,
version, secure_version, idf_ver, checksum and appended-hash checks, Secure Boot V2 blocks with
their key digests (what eFuse must hold) and the fit in a partition. It does not decide trust:
which digests a device accepts is ``verify_image``'s question, so no keys are needed here.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from pytest_hilfarm.errors import ImageError, UsageError
from pytest_hilfarm.esp.image import parse_image
from pytest_hilfarm.esp.partitions import PartitionTable
from pytest_hilfarm.ota.signing import BlockInfo, signature_info


@dataclass(frozen=True)
class ImageReport:
    """Facts about one image file; ``fits`` is None when no partition size was given."""

    path: str
    size: int
    chip: str | None
    chip_id: int
    project: str | None
    version: str | None
    secure_version: int | None
    idf_ver: str | None
    build_date: str | None
    checksum_ok: bool
    sha256_ok: bool | None  # None: no SHA-256 appended
    image_sha256: str  # of the whole file, what a release manifest records
    signed_length: int | None
    blocks: tuple[BlockInfo, ...]
    partition: str | None  # where the size came from
    partition_size: int | None
    fits: bool | None

    @property
    def signed(self) -> bool:
        return bool(self.blocks)

    @property
    def intact(self) -> bool:
        """Checksum, appended hash and every signature block's digest all agree."""
        return self.checksum_ok and self.sha256_ok is not False and \
            all(b.crc_ok and b.digest_ok for b in self.blocks)


def _slot_size(table_path: Path) -> tuple[str, int]:
    try:
        raw = table_path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read partition table: {exc.strerror}",
                         where=str(table_path)) from None
    try:
        table = PartitionTable.decode(raw)
    except ImageError as exc:
        raise ImageError(f"not a binary partition table: {exc.what}", where=str(table_path),
                         hint="pass build/partition_table/partition-table.bin") from None
    # OTA images are written to ota_N; with no OTA slots the factory partition is the target.
    slot = table.ota_slots.get(0) or table.factory
    if slot is None:
        raise ImageError("partition table has neither an ota_0 nor a factory app partition",
                         where=str(table_path))
    return f"{slot.label} in {table_path}", slot.size


def inspect_image(
    path: str | Path,
    partition_size: int | None = None,
    *,
    partition_table: str | Path | None = None,
) -> ImageReport:
    """Inspect the image at ``path``; a corrupt checksum or hash is reported, not raised.

    ``partition_size`` (bytes) or ``partition_table`` (binary table; its ota_0 size, else
    factory) gives the slot to check the fit against.
    """
    p = Path(path)
    if partition_size is not None and partition_table is not None:
        raise UsageError("give a partition size or a partition table, not both")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read image: {exc.strerror}", where=str(p)) from None
    try:
        parsed = parse_image(data, verify=False)
    except ImageError as exc:
        raise ImageError(f"not an ESP app image: {exc.what}", where=f"{p}: {exc.where}",
                         hint=exc.hint) from None
    desc = parsed.app_desc
    label: str | None = None
    size: int | None = partition_size
    if partition_size is not None:
        label = "given size"
    elif partition_table is not None:
        label, size = _slot_size(Path(partition_table))
    return ImageReport(
        path=str(p), size=len(data), chip=parsed.chip, chip_id=parsed.header.chip_id,
        project=desc.project_name if desc else None, version=desc.version if desc else None,
        secure_version=desc.secure_version if desc else None,
        idf_ver=desc.idf_ver if desc else None,
        build_date=f"{desc.date} {desc.time}".strip() if desc else None,
        checksum_ok=parsed.checksum_ok, sha256_ok=parsed.sha256_ok,
        image_sha256=hashlib.sha256(data).hexdigest(), signed_length=parsed.signed_length,
        blocks=signature_info(data), partition=label, partition_size=size,
        fits=None if size is None else len(data) <= size,
    )


def _ok(flag: bool | None, none_text: str = "not present") -> str:
    if flag is None:
        return none_text
    return "ok" if flag else "MISMATCH"


def format_report(report: ImageReport) -> str:
    """Plain-text report, one ``name: value`` per line."""
    chip = report.chip or f"unknown (chip_id {report.chip_id})"
    lines = [
        f"image:          {report.path} ({report.size} bytes)",
        f"chip:           {chip}",
        f"project:        {report.project or '-'}",
        f"version:        {report.version or '-'}",
        f"secure_version: {report.secure_version if report.secure_version is not None else '-'}",
        f"idf_ver:        {report.idf_ver or '-'}",
        f"built:          {report.build_date or '-'}",
        f"checksum:       {_ok(report.checksum_ok)}",
        f"sha256 (hash):  {_ok(report.sha256_ok)}",
        f"file sha256:    {report.image_sha256}",
    ]
    if report.blocks:
        lines.append(f"signature:      Secure Boot V2, {len(report.blocks)} block(s), signed data "
                     f"0x0..0x{report.signed_length or 0:x}")
        for b in report.blocks:
            lines.append(f"  block {b.index}: {b.scheme} key digest {b.key_digest_hex} "
                         f"crc {_ok(b.crc_ok)} digest {_ok(b.digest_ok)}")
    else:
        lines.append("signature:      unsigned")
    if report.partition_size is not None:
        verdict = "fits" if report.fits else "DOES NOT FIT"
        room = report.partition_size - report.size
        lines.append(f"partition:      {report.partition} 0x{report.partition_size:x} bytes: "
                     f"{verdict} ({'free' if room >= 0 else 'over by'} {abs(room)} bytes)")
    return "\n".join(lines) + "\n"

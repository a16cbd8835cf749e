"""`mri-vqvae manifest`: build, verify, split and merge dataset manifests; fetch a file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from mri_vqvae.data.case import SPLITS
from mri_vqvae.tasks.cases import Failure
from pipelines.common import data_root_option, report_failures


def _fractions(ctx: click.Context, param: click.Parameter, value: str | None) -> dict | None:
    """Parse ``0.8,0.1,0.1`` into {"train": .8, "val": .1, "test": .1}."""
    if value is None:
        return None
    try:
        numbers = [float(v) for v in value.split(",")]
    except ValueError:
        numbers = []
    if len(numbers) != 3 or min(numbers) < 0 or abs(sum(numbers) - 1) > 1e-6:
        raise click.BadParameter(f"expected 3 numbers >= 0 summing to 1 (train,val,test), "
                                 f"like 0.8,0.1,0.1; got {value!r}")
    return dict(zip(SPLITS, numbers, strict=True))


def _fixed(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> dict[str, str]:
    """Parse repeated ``SUBJECT=SPLIT``."""
    fixed = {}
    for item in value:
        subject, _, split = item.rpartition("=")
        if not subject or split not in SPLITS:
            raise click.BadParameter(f"expected SUBJECT=train|val|test, got {item!r}")
        fixed[subject] = split
    return fixed


def _describer() -> Callable[[Path], Any]:
    """The image inspector (imported here: it pulls in the image readers)."""
    from mri_vqvae.data.io import inspect_image

    return inspect_image


def _counts(manifest: Any) -> str:
    counts = manifest.split_counts()
    return ", ".join(f"{k} {counts[k]}" for k in (*SPLITS, "none") if k in counts)


def _table(rows: list[tuple[str, str, str]]) -> str:
    headers = ("case_id", "path", "reason")
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(2)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]}" for r in [headers, *rows]]
    lines.insert(1, f"{'-' * widths[0]}  {'-' * widths[1]}  ------")
    return "\n".join(lines)


@click.group()
def manifest() -> None:
    """Dataset manifests: which files, from which source, in which split, with checksums."""


@manifest.command()
@click.argument("root", type=click.Path(exists=True, file_okay=False))
@click.option("--source-id", required=True, help="Source id (see data_manifests/sources.json).")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False),
              help="Manifest JSON to write.")
@click.option("--name", default=None, help="Manifest name (default: the source id).")
@click.option("--seed", type=int, default=0, show_default=True, help="Split seed.")
@click.option("--fractions", default="0.8,0.1,0.1", show_default=True, callback=_fractions,
              help="train,val,test fractions of subjects.")
@click.option("--modality", default="T1w", show_default=True,
              help="Modality for files whose name does not say.")
@click.option("--catalog", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Sources catalog the source id must appear in.")
@click.option("--force", is_flag=True,
              help="Ignore the splits of an existing --out file (default: keep them).")
@click.option("--strict", is_flag=True, help="Exit 1 when any file could not be read.")
def build(root: str, source_id: str, out_path: str, name: str | None, seed: int,
          fractions: dict[str, float], modality: str, catalog: str | None, force: bool,
          strict: bool) -> None:
    """Scan ROOT (BIDS, IXI, DICOM series folders, flat NIfTI/NRRD/MHA) into a split manifest.

    Unreadable files are listed (file | reason) and left out; the manifest holds the rest.
    Subjects already split in an existing --out keep their split unless --force.
    """
    from mri_vqvae.core.errors import ManifestError
    from mri_vqvae.data.catalog import load_catalog
    from mri_vqvae.data.manifest import Manifest, load_manifest, write_manifest
    from mri_vqvae.data.scan import scan_folder
    from mri_vqvae.data.splits import assign_splits

    if catalog and source_id not in load_catalog(catalog):
        raise click.BadParameter(f"{source_id!r} is not in {catalog}", param_hint="--source-id")
    cases, problems = scan_folder(root, _describer(), source_id, modality_default=modality)
    failures = [Failure("-", p.path, p.reason) for p in problems]
    if not cases:
        report_failures(failures, False, "file(s)")
        raise click.ClickException(f"no readable images under {root}")
    kept = {}
    if Path(out_path).is_file() and not force:
        try:
            old = load_manifest(out_path, check_files=False)
        except ManifestError as exc:
            raise click.ClickException(f"{exc}\n(pass --force to ignore the existing --out "
                                       "and its splits)") from None
        kept = {c.subject_id: c.split for c in old.cases if c.split}
        if kept:
            click.echo(f"keeping the splits of {len(kept)} subject(s) from {out_path}")
    cases = assign_splits(cases, fractions, seed, kept)
    result = Manifest(name or source_id, tuple(cases), seed, fractions, Path(root))
    digest = write_manifest(result, out_path)
    click.echo(f"wrote {out_path}: {len(cases)} case(s) ({_counts(result)}), digest {digest}")
    report_failures(failures, strict, "file(s)")


@manifest.command()
@click.argument("manifest_path", type=click.Path(dir_okay=False))
@data_root_option
@click.option("--catalog", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Sources catalog every source id must appear in.")
@click.option("--quick", is_flag=True, help="Check presence and size only, not sha256.")
def verify(manifest_path: str, data_root: str | None, catalog: str | None, quick: bool) -> None:
    """Check files, sizes, checksums and subject-disjoint splits; exit 1 naming each bad case."""
    from mri_vqvae.core.errors import ManifestError
    from mri_vqvae.data.catalog import load_catalog
    from mri_vqvae.data.manifest import load_manifest, verify_manifest

    sources = load_catalog(catalog) if catalog else None
    try:
        loaded = load_manifest(manifest_path, data_root=data_root, check_files=False,
                               catalog=sources)
    except ManifestError as exc:
        click.echo(f"FAILED {exc}", err=True)
        raise click.exceptions.Exit(1) from None
    problems = verify_manifest(loaded, catalog=sources, checksums=not quick)
    if problems:
        rows = [(p.case_id or "-", p.path, p.reason) for p in problems]
        click.echo(f"FAILED {manifest_path}: {len(problems)} problem(s)\n{_table(rows)}", err=True)
        raise click.exceptions.Exit(1)
    click.echo(f"ok {manifest_path}: {len(loaded.cases)} case(s) ({_counts(loaded)}), "
               f"digest {loaded.digest}")


@manifest.command("split")
@click.argument("manifest_path", type=click.Path(exists=True, dir_okay=False))
@click.option("--seed", type=int, default=None, help="Split seed (default: the stored one).")
@click.option("--fractions", default=None, callback=_fractions,
              help="train,val,test fractions (default: the stored ones).")
@click.option("--fix", "fixed", multiple=True, callback=_fixed, metavar="SUBJECT=SPLIT",
              help="Put a subject in a split (repeatable).")
@click.option("--force", is_flag=True, help="Re-split a manifest whose splits are frozen.")
def split_cmd(manifest_path: str, seed: int | None, fractions: dict[str, float] | None,
              fixed: dict[str, str], force: bool) -> None:
    """Assign train/val/test by subject and rewrite the manifest in place."""
    from mri_vqvae.data.manifest import load_manifest, write_manifest
    from mri_vqvae.data.splits import split_manifest

    loaded = load_manifest(manifest_path, check_files=False)
    result = split_manifest(loaded, fractions, seed, fixed, force=force)
    digest = write_manifest(result, manifest_path)
    click.echo(f"split {manifest_path} (seed {result.split_seed}): {_counts(result)}; "
               f"digest {digest}")


@manifest.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False))
@click.option("--name", required=True, help="Name of the merged manifest.")
def merge(inputs: tuple[str, ...], out_path: str, name: str) -> None:
    """Collate several manifests into one, keeping each case's source and provenance."""
    from mri_vqvae.data.manifest import load_manifest, write_manifest
    from mri_vqvae.data.merge import merge_manifests

    merged = merge_manifests([load_manifest(p) for p in inputs], name)
    digest = write_manifest(merged, out_path)
    click.echo(f"wrote {out_path}: {len(merged.cases)} case(s) from {len(inputs)} manifest(s) "
               f"({_counts(merged)}), data root {merged.data_root}, digest {digest}")


_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _size(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    """Parse a byte count such as ``500000``, ``800M`` or ``2G`` (binary units)."""
    if value is None:
        return None
    text = value.strip().upper().removesuffix("B").removesuffix("I")
    unit = text[-1:] if text[-1:] in _SIZE_UNITS else ""
    try:
        size = int(float(text.removesuffix(unit) or "x") * _SIZE_UNITS[unit])
    except (ValueError, OverflowError):
        size = 0
    if size <= 0:
        raise click.BadParameter(f"expected a positive size like 500000, 800M or 2G; got "
                                 f"{value!r}")
    return size


@manifest.command("fetch")
@click.argument("url")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False))
@click.option("--sha256", default=None,
              help="Expected sha256 (strongly recommended; required to accept a file whose "
                   "server sends no length).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=60.0,
              show_default=True, metavar="SECONDS",
              help="Give up when connecting, or any wait for data, takes longer.")
@click.option("--total-timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              metavar="SECONDS",
              help="Give up when the whole download takes longer (default: no limit, as "
                   "stalls are caught by --timeout); the partial file is kept to resume.")
@click.option("--max-bytes", default=None, callback=_size, metavar="SIZE",
              help="Refuse a file larger than SIZE: bytes, or 800M, 2G ... (default: the "
                   "length the server announces, else 64G).")
def fetch_cmd(url: str, out_path: str, sha256: str | None, timeout: float,
              total_timeout: float | None, max_bytes: int | None) -> None:
    """Download URL to --out (resumable), checking its sha256.

    An interrupted download stays in OUT.part (with OUT.part.json recording its source) and the
    same command resumes it, but only from the same URL and unchanged server file; otherwise it
    starts over. A body longer than announced or over --max-bytes is refused and deleted.
    """
    from mri_vqvae.data.download import fetch

    path = fetch(url, out_path, sha256=sha256, timeout=timeout, total_timeout=total_timeout,
                 max_bytes=max_bytes)
    click.echo(f"fetched {path}")


if __name__ == "__main__":
    manifest()

"""`mri-vqvae preprocess`: normalise the cases of a manifest into RAS NIfTI plus montages."""

from __future__ import annotations

from pathlib import Path

import click

from mri_vqvae.tasks.parts import Part
from pipelines.common import (
    bids_option,
    config_options,
    data_root_option,
    part_option,
    report_failures,
    resolve,
    split_option,
    strict_option,
    written,
)


@click.command()
@click.option("--manifest", "manifest_path", required=True, type=click.Path(dir_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
@data_root_option
@split_option
@strict_option
@part_option
@bids_option
@config_options
def preprocess(manifest_path: str, out_dir: str, data_root: str | None, split: str | None,
               strict: bool, part: Part | None, bids: bool, config_name: str | None,
               overrides: tuple[str, ...]) -> None:
    """Write normalised NIfTI (RAS, target spacing and shape), one montage per case, an index.

    Rerunning into the same --out reuses every finished case whose outputs still verify (same
    source file and data config, NIfTI sha256 unchanged) and computes the rest, so an
    interrupted run is resumed by running it again; no --resume flag is needed. A different
    config or a changed source file recomputes the case. The folder is checked for writes
    before the first case, a full disk stops the run (exit 2), and a second run into an --out
    in use is refused.
    """
    from mri_vqvae.data.manifest import load_manifest
    from mri_vqvae.tasks.preprocess import preprocess_manifest

    config = resolve(config_name, overrides)
    manifest = load_manifest(manifest_path, data_root=data_root, check_files=False)
    done, failures = preprocess_manifest(manifest, config, out_dir, split=split, strict=strict,
                                         part=part, bids=bids)
    click.echo(f"preprocessed {len(done)} case(s) into {Path(out_dir).resolve()} "
               f"{written(out_dir, part, 'index.json, images/, montages/')}")
    report_failures(failures, strict, "case(s)")


if __name__ == "__main__":
    preprocess()

"""`mri-vqvae data kit`: fetch the offline real-MRI kit and write its collection manifest."""

from __future__ import annotations

import json
from pathlib import Path

import click

from pipelines.common import config_options, default_cache_dir, resolve


@click.group()
def data() -> None:
    """Default data: the offline real-MRI kit."""


@data.command()
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Kit folder (default: $MRI_VQVAE_CACHE/kit or ~/.cache/mri-vqvae/kit).")
@click.option("--mirror", default=None, type=click.Path(file_okay=False),
              help="Local copy of the URL sources' files (same relative paths as upstream, e.g. "
              "raw/patient01/study1_T1W.nii.gz), used instead of the network; default "
              "$MRI_VQVAE_KIT_MIRROR. Each file must have its recorded sha256.")
@config_options
def kit(out_dir: str | None, mirror: str | None, config_name: str | None,
        overrides: tuple[str, ...]) -> None:
    """Download the packages and URLs that carry real brain MRI, verify, augment, write the
    manifest."""
    from mri_vqvae.data.kit import build_kit

    config = resolve(config_name, overrides)
    root = Path(out_dir) if out_dir else default_cache_dir() / "kit"
    manifest = build_kit(root, config.kit, config.augment, mirror=mirror)
    skipped = json.loads((root / "skipped.json").read_text(encoding="utf-8"))
    if skipped:
        sources = sorted({row["source_id"] for row in skipped})
        click.echo(f"skipped {len(skipped)} file(s) of {', '.join(sources)}: reasons in "
                   f"{root / 'skipped.json'}", err=True)
    click.echo(f"kit ready: {manifest}")


if __name__ == "__main__":
    data()

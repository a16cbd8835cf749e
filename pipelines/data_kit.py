"""`mri-vqvae data kit`: fetch the offline real-MRI kit and write its collection manifest."""

from __future__ import annotations

from pathlib import Path

import click

from pipelines.common import config_options, default_cache_dir, resolve


@click.group()
def data() -> None:
    """Default data: the offline real-MRI kit."""


@data.command()
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Kit folder (default: $MRI_VQVAE_CACHE/kit or ~/.cache/mri-vqvae/kit).")
@config_options
def kit(out_dir: str | None, config_name: str | None, overrides: tuple[str, ...]) -> None:
    """Download the packages that carry real brain MRI, verify, augment, write the manifest."""
    from mri_vqvae.kit import build_kit

    config = resolve(config_name, overrides)
    root = Path(out_dir) if out_dir else default_cache_dir() / "kit"
    manifest = build_kit(root, config.kit, config.augment)
    click.echo(f"kit ready: {manifest}")


if __name__ == "__main__":
    data()

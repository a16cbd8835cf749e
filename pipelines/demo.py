"""`mri-vqvae demo`: the main job on the embedded default data (the offline real-MRI kit).

Today it runs the data stage end to end: kit → manifest verify → preprocess → montages.
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from pipelines.common import config_options, default_cache_dir, report_failures, resolve


@click.command()
@click.option("--out", "out_dir", default="runs/demo", show_default=True,
              type=click.Path(file_okay=False), help="Where this demo run's folder goes.")
@click.option("--kit", "kit_dir", default=None, type=click.Path(file_okay=False),
              help="Kit folder (default: $MRI_VQVAE_CACHE/kit or ~/.cache/mri-vqvae/kit).")
@click.option("--quick", is_flag=True, help="Toy sizes for CI: one pseudo-subject per source.")
@config_options
def demo(out_dir: str, kit_dir: str | None, quick: bool, config_name: str | None,
         overrides: tuple[str, ...]) -> None:
    """Run kit → manifest → preprocess → montage on the embedded default data."""
    from mri_vqvae.kit import build_kit
    from mri_vqvae.manifest import load_manifest, verify_manifest
    from mri_vqvae.preprocess import preprocess_manifest

    if quick:
        overrides = ("kit.pseudo_subjects=1", *overrides)
    config = resolve(config_name or "brain64", overrides)
    kit_root = Path(kit_dir) if kit_dir else default_cache_dir() / "kit"
    click.echo(f"[1/3] kit → {kit_root}")
    manifest_path = build_kit(kit_root, config.kit, config.augment)
    manifest = load_manifest(manifest_path)
    problems = verify_manifest(manifest)
    if problems:
        raise click.ClickException(f"kit manifest does not verify: {problems}")
    click.echo(f"[2/3] manifest verified: {len(manifest.cases)} cases, "
               f"digest {manifest.digest[:12]}")
    run_dir = Path(out_dir) / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    done, failures = preprocess_manifest(manifest, config, run_dir / "preprocessed")
    click.echo(f"[3/3] preprocessed {len(done)} case(s): montages in "
               f"{(run_dir / 'preprocessed' / 'montages').resolve()}")
    report_failures(failures, True, "case(s)")


if __name__ == "__main__":
    demo()

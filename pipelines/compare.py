"""`mri-vqvae compare`: priors side by side, from their evaluation folders."""

from __future__ import annotations

import sys

import click


@click.command("compare")
@click.argument("eval_dirs", nargs=-1, required=True,
                type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for compare.html and compare.json.")
def compare(eval_dirs: tuple[str, ...], out_dir: str) -> None:
    """Compare priors evaluated on one VQ-VAE, manifest and split (`evaluate --prior` each):
    bits, speed, plausibility, diversity, memorisation and samples side by side."""
    from mri_vqvae.evaluation.compare import compare_evaluations

    page = compare_evaluations(eval_dirs, out_dir)
    click.echo(f"wrote {page} and {page.with_name('compare.json')}")


if __name__ == "__main__":
    from pipelines.cli import main

    sys.argv.insert(1, "compare")
    main()

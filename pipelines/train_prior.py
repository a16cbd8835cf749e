"""`mri-vqvae train-prior`: train the configured prior on latent grids (also ``python -m``)."""

from __future__ import annotations

import sys
from typing import Any

import click

from pipelines.common import config_options, resolve_run_config, run_folder_options


def _bits(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def likelihood_table(report: dict[str, Any]) -> str:
    """The likelihood.json numbers as a small text table (bits per latent)."""
    lines = [f"{'split':<6} {'cases':>5} {'prior':>8} {'unigram':>8} {'uniform':>8}"]
    for split, row in report["splits"].items():
        lines.append(
            f"{split:<6} {row['num_cases']:>5} {_bits(row['prior_bits_per_latent']):>8} "
            f"{_bits(row['unigram_bits_per_latent']):>8} {_bits(row['uniform_bits_per_latent']):>8}"
        )
    return "\n".join(lines)


@click.command("train-prior")
@click.option("--latents", "latents_dir", default=None, type=click.Path(file_okay=False),
              help="Latents folder made by `mri-vqvae encode` (default with --resume: the run's "
              "own).")
@run_folder_options("prior")
@config_options
def train_prior(latents_dir: str | None, resume_dir: str | None, runs_root: str,
                config_name: str | None, overrides: tuple[str, ...]) -> None:
    """Train the prior; writes checkpoints, metrics, TensorBoard scalars and likelihood.json.

    Under torchrun (several processes) trains with DDP: train_prior.batch_size is the global
    batch and only rank 0 writes or prints.
    """
    from mri_vqvae.core import distributed
    from mri_vqvae.training import prior_stage

    if resume_dir is None and latents_dir is None:
        raise click.BadParameter("give the latents folder made by `mri-vqvae encode`",
                                 param_hint="--latents")
    config = resolve_run_config(resume_dir, config_name, overrides)
    with distributed.process_group(config.train_prior.device):
        result = prior_stage.train_prior(config, latents_dir, runs_root=runs_root,
                                         resume=resume_dir, argv=sys.argv)
        main = distributed.is_main()
    if not main:
        return
    click.echo(f"run written to {result.run_dir.resolve()} (step {result.step}, "
               f"{result.stop_reason}; best val {_bits(result.best_metric)} bits/latent)")
    if result.likelihood is not None:
        click.echo(f"bits per latent ({result.run_dir / prior_stage.LIKELIHOOD}):")
        click.echo(likelihood_table(result.likelihood))
    if result.stop_reason != "max_steps":
        click.echo(f"continue with: mri-vqvae train-prior --resume {result.run_dir}")


if __name__ == "__main__":
    from pipelines.cli import main

    sys.argv.insert(1, "train-prior")  # same as `mri-vqvae train-prior ...`, same error handling
    main()

"""`mri-vqvae train-vqvae`: train the 3D VQ-VAE on a manifest (also ``python -m`` this module)."""

from __future__ import annotations

import sys

import click

from pipelines.common import (
    config_options,
    data_root_option,
    preprocessed_option,
    resolve_run_config,
    run_folder_options,
)


@click.command("train-vqvae")
@click.option("--manifest", "manifest_path", default=None, type=click.Path(dir_okay=False),
              help="Dataset manifest: trains on its train split, validates on its val split "
              "(with --resume: default the run's recorded manifest, digest checked).")
@data_root_option
@run_folder_options("vqvae")
@preprocessed_option
@config_options
def train_vqvae(manifest_path: str | None, data_root: str | None, resume_dir: str | None,
                runs_root: str, preprocessed: str | None, config_name: str | None,
                overrides: tuple[str, ...]) -> None:
    """Train the VQ-VAE; writes checkpoints, metrics, TensorBoard scalars and previews.

    Under torchrun (several processes) trains with DDP: train_vqvae.batch_size is the global
    batch and only rank 0 writes or prints.
    """
    from mri_vqvae.core import distributed
    from mri_vqvae.training import autoencoder_stage

    if manifest_path is None and resume_dir is None:
        raise click.UsageError("give --manifest M.json (or --resume RUN_DIR)")
    config = resolve_run_config(resume_dir, config_name, overrides)
    with distributed.process_group(config.train_vqvae.device):
        result = autoencoder_stage.train_vqvae(
            config, manifest_path, runs_root=runs_root, resume=resume_dir, data_root=data_root,
            argv=sys.argv, preprocessed=preprocessed)
        main = distributed.is_main()
    if not main:
        return
    best = f"{result.best_psnr:.2f} dB" if result.best_psnr is not None else "n/a"
    click.echo(f"run written to {result.run_dir.resolve()} (step {result.step}, "
               f"{result.stop_reason}; best val PSNR {best})")
    if result.stop_reason != "max_steps":
        click.echo(f"continue with: mri-vqvae train-vqvae --resume {result.run_dir}")


if __name__ == "__main__":
    from pipelines.cli import main

    sys.argv.insert(1, "train-vqvae")  # same as `mri-vqvae train-vqvae ...`, same error handling
    main()

"""`mri-vqvae sample`: synthetic volumes from a trained prior run (also `python -m` it)."""

from __future__ import annotations

import sys

import click

DEVICES = ("auto", "cpu", "cuda")


def pick_device(name: str) -> str:
    """``auto`` -> cuda when available, else cpu; other names pass through."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@click.command("sample")
@click.option("--prior", "prior_run", required=True, type=click.Path(exists=True),
              help="Prior run folder runs/prior/<run>/ (uses checkpoints/best, else last).")
@click.option("-n", "--num-samples", default=4, show_default=True, type=click.IntRange(min=1),
              help="How many volumes to draw.")
@click.option("--temperature", default=None, type=click.FloatRange(min=0),
              help="Softmax temperature (default: the prior config's, usually 1.0).")
@click.option("--top-k", default=None, type=click.IntRange(min=1),
              help="Draw only among the k most likely codes (default: the prior config's).")
@click.option("--seed", default=0, show_default=True, type=int,
              help="Seed of the sampling generator (with -n and --batch-size fixes the output).")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Output folder. Default: RUNS_ROOT/samples/<prior-run>/<UTC>-s<seed>/.")
@click.option("--runs-root", default="runs", show_default=True, type=click.Path(file_okay=False))
@click.option("--method", type=click.Choice(["fast", "naive"]), default="fast", show_default=True,
              help="fast: cached sampler; naive: recompute per position (same draws, slow).")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1),
              help="Grids drawn together (changing it changes the samples of a seed).")
@click.option("--greedy", is_flag=True,
              help="Ablation only: take the most likely code everywhere (not a sampler).")
@click.option("--vqvae", "vqvae_checkpoint", default=None, type=click.Path(file_okay=False),
              help="The VQ-VAE checkpoint folder if it moved (its sha256 is still checked).")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@click.option("--threads", default=1, show_default=True, type=click.IntRange(min=0),
              help="CPU threads while sampling and decoding; 0 keeps torch's default.")
def sample(prior_run: str, num_samples: int, temperature: float | None, top_k: int | None,
           seed: int, out_dir: str | None, runs_root: str, method: str, batch_size: int,
           greedy: bool, vqvae_checkpoint: str | None, device: str, threads: int) -> None:
    """Draw code grids from the prior, decode them, write NIfTI + JSON sidecars + a montage."""
    from mri_vqvae.tasks.sample import (
        SampleSettings,
        default_sample_dir,
        load_prior_run,
        sample_volumes,
    )

    run = load_prior_run(prior_run, pick_device(device), vqvae_checkpoint)
    settings = SampleSettings(num_samples, seed, temperature, top_k, method, batch_size, greedy)
    out = out_dir if out_dir is not None else default_sample_dir(runs_root, run.name, seed)
    result = sample_volumes(run, settings, out, threads=threads)
    click.echo(f"wrote {len(result.images)} sample(s) to {result.out_dir.resolve()} "
               f"(sample_*.nii.gz, sample_*.json, {result.montage.name})")


if __name__ == "__main__":
    from pipelines.cli import main

    sys.argv.insert(1, "sample")  # same as `mri-vqvae sample ...`, same error handling
    main()

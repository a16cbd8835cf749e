"""`mri-vqvae sample`: synthetic volumes from a trained prior run (also `python -m` it)."""

from __future__ import annotations

import sys

import click

from pipelines.common import bids_option, device_option


@click.command("sample")
@click.option("--prior", "prior_run", required=True, type=click.Path(exists=True),
              help="Prior run folder runs/prior/<run>/ (uses checkpoints/best, else last).")
@click.option("-n", "--num-samples", default=4, show_default=True, type=click.IntRange(min=1),
              help="How many volumes to draw.")
@click.option("--temperature", default=None, type=click.FloatRange(min=0),
              help="Softmax temperature (default: the prior config's, usually 1.0).")
@click.option("--top-k", default=None, type=click.IntRange(min=1),
              help="Draw only among the k most likely codes (default: the prior config's).")
@click.option("--label", default=None, metavar="NAME",
              help="Draw this class of a class-conditional prior (a value of its label field, "
                   "e.g. a modality). Default: every class in turn. Refused by an "
                   "unconditional prior.")
@click.option("--seed", default=0, show_default=True, type=int,
              help="Seed of the sampling generator (with -n and --batch-size fixes the output).")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Output folder. Default: RUNS_ROOT/samples/<prior-run>/<UTC>-s<seed>/.")
@click.option("--runs-root", default="runs", show_default=True, type=click.Path(file_okay=False))
@click.option("--method", type=click.Choice(["fast", "naive"]), default=None,
              help="PixelCNN priors: fast (default) is the cached sampler; naive recomputes per "
                   "position (same draws, slow).")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1),
              help="Grids drawn together (changing it changes the samples of a seed).")
@click.option("--greedy", is_flag=True,
              help="Ablation only: take the most likely code everywhere (not a sampler).")
@click.option("--vqvae", "vqvae_checkpoint", default=None, type=click.Path(file_okay=False),
              help="The VQ-VAE checkpoint folder if it moved (its sha256 is still checked).")
@device_option
@click.option("--threads", default=1, show_default=True, type=click.IntRange(min=0),
              help="CPU threads while sampling and decoding; 0 keeps torch's default.")
@bids_option
def sample(prior_run: str, num_samples: int, temperature: float | None, top_k: int | None,
           label: str | None, seed: int, out_dir: str | None, runs_root: str,
           method: str | None, batch_size: int, greedy: bool, vqvae_checkpoint: str | None,
           device: str, threads: int, bids: bool) -> None:
    """Draw code grids from the prior, decode them, write NIfTI + JSON sidecars + a montage."""
    from mri_vqvae.artifacts.loading import open_prior_run
    from mri_vqvae.tasks.sample import SampleSettings, default_sample_dir, sample_volumes

    run = open_prior_run(prior_run, vqvae_checkpoint, device=device)
    settings = SampleSettings(num_samples=num_samples, seed=seed, temperature=temperature,
                              top_k=top_k, method=method, batch_size=batch_size, greedy=greedy,
                              label=label)
    out = out_dir if out_dir is not None else default_sample_dir(runs_root, run.name, seed)
    result = sample_volumes(run, settings, out, threads=threads, bids=bids)
    classes = sorted({name for name in result.labels if name is not None})
    drawn = f" of class {', '.join(classes)}" if classes else ""
    click.echo(f"wrote {len(result.images)} sample(s){drawn} to {result.out_dir.resolve()} "
               f"(sample_*.nii.gz, sample_*.json, {result.montage.name})")


if __name__ == "__main__":
    from pipelines.cli import main

    sys.argv.insert(1, "sample")  # same as `mri-vqvae sample ...`, same error handling
    main()

"""`mri-vqvae evaluate`: held-out metrics, samples and a self-contained report of trained runs."""

from __future__ import annotations

import sys

import click

from pipelines.common import (
    data_root_option,
    device_option,
    preprocessed_option,
    report_failures,
    vqvae_run_option,
)


@click.command("evaluate")
@vqvae_run_option
@click.option("--prior", "prior_run", default=None, type=click.Path(exists=True),
              help="Prior run folder (any prior kind): adds bits/latent (held-out vs train, "
                   "beside the unigram baseline), samples, MMD, diversity, memorisation and "
                   "likelihood maps.")
@click.option("--manifest", "manifest_path", required=True, type=click.Path(dir_okay=False),
              help="The manifest the runs were trained on (its digest is checked).")
@data_root_option
@click.option("--split", default="test", show_default=True,
              help="Held-out split: test or val (train is refused).")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Output folder. Default: RUNS_ROOT/eval/<UTC>-<runs>/.")
@click.option("--runs-root", default="runs", show_default=True, type=click.Path(file_okay=False))
@click.option("-n", "--num-samples", default=8, show_default=True, type=click.IntRange(min=2),
              help="Samples drawn from the prior (with --prior).")
@click.option("--seed", default=0, show_default=True, type=int,
              help="Seed of the samples, the bootstrap and the subsets.")
@click.option("--bootstrap", "num_resamples", default=2000, show_default=True,
              type=click.IntRange(min=100), help="Bootstrap resamples for the 95% intervals.")
@click.option("--max-train-cases", default=None, type=click.IntRange(min=1),
              help="Score at most this many training scans (a seeded subset; default: all).")
@click.option("--report-cases", default=4, show_default=True, type=click.IntRange(min=0),
              help="Held-out cases shown as views and likelihood maps in report.html.")
@click.option("--num-workers", default=0, show_default=True, type=click.IntRange(min=0),
              help="Worker processes that preprocess cases ahead of the model.")
@click.option("--strict", is_flag=True, help="Stop at the first bad held-out case.")
@click.option("--viewer/--no-viewer", default=True, show_default=True,
              help="Interactive 3D viewers (NiiVue, inlined) in report.html; --no-viewer "
                   "leaves them out for a smaller page with no script.")
@device_option
@preprocessed_option
def evaluate(vqvae_run: str, prior_run: str | None, manifest_path: str, data_root: str | None,
             split: str, out_dir: str | None, runs_root: str, num_samples: int, seed: int,
             num_resamples: int, max_train_cases: int | None, report_cases: int,
             num_workers: int, strict: bool, viewer: bool, device: str,
             preprocessed: str | None) -> None:
    """Measure a VQ-VAE (and prior) on held-out scans: metrics.json, per_case.csv, report.html.

    Under torchrun the per-case passes are shared among the processes; rank 0 writes the files.
    """
    from mri_vqvae.core import distributed
    from mri_vqvae.data.manifest import load_manifest
    from mri_vqvae.evaluation.evaluate import EvaluateSettings, evaluate_runs
    from mri_vqvae.evaluation.heldout import refuse_split
    from mri_vqvae.evaluation.report.evaluation_report import stat_text
    from mri_vqvae.metrics.image import METRICS

    refuse_split(split)  # before anything is loaded
    manifest = load_manifest(manifest_path, data_root=data_root, check_files=False)
    settings = EvaluateSettings(split=split, num_samples=num_samples, seed=seed,
                                num_resamples=num_resamples, max_train_cases=max_train_cases,
                                report_cases=report_cases, num_workers=num_workers, strict=strict,
                                preprocessed=preprocessed, viewer=viewer)
    with distributed.process_group(device):  # under torchrun: each rank does a share of cases
        result = evaluate_runs(vqvae_run, manifest, out_dir, prior_run=prior_run,
                               settings=settings, device=device,
                               manifest_path=manifest_path, runs_root=runs_root)
        main = distributed.is_main()
    if not main:
        return
    rec = result.metrics["reconstruction"]
    click.echo(f"{rec['num_cases']} held-out case(s): " + ", ".join(
        f"{k} {stat_text(rec['metrics'][k])}" for k in METRICS))
    lik = result.metrics["likelihood"]
    if lik:
        click.echo(f"prior bits/latent ({lik['bits_are']}): held-out "
                   f"{stat_text(lik['held_out'])}; unigram baseline "
                   f"{stat_text(lik['unigram_bits']['held_out'])}")
    click.echo(f"wrote {result.metrics_path.resolve()} (+ per_case.csv, report.html)")
    report_failures(result.failures, False, "case(s)")


if __name__ == "__main__":
    from pipelines.cli import main

    sys.argv.insert(1, "evaluate")
    main()

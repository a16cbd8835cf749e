"""`mri-vqvae evaluate`: held-out metrics, samples and a self-contained report of trained runs."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from mri_vqvae.tasks.parts import Part
from pipelines.common import (
    data_root_option,
    device_option,
    part_callback,
    preprocessed_option,
    report_failures,
    vqvae_run_option,
)

if TYPE_CHECKING:
    from mri_vqvae.data.manifest import Manifest
    from mri_vqvae.evaluation.evaluate import EvaluateSettings


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
              help="Output folder. Default: RUNS_ROOT/eval/<UTC>-<runs>/. Required with --part; "
                   "the run without --part into a folder with parts/ uses their records.")
@click.option("--runs-root", default="runs", show_default=True, type=click.Path(file_okay=False))
@click.option("-n", "--num-samples", default=8, show_default=True, type=click.IntRange(min=2),
              help="Samples drawn from the prior (with --prior).")
@click.option("--seed", default=0, show_default=True, type=int,
              help="Seed of the samples, the bootstrap and the subsets.")
@click.option("--temperature", default=None, type=click.FloatRange(min=0),
              help="Sampling temperature of the samples (default: the prior config's, usually "
                   "1.0); the same draws as `mri-vqvae sample` with these options.")
@click.option("--top-k", default=None, type=click.IntRange(min=1),
              help="Draw samples only among the k most likely codes (default: the prior "
                   "config's).")
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
@click.option("--part", "part", default=None, metavar="I/N", callback=part_callback,
              help="Evaluate only part I of N (1-based) of the sorted held-out cases, e.g. one "
                   "task of a SLURM array, recording them under OUT/parts/ (no metrics.json or "
                   "report). When all N have run, run the same command without --part into the "
                   "same --out: it uses their records, does the rest and removes parts/.")
@device_option
@preprocessed_option
def evaluate(vqvae_run: str, prior_run: str | None, manifest_path: str, data_root: str | None,
             split: str, out_dir: str | None, runs_root: str, num_samples: int, seed: int,
             temperature: float | None, top_k: int | None, num_resamples: int,
             max_train_cases: int | None, report_cases: int,
             num_workers: int, strict: bool, viewer: bool, part: Part | None, device: str,
             preprocessed: str | None) -> None:
    """Measure a VQ-VAE (and prior) on held-out scans: metrics.json, per_case.csv, report.html.

    Under torchrun the per-case passes are shared among the processes; rank 0 writes the files.
    With --part I/N (separate jobs, no torchrun) only part I of the held-out pass runs; the
    same command without --part then finishes the evaluation from the N parts.
    """
    from mri_vqvae.core import distributed
    from mri_vqvae.data.manifest import load_manifest
    from mri_vqvae.evaluation.evaluate import EvaluateSettings, evaluate_runs
    from mri_vqvae.evaluation.heldout import refuse_split
    from mri_vqvae.evaluation.report.evaluation_report import stat_text
    from mri_vqvae.metrics.image import METRICS

    refuse_split(split)  # before anything is loaded
    if prior_run is None and (temperature is not None or top_k is not None):
        raise click.UsageError("--temperature and --top-k set how samples are drawn: they need "
                               "--prior (the prior run to draw from)")
    if part is not None and out_dir is None:
        raise click.UsageError("--part needs --out: every part and the final run (the same "
                               "command without --part) must use one output folder")
    manifest = load_manifest(manifest_path, data_root=data_root, check_files=False)
    settings = EvaluateSettings(split=split, num_samples=num_samples, seed=seed,
                                temperature=temperature, top_k=top_k,
                                num_resamples=num_resamples, max_train_cases=max_train_cases,
                                report_cases=report_cases, num_workers=num_workers, strict=strict,
                                preprocessed=preprocessed, viewer=viewer)
    with distributed.process_group(device):  # under torchrun: each rank does a share of cases
        if part is not None:  # refused under torchrun
            assert out_dir is not None
            _evaluate_part(vqvae_run, manifest, Path(out_dir), part, prior_run, settings, device)
            return
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


def _evaluate_part(vqvae_run: str, manifest: Manifest, out: Path, part: Part,
                   prior_run: str | None, settings: EvaluateSettings, device: str) -> None:
    """`evaluate --part`: run the part, say where it went and what finishes the evaluation."""
    from mri_vqvae.evaluation.evaluate import evaluate_part

    done = evaluate_part(vqvae_run, manifest, out, part, prior_run=prior_run, settings=settings,
                         device=device)
    click.echo(f"part {part.index}/{part.count}: evaluated {len(done.evaluated)} held-out "
               f"case(s), recorded in {done.folder.resolve()} (no metrics yet); when every "
               f"part has run, run this command without --part into --out {out} to write "
               "metrics.json, per_case.csv and report.html")
    report_failures(done.failures, False, "case(s)")


if __name__ == "__main__":
    from pipelines.cli import main

    sys.argv.insert(1, "evaluate")
    main()

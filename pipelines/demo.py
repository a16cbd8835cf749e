"""`mri-vqvae demo`: the main job on the embedded default data (the offline real-MRI kit).

kit → manifest verify → preprocess → train VQ-VAE → encode → train prior → sample → evaluate on
the held-out test split → report.html, each stage writing into one demo folder; then the shipped
pretrained model on its own test split, beside (`pipelines.demo_pretrained`). `--quick` runs the
chain at toy sizes, without the pretrained stage unless asked.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import click

from mri_vqvae.artifacts.run_summary import describe_stop, training_summary
from mri_vqvae.data.manifest import Manifest
from pipelines.common import config_options, default_cache_dir, report_failures, resolve


@click.command()
@click.option("--out", "out_dir", default="runs/demo", show_default=True,
              type=click.Path(file_okay=False), help="Where this demo run's folder goes.")
@click.option("--kit", "kit_dir", default=None, type=click.Path(file_okay=False),
              help="Kit folder (default: $MRI_VQVAE_CACHE/kit or ~/.cache/mri-vqvae/kit).")
@click.option("--quick", is_flag=True,
              help="Toy sizes for CI (config demo_quick): the whole chain in a few minutes.")
@click.option("-n", "--num-samples", default=4, show_default=True,
              type=click.IntRange(min=0), help="Synthetic volumes (0: none).")
@click.option("--pretrained/--no-pretrained", default=None,
              help="Also evaluate the shipped pretrained model (mri_vqvae/pretrained_models/"
                   "brain64_cohort) on its test split and show it beside this run's models "
                   "(about 2 minutes). Default: on, off with --quick.")
@config_options
def demo(out_dir: str, kit_dir: str | None, quick: bool, num_samples: int,
         pretrained: bool | None, config_name: str | None, overrides: tuple[str, ...]) -> None:
    """Run the whole chain on the embedded default data and print where the report is."""
    from mri_vqvae.artifacts.loading import open_prior_run
    from mri_vqvae.data.kit import build_kit
    from mri_vqvae.data.manifest import load_manifest, verify_manifest
    from mri_vqvae.evaluation.evaluate import EvaluateSettings, evaluate_runs
    from mri_vqvae.tasks.encode import encode_manifest
    from mri_vqvae.tasks.preprocess import preprocess_manifest
    from mri_vqvae.tasks.sample import SampleSettings, sample_volumes
    from mri_vqvae.training.autoencoder_stage import train_vqvae
    from mri_vqvae.training.prior_stage import train_prior

    if num_samples == 1:
        raise click.BadParameter("0 (no samples) or at least 2 (diversity needs pairs)",
                                 param_hint="--num-samples")
    config = resolve(config_name or ("demo_quick" if quick else "demo"), overrides)
    kit_root = Path(kit_dir) if kit_dir else default_cache_dir() / "kit"
    run_dir = Path(out_dir) / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    with_pretrained = (not quick) if pretrained is None else pretrained
    step = _Stages(total=8 if with_pretrained else 7)

    step(f"kit → {kit_root}")
    manifest_path = build_kit(kit_root, config.kit, config.augment)
    manifest = load_manifest(manifest_path)
    problems = verify_manifest(manifest)
    if problems:
        raise click.ClickException(f"kit manifest does not verify: {problems}")
    click.echo(f"      {len(manifest.cases)} cases verified, digest {manifest.digest[:12]}")
    _sources(manifest, kit_root)

    step("preprocess")
    done, failures = preprocess_manifest(manifest, config, run_dir / "preprocessed")
    if not done:
        raise click.ClickException(f"no kit case could be preprocessed: {failures[:1]}")
    report_failures(failures, True, "case(s)")
    click.echo(f"      {len(done)} montages in {(run_dir / 'preprocessed' / 'montages').resolve()}")

    preprocessed = run_dir / "preprocessed"  # every later stage reads these (verified)
    step("train VQ-VAE")
    vq = train_vqvae(config, manifest_path, runs_root=run_dir / "runs", preprocessed=preprocessed)
    click.echo(f"      {vq.run_dir}: {describe_stop(training_summary(vq.run_dir))}; best val "
               f"PSNR {_number(vq.best_metric, '.2f', ' dB')}")

    step("encode latent grids")
    encode_manifest(vq.run_dir, manifest, run_dir / "latents", manifest_path=manifest_path,
                    preprocessed=preprocessed)

    step("train prior")
    prior = train_prior(config, run_dir / "latents", runs_root=run_dir / "runs")
    click.echo(f"      {prior.run_dir}: {describe_stop(training_summary(prior.run_dir))}; best "
               f"val {_number(prior.best_metric, '.3f', ' bits/latent')}")

    step(f"sample {num_samples} synthetic volume(s)")
    if num_samples > 0:
        samples = sample_volumes(
            open_prior_run(prior.run_dir), SampleSettings(num_samples, seed=config.seed),
            run_dir / "samples",
        )
        click.echo(f"      montage: {samples.montage.resolve()}")
    else:
        click.echo("      skipped: --num-samples 0")

    step("evaluate on the held-out test split")
    result = evaluate_runs(
        vq.run_dir, manifest, run_dir / "eval", prior_run=prior.run_dir,
        settings=EvaluateSettings(split="test", num_samples=num_samples, seed=config.seed,
                                  preprocessed=str(preprocessed)),
        manifest_path=manifest_path,
    )
    click.echo(f"      metrics: {result.metrics_path.resolve()}")
    _results(result.metrics)
    if with_pretrained:
        from pipelines.demo_pretrained import evaluate_pretrained, side_by_side

        step("the shipped pretrained model on its test split")
        shipped = evaluate_pretrained(run_dir, kit_root, config, num_samples, preprocessed)
        if shipped is not None:
            side_by_side(result.metrics, shipped, config)
    _summary([vq.run_dir, prior.run_dir], step)
    click.echo(f"demo finished: everything is under {run_dir.resolve()}")
    click.echo(f"report: {result.report_path.resolve()}")


def _sources(manifest: Manifest, kit_root: Path) -> None:
    """Which sources the kit used (cases per split) and which it skipped, with the reason."""
    used: dict[str, Counter[str]] = {}
    for case in manifest.cases:
        used.setdefault(case.source_id, Counter())[case.split or "none"] += 1
    for source, splits in sorted(used.items()):
        counts = ", ".join(f"{n} {split}" for split, n in sorted(splits.items()))
        click.echo(f"      used    {source}: {counts}")
    skipped_path = kit_root / "skipped.json"
    skipped = json.loads(skipped_path.read_text()) if skipped_path.is_file() else []
    reasons: dict[str, str] = {}
    for row in skipped:
        reasons.setdefault(row["source_id"], row["reason"])
    for source, reason in sorted(reasons.items()):
        click.echo(f"      SKIPPED {source}: {reason}", err=True)


def _results(metrics: dict[str, Any]) -> None:
    """The headline numbers of metrics.json: held-out PSNR and SSIM, prior and unigram bits."""
    rec = metrics["reconstruction"]["metrics"]
    click.echo(f"      held-out PSNR {_number(rec['psnr']['mean'], '.2f', ' dB')}, SSIM "
               f"{_number(rec['ssim']['mean'], '.4f')}")
    lik = metrics["likelihood"]
    if lik:
        click.echo(f"      prior {_number(lik['held_out']['mean'], '.4f')} bits/latent "
                   f"({lik['bits_are']}), unigram baseline "
                   f"{_number(lik['unigram_bits']['held_out']['mean'], '.4f')}, uniform "
                   f"{_number(lik['uniform_bits'], '.4f')}")


def _number(value: float | None, spec: str, unit: str = "") -> str:
    """`value` formatted, or "n/a" when nothing was measured."""
    return "n/a" if value is None else f"{value:{spec}}{unit}"


def _summary(runs: list[Path], stages: _Stages) -> None:
    """The closing lines: total time, and a loud note for each training that stopped early."""
    click.echo(f"summary ({(time.monotonic() - stages.start) / 60:.1f} min in all):")
    for run in runs:
        info = training_summary(run)
        click.echo(f"  {info['stage']:<6} {describe_stop(info)}; precision {info['precision']}")
        if not info["complete"]:
            click.echo(f"  WARNING: the {info['stage']} stage did not train every configured "
                       f"step, so its results are not those of the configured demo; see "
                       f"docs/benchmarks.md for the step times this machine would need", err=True)


class _Stages:
    """Numbered stage headers with elapsed time."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.start = total, 0, time.monotonic()

    def __call__(self, what: str) -> None:
        self.done += 1
        minutes = (time.monotonic() - self.start) / 60
        click.echo(f"[{self.done}/{self.total}] {what}  (+{minutes:.1f} min)")


if __name__ == "__main__":
    demo()

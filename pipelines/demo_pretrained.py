"""The demo's last stage: the shipped pretrained model on its own held-out test split, beside the
short training the demo just ran.

The pretrained model (`mri_vqvae.pretrained_models`) was trained on the kit with every cohort
contrast, so it is evaluated on the manifest it carries (its training manifest, over that kit
setting built into the same cached kit folder) and its test split: the same patients as the
demo's test split, with T2w and FLAIR scans too. The carried manifest, not the one built here, is
used because the kit's augmented copies differ in bytes on another instruction set (AVX2), which
changes a freshly built manifest's digest; the real scans are checked by sha256. When they are
not available (e.g. no cohort mirror), the stage says why and is skipped; the demo's own results
stand.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from mri_vqvae.config import ExperimentConfig, load_config
from mri_vqvae.core.errors import MriVqvaeError


def evaluate_pretrained(run_dir: Path, kit_root: Path, demo_config: ExperimentConfig,
                        num_samples: int, preprocessed: Path) -> dict[str, Any] | None:
    """metrics.json of the shipped model evaluated into ``run_dir/pretrained`` (None: skipped)."""
    from mri_vqvae.artifacts.export import MANIFEST, training_manifest
    from mri_vqvae.data.kit import build_kit
    from mri_vqvae.data.manifest import load_manifest, with_annotations
    from mri_vqvae.evaluation.evaluate import EvaluateSettings, evaluate_runs
    from mri_vqvae.pretrained_models import pretrained_path

    folder = pretrained_path()
    trained = load_config(folder / "configs" / "vqvae.yaml")
    try:
        kit = load_manifest(build_kit(kit_root, trained.kit, trained.augment))
        # the kit's annotations made since the export (the ROBEX brain masks) join its cases
        manifest = with_annotations(training_manifest(folder, kit_root), kit)
        settings = EvaluateSettings(
            split="test", num_samples=max(num_samples, 2), seed=demo_config.seed,
            max_train_cases=8,
            preprocessed=str(preprocessed) if trained.data == demo_config.data else None)
        result = evaluate_runs(folder / "vqvae", manifest, run_dir / "pretrained",
                               prior_run=folder / "prior", settings=settings,
                               manifest_path=folder / MANIFEST)
    except MriVqvaeError as exc:
        click.echo(f"      skipped: the pretrained model's test split is not available here "
                   f"({exc})", err=True)
        return None
    click.echo(f"      pretrained report: {result.report_path.resolve()}")
    return result.metrics


def side_by_side(demo: dict[str, Any], pretrained: dict[str, Any],
                 demo_config: ExperimentConfig) -> None:
    """The headline figures of the demo's models and the pretrained ones, with n."""
    rows = [("held-out PSNR (dB)", _rec("psnr", ".2f")), ("held-out SSIM", _rec("ssim", ".3f")),
            ("held-out MS-SSIM", _rec("ms_ssim", ".3f")),
            ("prior bits/latent (held-out)", _bits), ("sample diversity (real)", _diversity),
            ("lesion AUROC of the likelihood map", _auroc)]
    click.echo(f"      {'':36} {'this demo':>18} {'pretrained':>18}")
    for name, cell in rows:
        click.echo(f"      {name:36} {cell(demo):>18} {cell(pretrained):>18}")
    from mri_vqvae.artifacts.export import read_export
    from mri_vqvae.pretrained_models import pretrained_path

    card = read_export(pretrained_path())
    steps = (card["autoencoder"]["training_steps"], card["prior"]["training_steps"])
    click.echo(f"      (this demo: {demo_config.train_vqvae.max_steps} + "
               f"{demo_config.train_prior.max_steps} steps, tested on its kit's test split; "
               f"pretrained: checkpoints of step {steps[0]:,} + {steps[1]:,}, trained and tested "
               "on every cohort contrast)")


def _rec(name: str, spec: str) -> Any:
    def cell(metrics: dict[str, Any]) -> str:
        stat = metrics["reconstruction"]["metrics"].get(name) or {}
        return "n/a" if stat.get("mean") is None else f"{stat['mean']:{spec}} (n={stat['n']})"
    return cell


def _bits(metrics: dict[str, Any]) -> str:
    held = (metrics.get("likelihood") or {}).get("held_out") or {}
    return "n/a" if held.get("mean") is None else f"{held['mean']:.2f} (n={held['n']})"


def _diversity(metrics: dict[str, Any]) -> str:
    div = (metrics.get("samples") or {}).get("diversity") or {}
    if div.get("samples") is None:
        return "n/a"
    real = div.get("held_out")
    return f"{div['samples']:.3f} ({'n/a' if real is None else format(real, '.3f')})"


def _auroc(metrics: dict[str, Any]) -> str:
    lesions = (metrics.get("likelihood") or {}).get("lesions") or {}
    value = lesions.get("mean_auroc_prior")
    return "n/a" if value is None else f"{value:.3f} (n={lesions['num_cases']})"

"""Options and helpers shared by the stage entry points."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from mri_vqvae.config import ExperimentConfig, load_config
from mri_vqvae.core.device import DEVICES
from mri_vqvae.tasks.cases import Failure, failures_table
from mri_vqvae.tasks.parts import Part, PartError, parse_part, part_command


def default_cache_dir() -> Path:
    """Where the kit and caches live: $MRI_VQVAE_CACHE, else ~/.cache/mri-vqvae."""
    return Path(os.environ.get("MRI_VQVAE_CACHE", Path.home() / ".cache" / "mri-vqvae"))


def preprocessed_option(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--preprocessed DIR``: read a `preprocess` output folder instead of the raw files."""
    return click.option(
        "--preprocessed", default=None, type=click.Path(file_okay=False),
        help="A `mri-vqvae preprocess` output folder of the same data config: cases found "
        "there (sidecar, source sha256 and NIfTI sha256 verified) are read instead of "
        "preprocessing the raw files again; others are preprocessed as usual.",
    )(func)


def device_option(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--device auto|cpu|cuda`` (resolved by `mri_vqvae.core.device.resolve_device`)."""
    return click.option(
        "--device", type=click.Choice(DEVICES), default="auto", show_default=True,
        help="Where the models run: auto is cuda when a GPU is visible, else cpu; under "
        "torchrun each process takes its own GPU.",
    )(func)


def data_root_option(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--data-root DIR``: the folder the manifest's case paths are relative to."""
    return click.option("--data-root", default=None, type=click.Path(file_okay=False),
                        help="Override the manifest's data root.")(func)


def split_option(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--split train|val|test`` (default: every case of the manifest)."""
    return click.option("--split", type=click.Choice(["train", "val", "test"]), default=None,
                        help="Only this split (default: every case).")(func)


def strict_option(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--strict``: stop at the first bad case (exit 1)."""
    return click.option("--strict", is_flag=True,
                        help="Stop at the first bad case and exit non-zero.")(func)


def part_callback(ctx: click.Context, param: click.Parameter, value: str | None) -> Part | None:
    """The click callback of a ``--part I/N`` option: a `Part`, None, or a usage error."""
    if value is None:
        return None
    try:
        return parse_part(value)
    except PartError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None


def part_option(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--part I/N`` (passed as a `Part` or None): this job's share of the sorted cases."""
    return click.option(
        "--part", "part", default=None, metavar="I/N", callback=part_callback,
        help="Do only part I of N (1-based) of the sorted cases, e.g. one task of a SLURM array; "
        "parts may run at once into one --out. When all N have run: mri-vqvae merge OUT.",
    )(func)


def bids_option(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--bids/--no-bids`` (passed as `bids`, default on): the BIDS-Derivatives view."""
    return click.option(
        "--bids/--no-bids", "bids", default=True, show_default=True,
        help="Also give each output its BIDS-Derivatives name (sub-<label>/anat/..., a hard link, "
        "no extra disk) with dataset_description.json and participants.tsv.",
    )(func)


def written(out_dir: str, part: Part | None, tables: str) -> str:
    """``(tables)`` a whole run wrote into `out_dir`, or where part `part` recorded its share."""
    return f"({tables})" if part is None else f"({part_command(Path(out_dir), part)})"


def vqvae_run_option(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add the required ``--vqvae RUN_DIR`` (passed as `vqvae_run`)."""
    return click.option(
        "--vqvae", "vqvae_run", required=True, type=click.Path(exists=True),
        help="VQ-VAE run folder runs/vqvae/<run>/ (checkpoints/best, else last).",
    )(func)


def run_folder_options(kind: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add ``--resume RUN_DIR`` (as `resume_dir`) and ``--runs-root`` for a training command
    whose new runs go to ``RUNS_ROOT/<kind>/``."""

    def add(func: Callable[..., Any]) -> Callable[..., Any]:
        func = click.option(
            "--runs-root", default="runs", show_default=True, type=click.Path(file_okay=False),
            help=f"New runs go to RUNS_ROOT/{kind}/<UTC>-<config>-s<seed>/.",
        )(func)
        return click.option(
            "--resume", "resume_dir", default=None, type=click.Path(file_okay=False),
            help="Continue this run folder from its checkpoints/last (default config: the "
            "run's own config.yaml).",
        )(func)

    return add


def config_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--config NAME_OR_YAML`` and repeatable ``--set key.sub=value``."""
    func = click.option(
        "--set", "overrides", multiple=True, metavar="KEY=VALUE",
        help="Override one config value, e.g. --set data.spacing=[2,2,2] (repeatable).",
    )(func)
    return click.option(
        "--config", "config_name", default=None, metavar="NAME|YAML",
        help="Experiment YAML, or a shipped config name (smoke, brain64). Default: built-in.",
    )(func)


def resolve(config_name: str | None, overrides: tuple[str, ...]) -> ExperimentConfig:
    """Load the experiment config named on the command line."""
    return load_config(config_name, overrides)


def resolve_run_config(
    resume_dir: str | None, config_name: str | None, overrides: tuple[str, ...]
) -> ExperimentConfig:
    """The config for a training command: with --resume and no --config, the run's own YAML."""
    if resume_dir is not None and config_name is None:
        own = Path(resume_dir) / "config.yaml"
        if not own.is_file():
            raise click.BadParameter(f"{own} does not exist: is this a run folder?",
                                     param_hint="--resume")
        config_name = str(own)
    return resolve(config_name, overrides)


def report_failures(failures: list[Failure], strict: bool, what: str) -> None:
    """Print the failures table; exit 1 when there were failures and `strict` is set."""
    if not failures:
        return
    click.echo(f"\n{len(failures)} {what} failed:\n{failures_table(failures)}", err=True)
    if strict:
        raise click.exceptions.Exit(1)

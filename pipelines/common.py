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

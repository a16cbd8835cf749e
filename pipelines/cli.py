"""The `mri-vqvae` console script: one click group, one subcommand per pipeline stage."""

from __future__ import annotations

import logging
import sys
import warnings

import click

from mri_vqvae import __version__
from mri_vqvae.core.errors import MriVqvaeError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mri-vqvae")
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
def cli(verbose: bool) -> None:
    """Discrete latent models of 3D MRI: manifests, preprocessing, VQ-VAE, prior, evaluation."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # MONAI announces an optional GPU DICOM codec that CPU installs never have: not actionable.
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")


def _register() -> None:
    """Attach each stage's command; stage modules import heavy libraries only when they run."""
    from pipelines import compare as compare_cmd
    from pipelines import data_kit, demo, encode, manifest_cmd, preprocess, train_prior, train_vqvae
    from pipelines import evaluate as evaluate_cmd
    from pipelines import export as export_cmd
    from pipelines import info as info_cmd
    from pipelines import likelihood as likelihood_cmd
    from pipelines import merge as merge_cmd
    from pipelines import reconstruct as reconstruct_cmd
    from pipelines import sample as sample_cmd

    cli.add_command(demo.demo)
    cli.add_command(data_kit.data)
    cli.add_command(manifest_cmd.manifest)
    cli.add_command(preprocess.preprocess)
    cli.add_command(train_vqvae.train_vqvae)
    cli.add_command(encode.encode)
    cli.add_command(train_prior.train_prior)
    cli.add_command(sample_cmd.sample)
    cli.add_command(likelihood_cmd.likelihood)
    cli.add_command(reconstruct_cmd.reconstruct)
    cli.add_command(evaluate_cmd.evaluate)
    cli.add_command(merge_cmd.merge)
    cli.add_command(export_cmd.export)
    cli.add_command(info_cmd.info)
    cli.add_command(compare_cmd.compare)


_register()


def main() -> None:
    """Entry point: a user-caused error prints its message and exits 2, without a traceback."""
    try:
        code = cli.main(standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except MriVqvaeError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()

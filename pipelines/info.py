"""`mri-vqvae info`: the model card facts of a run or export folder."""

from __future__ import annotations

import json
import sys

import click


@click.command("info")
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print every fact as JSON.")
def info(folder: str, as_json: bool) -> None:
    """Kind, parameters, codebook, grid, data config, steps, manifest digest, licences."""
    from mri_vqvae.artifacts.export import model_facts, open_models
    from mri_vqvae.artifacts.model_card import info_text

    facts = model_facts(open_models(folder))
    click.echo(json.dumps(facts, indent=2) if as_json else info_text(facts), nl=as_json)


if __name__ == "__main__":
    from pipelines.cli import main

    sys.argv.insert(1, "info")
    main()

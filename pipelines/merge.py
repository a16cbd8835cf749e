"""`mri-vqvae merge DIR`: the tables of a folder that ``--part I/N`` jobs wrote into."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from pipelines.common import report_failures


@click.command("merge")
@click.argument("out_dir", type=click.Path(file_okay=False))
def merge(out_dir: str) -> None:
    """Merge the parts of an --out (preprocess, encode, reconstruct, likelihood --manifest).

    Once parts 1..N have all run with the same arguments, writes the folder's index.json,
    failures.csv and tables exactly as one process would, then removes DIR/parts/. Refused
    while a part runs, when a part has not finished (named), or when parts differ (naming
    what differs). Parts of `evaluate --part I/N` are refused here: the rest of an evaluation
    needs the models, so the same evaluate command without --part (same --out) merges them.
    """
    from mri_vqvae.tasks.encode import merge_encode
    from mri_vqvae.tasks.likelihood_batch import merge_likelihood
    from mri_vqvae.tasks.parts import PartError, clear_parts, merge_parts
    from mri_vqvae.tasks.preprocess import merge_preprocess
    from mri_vqvae.tasks.reconstruct import merge_reconstruct

    writers = {"preprocess": merge_preprocess, "encode": merge_encode,
               "reconstruct": merge_reconstruct, "likelihood": merge_likelihood}
    out = Path(out_dir)
    with merge_parts(out) as merged:
        if merged.command == "evaluate":
            raise PartError(f"{out} holds parts of `evaluate`, which merge cannot finish (the "
                            "samples, training scans and report need the models): run the same "
                            f"`mri-vqvae evaluate ... --out {out}` command without --part; it "
                            "uses the parts' records and removes parts/")
        writers[merged.command](out, merged)
        clear_parts(out)
    click.echo(f"merged {len(merged.records)} record(s) and {len(merged.failures)} failure(s) "
               f"of `{merged.command}` parts into {out.resolve()}")
    report_failures(merged.failures, False, "case(s)")


if __name__ == "__main__":
    from pipelines.cli import main

    sys.argv.insert(1, "merge")
    main()

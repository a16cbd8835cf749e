"""Likelihood maps of many scans in one process: ``mri-vqvae likelihood --manifest M --out DIR``.

Each case of the manifest (or of one split) goes through the case chain (root confinement,
sha256 while reading; the same voxels `mri_vqvae.tasks.likelihood.preprocess_scan` gives), is
scored by `score_volume` and written by `write_likelihood`, exactly as ``likelihood --input``
writes one scan. On disk (``DIR``)::

    maps/<case_id>.nii.gz        bits per latent (-log2 p), each latent filling its voxel block
    maps/<case_id>_input.nii.gz  the scan on the same grid; maps/<case_id>.png its montage
    maps/<case_id>.json          the sidecar, written last: marks the case done; adds case_id,
                                 split and source_sha256 to the one-scan sidecar
    likelihood.csv               case_id, split, label, mean and max bits per latent
    index.json                   the prior, grid and label of the folder, every finished case's
                                 sidecar, the failures
    failures.csv                 case_id, path, reason (a bad case is skipped unless --strict)
    sub-*/.../anat/*_desc-bitsmap_<suffix>.nii.gz (+ .json), dataset_description.json,
    participants.tsv             with ``bids``: the BIDS-Derivatives view of the maps
                                 (`mri_vqvae.data.bids`)

A conditional prior scores each case under its own class (the manifest field the prior was
trained on, e.g. ``modality``) unless ``label`` names one class for all. Resume: a case whose
sidecar names the same prior and VQ-VAE weights, grid, label and source sha256, and whose map
exists, is kept. ``--part I/N`` does one share and records it under ``parts/``
(`mri_vqvae.tasks.parts`); ``mri-vqvae merge`` writes the tables (`merge_likelihood`).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mri_vqvae.config import config_digest
from mri_vqvae.core.atomic import atomic_write_text
from mri_vqvae.core.jsonio import json_ready
from mri_vqvae.core.outputs import output_lock, remove_stale_temps
from mri_vqvae.data import bids as bids_view
from mri_vqvae.data.case import Case
from mri_vqvae.data.datasets import case_items
from mri_vqvae.data.manifest import Manifest
from mri_vqvae.data.transforms import build_transforms
from mri_vqvae.tasks.cases import Failure, run_batch, write_failures
from mri_vqvae.tasks.likelihood import score_volume, write_likelihood
from mri_vqvae.tasks.parts import Merged, Part, finish_part, part_lock
from mri_vqvae.tasks.sample import class_labels

if TYPE_CHECKING:
    from mri_vqvae.artifacts.loading import PriorRun

log = logging.getLogger(__name__)

COMMAND = "likelihood"
FORMAT = "mri-vqvae-likelihood-batch"
MAPS = "maps"
CSV_COLUMNS = ("case_id", "split", "label", "mean_bits_per_latent", "max_bits_per_latent")


@dataclass(frozen=True)
class BatchResult:
    """What a run did: ``computed`` now, ``reused`` from an earlier run, and every record."""

    out_dir: Path
    computed: list[str]
    reused: list[str]
    failures: list[Failure]
    records: list[dict[str, Any]]


def folder_header(run: PriorRun, manifest: Manifest, split: str | None, native: bool,
                  label: str | None) -> dict[str, Any]:
    """index.json's fields besides the cases: what made the maps."""
    return {"format": FORMAT, "format_version": 1,
            "prior_checkpoint": str(run.paths.prior_checkpoint),
            "prior_sha256": run.sha256s["prior"], "vqvae_sha256": run.sha256s["vqvae"],
            "manifest_name": manifest.name, "manifest_digest": manifest.digest, "split": split,
            "grid": "native" if native else "preprocessed", "label": label}


def case_label(field: str | None, case: Case, label: str | None) -> str | None:
    """The class a case is scored under: `label`, else (a prior conditioned on manifest field
    `field`) the case's own value of that field, else None."""
    return label if label is not None or field is None else getattr(case, field, None)


def _finished(out: Path, item: dict[str, Any], header: dict[str, Any], label: str | None
              ) -> dict[str, Any] | None:
    path = out / MAPS / f"{item['case_id']}.json"
    if not path.is_file():
        return None
    with contextlib.suppress(OSError, json.JSONDecodeError):
        doc = json.loads(path.read_text(encoding="utf-8"))
        same = all(doc.get(k) == header[k] for k in ("prior_sha256", "vqvae_sha256", "grid"))
        if (same and doc.get("label") == label and doc.get("source_sha256") == item["sha256"]
                and (out / MAPS / str(doc.get("map"))).is_file()):
            return dict(doc)
    return None


def likelihood_manifest(
    run: PriorRun,
    manifest: Manifest,
    out_dir: str | Path,
    split: str | None = None,
    label: str | None = None,
    native: bool = False,
    strict: bool = False,
    part: Part | None = None,
    bids: bool = False,
) -> BatchResult:
    """Likelihood maps of every case of `split` (all if None) under `out_dir` (module doc).

    A bad case goes to failures.csv, or stops the run when `strict`. `OutputError` comes first
    when `out_dir` is not writable or another run holds it (or the part). With `bids` each map
    also gets its BIDS name (`publish_map`).
    """
    out = Path(out_dir)
    header = folder_header(run, manifest, split, native, label)
    computed: list[str] = []
    reused: list[str] = []
    with output_lock(out) if part is None else part_lock(out, part) as held:
        bids = bids_view.start_view(out, bids, bids_view.dataset_description(
            COMMAND, config_digest(run.data), manifest.name, manifest.digest,
            {"prior": run.sha256s["prior"], "VQ-VAE": run.sha256s["vqvae"]}))
        if part is None:
            remove_stale_temps([out, out / MAPS, *bids_view.view_folders(out)])
        names = bids_view.case_names(manifest.cases, "bitsmap") if bids else {}
        chain = build_transforms(run.data)
        items = case_items(manifest, run.data, split)
        items = items if part is None else part.take(items)
        by_id = {c.case_id: c for c in manifest.cases}
        field = class_labels(run).field

        def one(item: dict[str, Any]) -> dict[str, Any]:
            cid = item["case_id"]
            used = case_label(field, by_id[cid], label)
            doc = _finished(out, item, header, used)
            if doc is not None:
                reused.append(cid)
            else:
                image = chain(dict(item))["image"]
                volume = image[0].detach().cpu().numpy().astype(np.float32)
                affine = np.asarray(image.affine, dtype=np.float64)
                result = score_volume(run, volume, affine, item["image"], used)
                extra = {"case_id": cid, "split": item["split"], "source_sha256": item["sha256"]}
                written = write_likelihood(run, result, item["image"],
                                           out / MAPS / f"{cid}.nii.gz", native=native,
                                           extra=extra)
                computed.append(cid)
                doc = dict(json.loads(written.sidecar.read_text(encoding="utf-8")))
            if bids:
                publish_map(out, by_id[cid], doc, names[cid])
            return doc

        records, failures = run_batch(items, one, strict=strict, desc="likelihood", out_dir=out)
        if part is None:
            write_tables(out, header, records, failures)
        else:
            finish_part(held, part, COMMAND, header, records, failures)
    log.info("likelihood maps: %d computed, %d reused, %d failed, into %s", len(computed),
             len(reused), len(failures), out)
    return BatchResult(out, computed, reused, failures, records)


def write_tables(out: Path, header: dict[str, Any], records: list[dict[str, Any]],
                 failures: list[Failure]) -> None:
    """likelihood.csv, index.json and failures.csv from the finished cases' sidecars."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(CSV_COLUMNS)
    for r in records:
        writer.writerow(["" if r.get(k) is None else r[k] for k in CSV_COLUMNS])
    atomic_write_text(out / "likelihood.csv", buf.getvalue())
    index = {**header, "cases": records, "failures": [asdict(f) for f in failures]}
    atomic_write_text(out / "index.json", json.dumps(json_ready(index), indent=2) + "\n")
    write_failures(out / "failures.csv", failures)
    bids_view.write_participants(out)


def publish_map(out: Path, case: Case, doc: dict[str, Any], name: bids_view.BidsName) -> None:
    """The map's BIDS name (a link to maps/<case_id>.nii.gz) and a sidecar holding its record."""
    sidecar = {"CaseID": case.case_id, **bids_view.case_fields(case), "Split": case.split,
               "Description": f"bits per latent (-log2 p) under the prior, {doc['grid']} grid",
               "Units": "bits", "Image": f"{MAPS}/{doc['map']}", "mri_vqvae": doc}
    bids_view.publish(out, name, out / MAPS / doc["map"], sidecar)


def merge_likelihood(out: Path, merged: Merged) -> None:
    """The tables of a folder its parts scored, as one process writes them."""
    remove_stale_temps([out, out / MAPS, *bids_view.view_folders(out)])
    write_tables(out, merged.header, merged.records, merged.failures)

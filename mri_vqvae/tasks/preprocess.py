"""Batch preprocessing: normalised RAS NIfTI, a montage per case, an index, a failures table.

On disk (``out_dir``)::

    images/<case_id>.nii.gz   the preprocessed volume (RAS, data.spacing, data.spatial_size)
    montages/<case_id>.png    three orthogonal slices
    cases/<case_id>.json      the case's sidecar, written last: source sha256, config digest,
                              sha256 of its NIfTI and montage
    index.json                every finished case of the selection, and the failures
    failures.csv              case_id, path, reason
    .lock                     exists (flock-ed) while a run writes here; see mri_vqvae.core.outputs
    sub-*/.../anat/*_desc-preproc_<suffix>.nii.gz (+ .json), dataset_description.json,
    participants.tsv          with ``bids``: the BIDS-Derivatives view (`mri_vqvae.data.bids`)

Resume: a case is done when its sidecar names the same source sha256, data config digest,
subject and split, and its NIfTI and montage still hash to what the sidecar recorded. A rerun
reuses such a case and (re)computes every other; a killed run leaves each case finished or to be
redone, and its stale temp files are removed at the start of the next run. index.json and
failures.csv are rewritten at the end of every run. With ``--part I/N`` a run does its share of
the cases and records it under ``parts/`` (`mri_vqvae.tasks.parts`); ``mri-vqvae merge`` then
writes index.json and failures.csv, byte for byte what one process writes. A full disk or
read-only folder stops the run with `OutputError` (it is no case's fault); a bad input is a
per-case failure.

Test hook: with ``MRI_VQVAE_TEST_KILL_AFTER_CASE=k`` in the environment, the process SIGKILLs
itself right after committing the k-th case it computed (never set it otherwise).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from monai.transforms import Compose

from mri_vqvae.config import ExperimentConfig, config_digest
from mri_vqvae.core.atomic import atomic_write_text
from mri_vqvae.core.figures import orthogonal_montage
from mri_vqvae.core.outputs import output_lock, remove_stale_temps
from mri_vqvae.data import bids as bids_view
from mri_vqvae.data.case import Case
from mri_vqvae.data.datasets import case_items
from mri_vqvae.data.manifest import Manifest
from mri_vqvae.data.preprocessed import PreprocessedCase, finished_case, write_sidecar
from mri_vqvae.data.transforms import build_transforms
from mri_vqvae.data.writers import affine_spacing, write_nifti
from mri_vqvae.tasks.cases import Failure, run_batch, write_failures
from mri_vqvae.tasks.parts import Merged, Part, finish_part, part_lock

log = logging.getLogger(__name__)

KILL_ENV = "MRI_VQVAE_TEST_KILL_AFTER_CASE"
COMMAND = "preprocess"


def preprocess_case(item: dict[str, Any], chain: Compose, out_dir: Path) -> PreprocessedCase:
    """Run the deterministic chain on one item and write its NIfTI and montage."""
    image = chain(dict(item))["image"]  # MetaTensor (1, X, Y, Z), RAS
    volume = image[0].detach().cpu().numpy().astype(np.float32)
    affine = np.asarray(image.affine, dtype=np.float64)
    case_id = item["case_id"]
    rel_image = f"images/{case_id}.nii.gz"
    rel_montage = f"montages/{case_id}.png"
    write_nifti(out_dir / rel_image, volume, affine)
    spacing = affine_spacing(affine)
    orthogonal_montage([(case_id, volume)], spacing, out_dir / rel_montage, title=case_id, vmax=1.0)
    return PreprocessedCase(
        case_id=case_id,
        subject_id=item["subject_id"],
        split=item["split"],
        image=rel_image,
        montage=rel_montage,
        shape=tuple(int(s) for s in volume.shape),
        spacing=spacing,
        affine=affine.tolist(),
        source_sha256=item["sha256"],
    )


def _kill_after() -> int | None:
    raw = os.environ.get(KILL_ENV)
    return int(raw) if raw else None


def preprocess_manifest(
    manifest: Manifest,
    config: ExperimentConfig,
    out_dir: str | Path,
    split: str | None = None,
    strict: bool = False,
    part: Part | None = None,
    bids: bool = False,
) -> tuple[list[PreprocessedCase], list[Failure]]:
    """Preprocess every case of `split` into `out_dir`; writes index.json and failures.csv.

    Finished cases of an earlier run are reused (see the module doc). With `part` only its share
    of the cases is done and recorded under ``parts/`` (`mri_vqvae.tasks.parts`; the tables come
    from `merge_preprocess`). Raises `OutputError` before any case when `out_dir` is not
    writable or another run holds it (or the part), and mid-run when the disk fills or the
    folder turns read-only. With `bids` each case also gets its BIDS name (`publish_case`).
    """
    out = Path(out_dir)
    with output_lock(out) if part is None else part_lock(out, part) as held:
        digest = config_digest(config.data)
        bids = bids_view.start_view(out, bids, bids_view.dataset_description(
            COMMAND, digest, manifest.name, manifest.digest))
        if part is None:
            remove_stale_temps([out, out / "images", out / "montages", out / "cases",
                                *bids_view.view_folders(out)])
        chain = build_transforms(config.data)
        names = bids_view.case_names(manifest.cases, "preproc") if bids else {}
        cases = {c.case_id: c for c in manifest.cases}
        items = case_items(manifest, config.data, split)
        items = items if part is None else part.take(items)
        session = uuid.uuid4().hex
        kill_after = _kill_after()
        computed: list[str] = []
        reused: list[str] = []

        def one(item: dict[str, Any]) -> PreprocessedCase:
            case = finished_case(out, item, digest)
            if case is not None:
                reused.append(case.case_id)
            else:
                case = preprocess_case(item, chain, out)
                write_sidecar(out, case, digest, session)
                computed.append(case.case_id)
                if kill_after is not None and len(computed) >= kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)
            if bids:
                publish_case(out, case, cases[case.case_id], names[case.case_id], digest)
            return case

        done, failures = run_batch(items, one, strict=strict, desc="preprocess", out_dir=out)
        header = {
            "manifest_name": manifest.name,
            "manifest_digest": manifest.digest,
            "config_digest": digest,
            "data": config.data.model_dump(mode="json"),
            "split": split,
        }
        records = [asdict(c) for c in done]
        if part is None:
            write_index(out, header, records, failures)
        else:
            finish_part(held, part, COMMAND, header, records, failures)
    log.info("preprocessed %d case(s), reused %d, %d failed, into %s", len(computed),
             len(reused), len(failures), out)
    return done, failures


def publish_case(out: Path, case: PreprocessedCase, source: Case, name: bids_view.BidsName,
                 digest: str) -> None:
    """The case's BIDS name (a link to its NIfTI) and sidecar: ids, provenance, its record."""
    sidecar = {"CaseID": case.case_id, **bids_view.case_fields(source), "Split": case.split,
               "Description": "preprocessed: RAS, data.spacing, data.spatial_size, [0, 1]",
               "Image": case.image, "ConfigDigest": digest, "mri_vqvae": asdict(case)}
    bids_view.publish(out, name, out / case.image, sidecar)


def write_index(out: Path, header: dict[str, Any], records: list[dict[str, Any]],
                failures: list[Failure]) -> None:
    """index.json (`header`, the finished cases' `records`, the failures), failures.csv and,
    where the folder has a BIDS view, participants.tsv."""
    index = {**header, "cases": records, "failures": [asdict(f) for f in failures]}
    atomic_write_text(out / "index.json", json.dumps(index, indent=2) + "\n")
    write_failures(out / "failures.csv", failures)
    bids_view.write_participants(out)


def merge_preprocess(out: Path, merged: Merged) -> None:
    """The tables of a folder its parts preprocessed, as one process writes them."""
    remove_stale_temps([out, out / "images", out / "montages", out / "cases",
                        *bids_view.view_folders(out)])
    write_index(out, merged.header, merged.records, merged.failures)

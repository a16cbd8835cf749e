"""Batch preprocessing: normalised RAS NIfTI, a montage per case, an index, a failures table.

On disk (``out_dir``)::

    images/<case_id>.nii.gz   the preprocessed volume (RAS, data.spacing, data.spatial_size)
    montages/<case_id>.png    three orthogonal slices
    cases/<case_id>.json      the case's sidecar, written last: source sha256, config digest,
                              sha256 of its NIfTI and montage
    index.json                every finished case of the selection, and the failures
    failures.csv              case_id, path, reason
    .lock                     exists (flock-ed) while a run writes here; see mri_vqvae.core.outputs

Resume: a case is done when its sidecar names the same source sha256, data config digest,
subject and split, and its NIfTI and montage still hash to what the sidecar recorded. A rerun
reuses such a case and (re)computes every other; a killed run leaves each case finished or to be
redone, and its stale temp files are removed at the start of the next run. index.json and
failures.csv are rewritten at the end of every run. A full disk or read-only folder stops the
run with `OutputError` (it is no case's fault); a bad input is a per-case failure.

Test hook: with ``MRI_VQVAE_TEST_KILL_AFTER_CASE=k`` in the environment, the process SIGKILLs
itself right after committing the k-th case it computed (never set it otherwise).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from monai.transforms import Compose

from mri_vqvae.config import ExperimentConfig, config_digest
from mri_vqvae.core.atomic import atomic_write_text
from mri_vqvae.core.outputs import output_lock, remove_stale_temps
from mri_vqvae.data.datasets import case_items
from mri_vqvae.data.manifest import Manifest, sha256_file
from mri_vqvae.data.transforms import build_transforms
from mri_vqvae.data.writers import affine_spacing, write_nifti
from mri_vqvae.evaluation.report import orthogonal_montage
from mri_vqvae.tasks.cases import Failure, run_batch, write_failures

log = logging.getLogger(__name__)

SIDECAR_FORMAT = "mri-vqvae-preprocessed-case"
SIDECAR_VERSION = 1
KILL_ENV = "MRI_VQVAE_TEST_KILL_AFTER_CASE"

@dataclass(frozen=True)
class PreprocessedCase:
    """One written case; paths are relative to the output folder."""

    case_id: str
    subject_id: str
    split: str
    image: str
    montage: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    affine: list[list[float]]
    source_sha256: str


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


def sidecar_path(out_dir: Path, case_id: str) -> Path:
    """Where the sidecar that marks `case_id` finished lives."""
    return out_dir / "cases" / f"{case_id}.json"


def write_sidecar(out_dir: Path, case: PreprocessedCase, digest: str, session: str) -> None:
    """Mark `case` finished: its fields, the config digest and the sha256 of its outputs."""
    doc = {
        "format": SIDECAR_FORMAT,
        "format_version": SIDECAR_VERSION,
        **asdict(case),
        "config_digest": digest,
        "image_sha256": sha256_file(out_dir / case.image),
        "montage_sha256": sha256_file(out_dir / case.montage),
        "session": session,
    }
    atomic_write_text(sidecar_path(out_dir, case.case_id), json.dumps(doc, indent=2) + "\n")


def finished_case(out_dir: Path, item: dict[str, Any], digest: str) -> PreprocessedCase | None:
    """The case recorded by `item`'s sidecar when it matches and its outputs verify, else None."""
    path = sidecar_path(out_dir, item["case_id"])
    if not path.is_file():
        return None
    case_id = item["case_id"]
    image, montage = f"images/{case_id}.nii.gz", f"montages/{case_id}.png"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        same = (
            doc.get("format_version") == SIDECAR_VERSION
            and doc.get("config_digest") == digest
            and doc.get("source_sha256") == item["sha256"]
            and (doc.get("case_id"), doc.get("subject_id"), doc.get("split"))
            == (case_id, item["subject_id"], item["split"])
            and (doc.get("image"), doc.get("montage")) == (image, montage)
        )
        if not same:
            log.info("%s: another source file or config; the case is redone", path)
            return None
        if (sha256_file(out_dir / image) != doc.get("image_sha256")
                or sha256_file(out_dir / montage) != doc.get("montage_sha256")):
            log.warning("%s: its NIfTI or montage changed; the case is redone", path)
            return None
        return PreprocessedCase(
            case_id=case_id, subject_id=item["subject_id"], split=item["split"], image=image,
            montage=montage, shape=tuple(int(v) for v in doc["shape"]),  # type: ignore[arg-type]
            spacing=tuple(float(v) for v in doc["spacing"]),  # type: ignore[arg-type]
            affine=[[float(v) for v in row] for row in doc["affine"]],
            source_sha256=item["sha256"],
        )
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, KeyError,
            TypeError, ValueError) as exc:
        log.warning("%s is unreadable or incomplete (%s); the case is redone", path, exc)
        return None


def _kill_after() -> int | None:
    raw = os.environ.get(KILL_ENV)
    return int(raw) if raw else None


def preprocess_manifest(
    manifest: Manifest,
    config: ExperimentConfig,
    out_dir: str | Path,
    split: str | None = None,
    strict: bool = False,
) -> tuple[list[PreprocessedCase], list[Failure]]:
    """Preprocess every case of `split` into `out_dir`; writes index.json and failures.csv.

    Finished cases of an earlier run are reused (see the module doc). Raises `OutputError`
    before any case when `out_dir` is not writable or another run holds it, and mid-run when
    the disk fills or the folder turns read-only.
    """
    out = Path(out_dir)
    with output_lock(out):
        remove_stale_temps([out, out / "images", out / "montages", out / "cases"])
        chain = build_transforms(config.data)
        digest = config_digest(config.data)
        items = case_items(manifest, config.data, split)
        session = uuid.uuid4().hex
        kill_after = _kill_after()
        computed: list[str] = []
        reused: list[str] = []

        def one(item: dict[str, Any]) -> PreprocessedCase:
            case = finished_case(out, item, digest)
            if case is not None:
                reused.append(case.case_id)
                return case
            case = preprocess_case(item, chain, out)
            write_sidecar(out, case, digest, session)
            computed.append(case.case_id)
            if kill_after is not None and len(computed) >= kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
            return case

        done, failures = run_batch(items, one, strict=strict, desc="preprocess", out_dir=out)
        index = {
            "manifest_name": manifest.name,
            "manifest_digest": manifest.digest,
            "config_digest": digest,
            "data": config.data.model_dump(mode="json"),
            "split": split,
            "cases": [asdict(c) for c in done],
            "failures": [asdict(f) for f in failures],
        }
        atomic_write_text(out / "index.json", json.dumps(index, indent=2) + "\n")
        write_failures(out / "failures.csv", failures)
    log.info("preprocessed %d case(s), reused %d, %d failed, into %s", len(computed),
             len(reused), len(failures), out)
    return done, failures

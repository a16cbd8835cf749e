"""A `preprocess` output folder: its layout, what marks a case finished, and reading it back.

Layout (written by `mri_vqvae.tasks.preprocess.preprocess_manifest`)::

    images/<case_id>.nii.gz   the preprocessed volume (RAS, data.spacing, data.spatial_size)
    montages/<case_id>.png    three orthogonal slices
    cases/<case_id>.json      the case's sidecar, written last (`write_sidecar`)

A sidecar holds ``format`` / ``format_version``, the `PreprocessedCase` fields, the data-config
digest, the sha256 of the case's NIfTI and montage, and the writing session. A case is finished
(`finished_case`) when its sidecar names the same source sha256 (the manifest's), data-config
digest, subject and split, and its NIfTI and montage still hash to what the sidecar recorded.

`PreprocessedStore` returns a finished case's stored volume, read once (hashed, then parsed from
those bytes). Anything else (a case not there, another config, a changed file) falls back to the
MONAI chain on the raw file, so a store can only save time, never change a result: the stored
NIfTI holds the chain's float32 output exactly, and the chain's own MetaTensor is replaced by one
with the same voxels and the stored (float32-rounded) affine. ``with_store(chain, store)`` is
what `train-vqvae`, `encode`, `reconstruct` and `evaluate` use.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Transform

from mri_vqvae.config import DataConfig, config_digest
from mri_vqvae.core.atomic import atomic_write_text
from mri_vqvae.core.provenance import sha256_file
from mri_vqvae.data.transforms import IMAGE

log = logging.getLogger(__name__)

SIDECAR_FORMAT = "mri-vqvae-preprocessed-case"
SIDECAR_VERSION = 1


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


def case_files(case_id: str) -> tuple[str, str]:
    """(NIfTI, montage) paths of `case_id`, relative to the output folder."""
    return f"images/{case_id}.nii.gz", f"montages/{case_id}.png"


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


def _sidecar_matches(doc: Mapping[str, Any], item: Mapping[str, Any], digest: str) -> bool:
    image, montage = case_files(item["case_id"])
    return (
        doc.get("format_version") == SIDECAR_VERSION
        and doc.get("config_digest") == digest
        and doc.get("source_sha256") == item["sha256"]
        and (doc.get("case_id"), doc.get("subject_id"), doc.get("split"))
        == (item["case_id"], item["subject_id"], item["split"])
        and (doc.get("image"), doc.get("montage")) == (image, montage)
    )


def _case(doc: Mapping[str, Any], item: Mapping[str, Any]) -> PreprocessedCase:
    return PreprocessedCase(
        case_id=item["case_id"], subject_id=item["subject_id"], split=item["split"],
        image=doc["image"], montage=doc["montage"],
        shape=tuple(int(v) for v in doc["shape"]),  # type: ignore[arg-type]
        spacing=tuple(float(v) for v in doc["spacing"]),  # type: ignore[arg-type]
        affine=[[float(v) for v in row] for row in doc["affine"]],
        source_sha256=item["sha256"],
    )


def read_finished(out_dir: Path, item: Mapping[str, Any], digest: str
                  ) -> tuple[PreprocessedCase, bytes] | None:
    """`item`'s finished case and the bytes of its NIfTI (read once, verified), else None.

    `item` is a dataset item (``case_id``, ``subject_id``, ``split``, ``sha256``); `digest` the
    data-config digest the case must have been written with.
    """
    path = sidecar_path(out_dir, item["case_id"])
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if not _sidecar_matches(doc, item, digest):
            log.info("%s: another source file or config; the case is redone", path)
            return None
        blob = (out_dir / doc["image"]).read_bytes()
        if (hashlib.sha256(blob).hexdigest() != doc.get("image_sha256")
                or sha256_file(out_dir / doc["montage"]) != doc.get("montage_sha256")):
            log.warning("%s: its NIfTI or montage changed; the case is redone", path)
            return None
        return _case(doc, item), blob
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, KeyError,
            TypeError, ValueError) as exc:
        log.warning("%s is unreadable or incomplete (%s); the case is redone", path, exc)
        return None


def finished_case(out_dir: Path, item: Mapping[str, Any], digest: str
                  ) -> PreprocessedCase | None:
    """The case recorded by `item`'s sidecar when it matches and its outputs verify, else None."""
    found = read_finished(out_dir, item, digest)
    return None if found is None else found[0]


class PreprocessedStore:
    """Verified read access to a `preprocess` output folder for one data config."""

    def __init__(self, folder: str | Path, data: DataConfig) -> None:
        self.folder = Path(folder)
        self.digest = config_digest(data)
        self.hits = 0
        self.misses = 0

    def load(self, item: Mapping[str, Any]) -> MetaTensor | None:
        """The stored (1, D, H, W) float32 volume of `item` with its affine, or None."""
        if "sha256" not in item:
            return None
        found = read_finished(self.folder, item, self.digest)
        if found is None:
            self.misses += 1
            return None
        img = nib.Nifti1Image.from_bytes(gzip.decompress(found[1]))
        voxels = np.asarray(img.dataobj, dtype=np.float32)[None]
        self.hits += 1
        return MetaTensor(torch.from_numpy(voxels), affine=torch.as_tensor(img.affine))


class StoreOrChain(Transform):
    """A deterministic transform: the stored volume when `store` has the item, else `chain`.

    A MONAI `Transform` (not randomizable), so `CacheDataset` caches its output once per item.
    """

    def __init__(self, chain: Callable[[dict[str, Any]], dict[str, Any]],
                 store: PreprocessedStore | None) -> None:
        self.chain, self.store = chain, store

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        stored = None if self.store is None else self.store.load(data)
        if stored is None:
            return self.chain(dict(data))
        return {**data, IMAGE: stored}


def with_store(chain: Compose, folder: str | Path | None, data: DataConfig) -> Compose:
    """`chain` itself without a folder; else a Compose reading `folder` first (verified)."""
    if folder is None:
        return chain
    if not Path(folder).is_dir():
        log.warning("preprocessed folder %s does not exist: every case is preprocessed anew",
                    folder)
        return chain
    return Compose([StoreOrChain(chain, PreprocessedStore(folder, data))])

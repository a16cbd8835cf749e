"""The latents store: one folder of code grids; its format, written and read back here.

On disk (by convention ``runs/latents/<vqvae-run>/``)::

    <case_id>.npy   one uint16 grid (d, h, w) of code indices per case (np.save, no pickle)
    <case_id>~aug<k>.npy   with ``encode --augment N``: view k (1..N) of a train case, its k-th
                    seeded training augmentation (``~`` never occurs in a manifest case_id)
    index.json      provenance (the VQ-VAE, its weights' sha256, the manifest digest,
                    latent_shape, codebook_size, data config; with views also augment_views N,
                    augment_digest and augment_seed) plus one entry per grid: case_id,
                    subject_id, split, file, sha256 (of the .npy), source_sha256 (of the input),
                    and (written since cases carry labels) modality, source_id; a view's entry
                    adds view k and source_case (the case_id it was drawn from)
    index.journal   only while an encode runs or after it was killed: one JSON line per grid
                    encoded since index.json was last written (see `mri_vqvae.tasks.encode`)
    failures.csv    cases that could not be encoded: case_id, path, reason

`mri_vqvae.tasks.encode` writes a folder through `IndexWriter` (index.json, the journal) after
`previous_entries` has checked that the folder's grids were made the same way (`IDENTITY`).
`load_latents` validates a folder (shape, dtype, range, sha256) and `LatentDataset` serves the
grids of one split to the prior; a split's grids include its views (only train has any).
Folders written before modality / source_id were recorded load with those fields None, and
before views existed with every grid view 0.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from mri_vqvae.core import distributed
from mri_vqvae.core.atomic import atomic_write_text
from mri_vqvae.core.errors import MriVqvaeError
from mri_vqvae.core.journal import CaseJournal, read_case_journal
from mri_vqvae.core.provenance import utc_iso

log = logging.getLogger(__name__)

FORMAT = "mri-vqvae-latents"
FORMAT_VERSION = 1
INDEX = "index.json"
JOURNAL = "index.journal"
FAILURES = "failures.csv"
DTYPE = np.dtype("<u2")  # uint16, little-endian on disk whatever the machine
MAX_CODEBOOK = 2**16
IDENTITY = ("vqvae_sha256", "latent_shape", "codebook_size", "dtype", "data", "augment_views",
            "augment_digest", "augment_seed")
"""index.json fields that must agree before a rerun may reuse the grids already in a folder (the
augment_* ones are absent, i.e. None, in folders without views)."""
VIEW_MARK = "~aug"  # a view's case_id: <case_id>~aug<k>
_CASE_KEYS = ("case_id", "subject_id", "split", "file", "sha256", "source_sha256")
_LABEL_KEYS = ("modality", "source_id")  # optional: absent from folders of older versions
_HEADER_KEYS = ("vqvae_checkpoint", "vqvae_sha256", "manifest_digest", "latent_shape",
                "codebook_size", "data", "cases")


class LatentsError(MriVqvaeError):
    """A latents folder or an encode request that cannot be used (says which file and why)."""


def npy_bytes(grid: np.ndarray) -> bytes:
    """The .npy file content of `grid` (np.save, allow_pickle=False)."""
    buf = io.BytesIO()
    np.save(buf, grid, allow_pickle=False)
    return buf.getvalue()


def view_id(case_id: str, view: int) -> str:
    """The case_id (and file stem) of view `view` of `case_id`; view 0 is the case itself."""
    return case_id if view == 0 else f"{case_id}{VIEW_MARK}{view}"


def read_index(path: Path) -> dict[str, Any]:
    """The parsed index.json at `path`; `LatentsError` unless it is a latents index."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LatentsError(
            f"{path} is not readable JSON ({exc}); delete the folder and re-encode"
        ) from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise LatentsError(f"{path} is not a latents index (no format {FORMAT!r})")
    return doc


# --- writing (by `mri_vqvae.tasks.encode`) ------------------------------------------------------


def _shown(value: Any) -> str:
    """A header value for an error message: at most 40 characters, None as absent."""
    return "absent" if value is None else str(value)[:40]


def previous_entries(out_dir: Path, header: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Entries of earlier encodes into `out_dir` (index.json plus journal), by case_id.

    Raises `LatentsError` naming each difference when index.json's `IDENTITY` fields differ from
    `header` (another model, preprocessing or augmentation): its grids cannot be reused.
    """
    path = out_dir / INDEX
    if not path.is_file():
        return {}
    doc = read_index(path)
    changed = [k for k in IDENTITY if doc.get(k) != header.get(k)]
    if changed:
        diffs = "; ".join(f"{k} {_shown(doc.get(k))} there vs {_shown(header.get(k))} now"
                          for k in changed)
        raise LatentsError(
            f"{out_dir} already holds latents made differently (index.json differs in "
            f"{changed}: {diffs}): choose another --out or delete that folder"
        )
    cases = [e for e in doc.get("cases", []) if isinstance(e, dict)]
    return {str(e["case_id"]): dict(e) for e in cases} | read_case_journal(out_dir / JOURNAL)


class IndexWriter:
    """index.json and its journal as an encode keeps them: `entries` by case_id in memory on every
    rank, the files on rank 0 only (other ranks' writes do nothing)."""

    def __init__(self, out: Path, header: dict[str, Any], entries: dict[str, dict[str, Any]]):
        self.out, self.header, self.entries = out, header, entries
        self.main = distributed.is_main()
        self._journal = CaseJournal(self.out / JOURNAL)

    def write(self, failures: list[dict[str, str]]) -> None:
        """Write index.json with every entry and `failures`, then drop the journal it now holds."""
        if not self.main:
            return
        self.close()
        doc = {**self.header, "updated_utc": utc_iso(),
               "cases": [self.entries[k] for k in sorted(self.entries)],
               "failures": failures}
        atomic_write_text(self.out / INDEX, json.dumps(doc, indent=2) + "\n")
        (self.out / JOURNAL).unlink(missing_ok=True)

    def append(self, entry: dict[str, Any]) -> None:
        """Record one encoded grid: in memory, and on rank 0 as a fsynced journal line."""
        self.entries[entry["case_id"]] = entry
        if not self.main:
            return
        self._journal.append(entry)

    def close(self) -> None:
        self._journal.close()



# --- reading -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LatentCase:
    """One index.json entry; ``file`` is relative to the latents folder.

    ``modality`` and ``source_id`` come from the manifest case (prior labels, see
    ``prior.label_field``); None in folders encoded before they were recorded. ``view`` is 0 for
    a case's own grid, k >= 1 for its k-th augmented view, whose ``source_case`` names the case.
    """

    case_id: str
    subject_id: str
    split: str
    file: str
    sha256: str
    source_sha256: str
    modality: str | None = None
    source_id: str | None = None
    view: int = 0
    source_case: str | None = None


@dataclass(frozen=True)
class LatentIndex:
    """A validated latents folder: its index.json and every grid, (d, h, w) uint16 each."""

    root: Path
    doc: dict[str, Any] = field(repr=False)
    cases: tuple[LatentCase, ...]
    grids: Mapping[str, np.ndarray] = field(repr=False)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        d, h, w = (int(v) for v in self.doc["latent_shape"])
        return d, h, w

    @property
    def codebook_size(self) -> int:
        return int(self.doc["codebook_size"])

    @property
    def data(self) -> dict[str, Any]:
        return dict(self.doc["data"])

    def split_cases(self, split: str) -> tuple[LatentCase, ...]:
        """The cases of `split`, sorted by case_id."""
        return tuple(c for c in self.cases if c.split == split)

    def stack(self, split: str) -> np.ndarray:
        """The grids of `split` stacked to (N, d, h, w) uint16 (N may be 0)."""
        arrays = [self.grids[c.case_id] for c in self.split_cases(split)]
        return np.stack(arrays) if arrays else np.zeros((0, *self.latent_shape), DTYPE)

    def provenance(self) -> dict[str, Any]:
        """What a prior trained on these grids records so `sample` needs no other file."""
        return {
            "latents_dir": str(self.root.resolve()),
            "vqvae_checkpoint": str(self.doc["vqvae_checkpoint"]),
            "vqvae_sha256": str(self.doc["vqvae_sha256"]),
            "manifest_digest": str(self.doc["manifest_digest"]),
            "latent_shape": list(self.latent_shape),
            "codebook_size": self.codebook_size,
            "data": self.data,
        }


def _parse_case(entry: Any, path: Path, n: int) -> LatentCase:
    if not isinstance(entry, dict) or any(k not in entry for k in _CASE_KEYS):
        raise LatentsError(f"{path}: cases[{n}] lacks some of the keys {list(_CASE_KEYS)}")
    labels = {k: None if entry.get(k) is None else str(entry[k]) for k in _LABEL_KEYS}
    view, source = entry.get("view", 0), entry.get("source_case")
    if type(view) is not int or view < 0 or (view > 0) != isinstance(source, str):
        raise LatentsError(f"{path}: cases[{n}] has view {view!r} and source_case {source!r}: "
                           "a view k >= 1 names its source_case, a case (view 0) none")
    case = LatentCase(**{k: str(entry[k]) for k in _CASE_KEYS}, **labels, view=view,
                      source_case=source)
    if Path(case.file).name != case.file or not case.file.endswith(".npy"):
        raise LatentsError(f"{path}: cases[{n}].file {case.file!r} must be a plain .npy name")
    return case


def read_grid(
    path: Path, sha256: str | None, shape: tuple[int, ...], codebook_size: int
) -> np.ndarray:
    """Read and check one grid file: sha256 (unless None), uint16, `shape`, values < K."""
    fix = "re-encode it (rerun `mri-vqvae encode` with the same arguments)"
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise LatentsError(f"{path} cannot be read ({exc}); {fix}") from None
    if sha256 is not None and hashlib.sha256(raw).hexdigest() != sha256:
        raise LatentsError(
            f"{path}: sha256 {hashlib.sha256(raw).hexdigest()[:12]}... does not match the "
            f"{sha256[:12]}... recorded in index.json: the file changed after encoding; {fix}"
        )
    try:
        grid = np.load(io.BytesIO(raw), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise LatentsError(f"{path} is not a readable .npy array ({exc}); {fix}") from None
    if grid.dtype != DTYPE:
        raise LatentsError(f"{path}: dtype {grid.dtype}, expected uint16 code indices; {fix}")
    if grid.shape != tuple(shape):
        raise LatentsError(
            f"{path}: shape {grid.shape}, expected latent_shape {tuple(shape)}; {fix}"
        )
    if grid.size and int(grid.max()) >= codebook_size:
        raise LatentsError(
            f"{path}: holds code {int(grid.max())}, outside [0, {codebook_size}) "
            f"(codebook_size in index.json); {fix}"
        )
    return grid


def load_latents(folder: str | Path, verify: bool = True) -> LatentIndex:
    """Read and validate a latents folder; every grid is loaded and checked.

    Raises `LatentsError` naming the file: index.json missing or malformed, a grid missing,
    tampered (sha256, when `verify`), of the wrong dtype or shape, or holding codes >= K.
    """
    root = Path(folder)
    path = root / INDEX
    if not path.is_file():
        raise LatentsError(
            f"{path} does not exist: {root} is not a latents folder; make one with "
            f"`mri-vqvae encode --vqvae RUN_DIR --manifest M --out {root}`"
        )
    doc = read_index(path)
    if (root / JOURNAL).is_file():
        log.warning("%s: an encode into this folder was interrupted; index.json lists only the "
                    "cases before it. Rerun the same `mri-vqvae encode` to finish", root)
    missing = [k for k in _HEADER_KEYS if k not in doc]
    if missing or not isinstance(doc["cases"], list):
        raise LatentsError(f"{path} lacks {missing or ['a cases list']}: re-encode the folder")
    shape = tuple(int(v) for v in doc["latent_shape"])
    if len(shape) != 3 or min(shape) < 1:
        raise LatentsError(f"{path}: latent_shape {doc['latent_shape']} is not a (d, h, w) size")
    cases = tuple(_parse_case(e, path, n) for n, e in enumerate(doc["cases"]))
    k = int(doc["codebook_size"])
    grids = {
        c.case_id: read_grid(root / c.file, c.sha256 if verify else None, shape, k) for c in cases
    }
    return LatentIndex(root=root, doc=doc, cases=cases, grids=grids)


class LatentDataset(Dataset):
    """The code grids of one split: ``ds[i]`` -> (d, h, w) int64; ``ds.grids`` (N, d, h, w)."""

    def __init__(self, index: LatentIndex, split: str) -> None:
        self.split = split
        self.cases = index.split_cases(split)
        self.grids = torch.from_numpy(index.stack(split).astype(np.int64))

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, i: int) -> Tensor:
        return self.grids[i]

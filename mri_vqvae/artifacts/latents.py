"""Latent code grids: encode a manifest with a trained VQ-VAE, read the grids back, baselines.

On disk (by convention ``runs/latents/<vqvae-run>/``)::

    <case_id>.npy   one uint16 grid (d, h, w) of code indices per case (np.save, no pickle)
    index.json      provenance plus one entry per case (see `encode_manifest`)
    failures.csv    cases that could not be encoded: case_id, path, reason

Every file is written atomically and index.json is rewritten after each encoded case, so a killed
encode loses nothing: a rerun keeps each grid whose file still matches the sha256 recorded in
index.json and encodes only the rest. `load_latents` validates a folder (shape, dtype, range,
sha256) and `LatentDataset` serves the grids of one split to the prior.

Under ``torchrun`` (`mri_vqvae.core.distributed`) `encode_manifest` shards the cases: rank r encodes
its contiguous share and writes only those .npy files (atomically); rank 0 also keeps index.json
current for its own cases as it goes, then gathers every rank's entries and failures and writes
index.json and failures.csv once more, the same documents a single process would write. A kill
mid-run loses at most the index entries of other ranks' cases: their grids are re-encoded by the
rerun (the sha256 check never trusts a file that index.json does not vouch for).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import Compose
from pydantic import ValidationError
from torch import Tensor
from torch.utils.data import Dataset

from mri_vqvae.artifacts.checkpoint import WEIGHTS, load_checkpoint, resolve_checkpoint
from mri_vqvae.artifacts.runs import utc_iso
from mri_vqvae.config import DataConfig
from mri_vqvae.core import distributed
from mri_vqvae.core.atomic import atomic_write_bytes, atomic_write_text
from mri_vqvae.core.errors import CheckpointError, MriVqvaeError
from mri_vqvae.core.outputs import ensure_writable
from mri_vqvae.data.datasets import case_items, plain_volume
from mri_vqvae.data.manifest import Manifest, sha256_file
from mri_vqvae.data.preprocessed import with_store
from mri_vqvae.data.transforms import IMAGE, build_transforms
from mri_vqvae.models.autoencoders.vqvae.model import VQVAE
from mri_vqvae.tasks.cases import Failure, innermost_error, run_batch, write_failures

log = logging.getLogger(__name__)

FORMAT = "mri-vqvae-latents"
FORMAT_VERSION = 1
INDEX = "index.json"
FAILURES = "failures.csv"
DTYPE = np.dtype("<u2")  # uint16, little-endian on disk whatever the machine
MAX_CODEBOOK = 2**16
# index.json fields that must agree before a rerun may reuse the grids already in a folder
_IDENTITY = ("vqvae_sha256", "latent_shape", "codebook_size", "dtype", "data")
_CASE_KEYS = ("case_id", "subject_id", "split", "file", "sha256", "source_sha256")
_HEADER_KEYS = ("vqvae_checkpoint", "vqvae_sha256", "manifest_digest", "latent_shape",
                "codebook_size", "data", "cases")


class LatentsError(MriVqvaeError):
    """A latents folder or an encode request that cannot be used (says which file and why)."""


# --- the VQ-VAE that makes the codes -------------------------------------------------------------


@dataclass(frozen=True)
class VQVAESource:
    """A trained VQ-VAE loaded for encoding, with the data config it was trained with."""

    run_dir: Path
    checkpoint: Path
    model: VQVAE
    weights_sha256: str
    step: int | None
    data: DataConfig
    latent_shape: tuple[int, int, int]

    @property
    def codebook_size(self) -> int:
        return self.model.config.codebook_size


def pick_checkpoint(run_dir: str | Path) -> Path:
    """``run_dir/checkpoints/best``, else ``.../last``; a checkpoint folder given is kept as is."""
    run_dir = Path(run_dir)
    if (run_dir / "COMPLETE").is_file():
        return run_dir
    for name in ("best", "last"):
        folder = run_dir / "checkpoints" / name
        try:
            resolve_checkpoint(folder)
        except CheckpointError:
            continue
        return folder
    raise LatentsError(
        f"{run_dir} holds no complete checkpoints/best or checkpoints/last: pass --vqvae a run "
        "folder made by `mri-vqvae train-vqvae` (or one of its checkpoint folders)"
    )


def load_vqvae_source(run_dir: str | Path) -> VQVAESource:
    """Load the VQ-VAE of a run (best, else last) in eval mode, with its training data config."""
    run_dir = Path(run_dir).resolve()
    folder = pick_checkpoint(run_dir)
    loaded = load_checkpoint(folder)
    if loaded.kind != "vqvae" or not isinstance(loaded.model, VQVAE):
        raise LatentsError(f"{folder} holds a {loaded.kind!r} checkpoint, not a VQ-VAE")
    experiment = loaded.extra.get("experiment")
    if not isinstance(experiment, dict) or "data" not in experiment:
        raise LatentsError(
            f"{folder}/config.json records no data config (extra.experiment.data): it was not "
            "saved by `mri-vqvae train-vqvae`, so the preprocessing it expects is unknown"
        )
    try:
        data = DataConfig.model_validate(experiment["data"])
    except ValidationError as exc:
        raise LatentsError(
            f"{folder}/config.json: its data config does not validate: {exc}"
        ) from None
    model = loaded.model
    if model.config.codebook_size > MAX_CODEBOOK:
        raise LatentsError(
            f"{folder}: codebook_size={model.config.codebook_size} does not fit the uint16 "
            f"latent files (at most {MAX_CODEBOOK} codes); train a VQ-VAE with fewer codes"
        )
    return VQVAESource(
        run_dir=run_dir if folder != run_dir else folder.parent.parent,
        checkpoint=folder,
        model=model,
        weights_sha256=str(loaded.meta["files"][WEIGHTS]),
        step=loaded.step,
        data=data,
        latent_shape=model.latent_shape(data.spatial_size),
    )


# --- encoding ------------------------------------------------------------------------------------


def encode_item(
    model: VQVAE, chain: Compose, item: Mapping[str, Any], device: torch.device
) -> np.ndarray:
    """Preprocess one case item with `chain` and encode it: -> (d, h, w) uint16 code indices.

    `model` must be in eval mode; `encode_indices` never moves the codebook.
    """
    volume = plain_volume(chain(dict(item))[IMAGE])  # (1, D, H, W)
    indices = model.encode_indices(volume[None].to(device))[0].cpu()  # (d, h, w) int64
    assert int(indices.max()) < MAX_CODEBOOK and int(indices.min()) >= 0
    return indices.numpy().astype(DTYPE)


def npy_bytes(grid: np.ndarray) -> bytes:
    """The .npy file content of `grid` (np.save, allow_pickle=False)."""
    buf = io.BytesIO()
    np.save(buf, grid, allow_pickle=False)
    return buf.getvalue()


def _case_error(item: Mapping[str, Any], exc: BaseException) -> MriVqvaeError:
    """The project's own error inside `exc`, else a `LatentsError` naming the case and file."""
    inner = innermost_error(exc)
    if isinstance(inner, MriVqvaeError):
        return inner
    return LatentsError(
        f"case {item['case_id']!r} ({item['image']}): {type(inner).__name__}: {inner}"
    )


def _header(
    source: VQVAESource, manifest: Manifest, manifest_path: str | Path | None
) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "vqvae_run": str(source.run_dir),
        "vqvae_checkpoint": str(source.checkpoint.resolve()),
        "vqvae_sha256": source.weights_sha256,
        "vqvae_step": source.step,
        "manifest_name": manifest.name,
        "manifest_path": None if manifest_path is None else str(Path(manifest_path).resolve()),
        "manifest_digest": manifest.digest,
        "latent_shape": list(source.latent_shape),
        "codebook_size": source.codebook_size,
        "dtype": "uint16",
        "data": source.data.model_dump(mode="json"),
    }


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LatentsError(
            f"{path} is not readable JSON ({exc}); delete the folder and re-encode"
        ) from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise LatentsError(f"{path} is not a latents index (no format {FORMAT!r})")
    return doc


def _previous_entries(out_dir: Path, header: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Case entries of an earlier encode into `out_dir` by the same model and preprocessing."""
    path = out_dir / INDEX
    if not path.is_file():
        return {}
    doc = _read_json(path)
    changed = [k for k in _IDENTITY if doc.get(k) != header[k]]
    if changed:
        raise LatentsError(
            f"{out_dir} already holds latents made differently (index.json differs in "
            f"{changed}: e.g. vqvae_sha256 {str(doc.get('vqvae_sha256'))[:12]}... vs "
            f"{str(header['vqvae_sha256'])[:12]}...): choose another --out or delete that folder"
        )
    return {str(e["case_id"]): dict(e) for e in doc.get("cases", []) if isinstance(e, dict)}


def _reusable(entry: Mapping[str, Any] | None, item: Mapping[str, Any], out_dir: Path) -> bool:
    """True when `entry` still describes `item` and its file still has the recorded sha256."""
    if entry is None or any(entry.get(k) != item[k] for k in ("subject_id", "split")):
        return False
    if entry.get("source_sha256") != item["sha256"]:
        return False
    path = out_dir / str(entry.get("file"))
    return path.is_file() and sha256_file(path) == entry.get("sha256")


@dataclass(frozen=True)
class EncodeResult:
    """What an encode did: ``encoded`` were computed now, ``reused`` kept from an earlier run."""

    out_dir: Path
    encoded: list[str]
    reused: list[str]
    failures: list[Failure]

    @property
    def index_path(self) -> Path:
        return self.out_dir / INDEX


def encode_manifest(
    vqvae_run: str | Path,
    manifest: Manifest,
    out_dir: str | Path,
    split: str | None = None,
    strict: bool = False,
    device: str | torch.device = "auto",
    manifest_path: str | Path | None = None,
    preprocessed: str | Path | None = None,
) -> EncodeResult:
    """Encode the cases of `split` (all if None) into uint16 grids under `out_dir`.

    The VQ-VAE is ``vqvae_run/checkpoints/best`` (else ``last``) in eval mode; each case goes
    through the deterministic preprocessing chain of the data config stored in that checkpoint,
    or is read from `preprocessed` (a `preprocess` folder of that config; verified).
    index.json holds the provenance (vqvae run, checkpoint, weights sha256, manifest digest,
    latent_shape, codebook_size, data config) and one entry per case: case_id, subject_id,
    split, file, sha256 (of the .npy), source_sha256 (of the input, from the manifest).
    Resumable: a case whose entry and file still match is kept, not recomputed. A bad case is
    listed in failures.csv and skipped, or raised when `strict`. Under DDP each rank encodes its
    share of the cases, rank 0 writes index.json and failures.csv, and every rank returns the
    result of the whole encode.
    """
    out = Path(out_dir)
    source = load_vqvae_source(vqvae_run)
    header = _header(source, manifest, manifest_path)
    ensure_writable(out)  # a read-only or full folder is a clear error before any case
    previous = _previous_entries(out, header)
    items = case_items(manifest, source.data, split)
    by_id = {c.case_id: c for c in manifest.cases}
    entries = {  # entries of other splits stay while the manifest still lists them unchanged
        cid: e for cid, e in previous.items()
        if cid in by_id and e.get("source_sha256") == by_id[cid].sha256
        and e.get("split") == (by_id[cid].split or "")
    }
    distributed.barrier()  # every rank has read the old index.json before rank 0 rewrites it
    dev = distributed.resolve_device(device)
    model = source.model.to(dev).eval()
    chain = with_store(build_transforms(source.data), preprocessed, source.data)
    encoded: list[str] = []
    reused: list[str] = []
    main = distributed.is_main()

    def write_index(failures: list[Failure]) -> None:
        if not main:
            return
        doc = {**header, "updated_utc": utc_iso(),
               "cases": [entries[k] for k in sorted(entries)],
               "failures": [asdict(f) for f in failures]}
        atomic_write_text(out / INDEX, json.dumps(doc, indent=2) + "\n")

    def process(item: dict[str, Any]) -> str:
        cid = item["case_id"]
        if _reusable(entries.get(cid), item, out):
            reused.append(cid)
            return cid
        entries.pop(cid, None)
        try:
            grid = encode_item(model, chain, item, dev)
        except (OSError, RuntimeError, ValueError) as exc:
            raise _case_error(item, exc) from None  # the case error says what the cause was
        content = npy_bytes(grid)
        atomic_write_bytes(out / f"{cid}.npy", content)
        entries[cid] = {"case_id": cid, "subject_id": item["subject_id"], "split": item["split"],
                        "file": f"{cid}.npy", "sha256": hashlib.sha256(content).hexdigest(),
                        "source_sha256": item["sha256"]}
        write_index([])  # after every case: a kill loses nothing
        encoded.append(cid)
        return cid

    write_index([])
    mine = distributed.shard(items)
    _, failures = run_batch(mine, process, strict=strict, desc="encode", out_dir=out)
    if distributed.is_distributed():
        encoded, reused, failures = _merge_shards(items, mine, entries, encoded, reused, failures)
    write_index(failures)
    if main:
        write_failures(out / FAILURES, failures)
    log.info("encoded %d case(s), reused %d, %d failed, into %s", len(encoded), len(reused),
             len(failures), out)
    return EncodeResult(out, encoded, reused, failures)


def _ids(case_ids: list[str], most: int = 10) -> str:
    """Up to `most` case ids for a log line, with how many more."""
    more = f" (+{len(case_ids) - most} more)" if len(case_ids) > most else ""
    return f"{case_ids[:most]}{more}"


def _merge_shards(
    items: list[dict[str, Any]],
    mine: list[dict[str, Any]],
    entries: dict[str, dict[str, Any]],
    encoded: list[str],
    reused: list[str],
    failures: list[Failure],
) -> tuple[list[str], list[str], list[Failure]]:
    """Gather every rank's outcome; `entries` becomes the whole encode's (in place).

    Entries of cases outside `items` are the same on every rank (read before the encode); each
    case of `items` takes the entry of the rank that processed it, or none when it failed. The
    lists come back in case order (shards are contiguous and gathered in rank order).
    """
    ours = {it["case_id"]: entries[it["case_id"]] for it in mine if it["case_id"] in entries}
    log.info("rank %d of %d: encoded %s, reused %s, %d failed", distributed.rank(),
             distributed.world_size(), _ids(encoded), _ids(reused), len(failures))
    parts = distributed.all_gather_object((ours, encoded, reused, failures))
    ids = {it["case_id"] for it in items}
    for cid in ids:
        entries.pop(cid, None)
    all_encoded: list[str] = []
    all_reused: list[str] = []
    all_failures: list[Failure] = []
    for part_entries, part_encoded, part_reused, part_failures in parts:
        entries.update(part_entries)
        all_encoded += part_encoded
        all_reused += part_reused
        all_failures += part_failures
    return all_encoded, all_reused, all_failures


# --- reading -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LatentCase:
    """One index.json entry; ``file`` is relative to the latents folder."""

    case_id: str
    subject_id: str
    split: str
    file: str
    sha256: str
    source_sha256: str


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
    case = LatentCase(**{k: str(entry[k]) for k in _CASE_KEYS})
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
    doc = _read_json(path)
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


# --- baselines -----------------------------------------------------------------------------------


def uniform_bits(codebook_size: int) -> float:
    """Bits per latent of the uniform code distribution: log2 K."""
    return math.log2(codebook_size)


def unigram_probabilities(train: np.ndarray | Tensor, codebook_size: int) -> np.ndarray:
    """Code frequencies of `train` (any shape) with add-one smoothing: (K,) float64, sums to 1."""
    codes = np.asarray(train, dtype=np.int64).reshape(-1)
    counts = np.bincount(codes, minlength=codebook_size).astype(np.float64) + 1.0
    return counts / counts.sum()


def unigram_bits(
    train: np.ndarray | Tensor, evaluate: np.ndarray | Tensor, codebook_size: int
) -> float:
    """Cross-entropy in bits per latent of `evaluate` under the add-one unigram of `train`."""
    codes = np.asarray(evaluate, dtype=np.int64).reshape(-1)
    if codes.size == 0:
        raise ValueError("unigram_bits needs at least one code to evaluate")
    p = unigram_probabilities(train, codebook_size)
    return float(-np.log2(p[codes]).mean())

"""Encode a manifest with a trained autoencoder into a latents folder (`artifacts.latents`).

Resumable without quadratic rewrites: index.json is written once when the encode starts (the
entries still valid from earlier runs) and once at the end; in between, each encoded case is
appended to ``index.journal`` as one JSON line (flushed and fsynced) after its .npy is written
atomically. A killed encode so loses nothing: a rerun reads index.json plus the journal (a line
cut short by the kill is skipped), keeps each grid whose file still matches its recorded sha256,
encodes only the rest, and folds the journal into index.json.

Under ``torchrun`` (`mri_vqvae.core.distributed`) the cases are sharded: rank r encodes its
contiguous share and writes only those .npy files (atomically); rank 0 journals its own cases as
it goes, then gathers every rank's entries and failures and writes index.json and failures.csv,
the same documents a single process would write. A kill mid-run loses at most the entries of
other ranks' cases: their grids are re-encoded by the rerun (the sha256 check never trusts a
file that index.json and the journal do not vouch for).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from monai.transforms import Compose

from mri_vqvae.artifacts.latents import (
    DTYPE,
    FAILURES,
    FORMAT,
    FORMAT_VERSION,
    IDENTITY,
    INDEX,
    JOURNAL,
    MAX_CODEBOOK,
    LatentsError,
    npy_bytes,
    read_index,
)
from mri_vqvae.artifacts.loading import AutoencoderRun, open_autoencoder_run
from mri_vqvae.core import distributed
from mri_vqvae.core.atomic import atomic_write_bytes, atomic_write_text
from mri_vqvae.core.device import resolve_device
from mri_vqvae.core.errors import MriVqvaeError, innermost_error
from mri_vqvae.core.outputs import ensure_writable
from mri_vqvae.core.provenance import sha256_file, utc_iso
from mri_vqvae.data.case import Case
from mri_vqvae.data.datasets import case_items, plain_volume
from mri_vqvae.data.manifest import Manifest
from mri_vqvae.data.preprocessed import with_store
from mri_vqvae.data.transforms import IMAGE, build_transforms
from mri_vqvae.models.autoencoders.base import DiscreteAutoencoder
from mri_vqvae.tasks.cases import Failure, run_batch, write_failures

log = logging.getLogger(__name__)


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


def encode_item(
    model: DiscreteAutoencoder, chain: Compose, item: Mapping[str, Any], device: torch.device
) -> np.ndarray:
    """Preprocess one case item with `chain` and encode it: -> (d, h, w) uint16 code indices.

    `model` must be in eval mode; `encode_indices` never moves the codebook.
    """
    volume = plain_volume(chain(dict(item))[IMAGE])  # (1, D, H, W)
    indices = model.encode_indices(volume[None].to(device))[0].cpu()  # (d, h, w) int64
    assert int(indices.max()) < MAX_CODEBOOK and int(indices.min()) >= 0
    return indices.numpy().astype(DTYPE)


def _open_source(vqvae_run: str | Path) -> AutoencoderRun:
    """The run's autoencoder, refused when its codes do not fit the uint16 grid files."""
    source = open_autoencoder_run(vqvae_run)
    if source.codebook_size > MAX_CODEBOOK:
        raise LatentsError(
            f"{source.checkpoint}: codebook_size={source.codebook_size} does not fit the uint16 "
            f"latent files (at most {MAX_CODEBOOK} codes); train a VQ-VAE with fewer codes"
        )
    return source


def _case_error(item: Mapping[str, Any], exc: BaseException) -> MriVqvaeError:
    """The project's own error inside `exc`, else a `LatentsError` naming the case and file."""
    inner = innermost_error(exc)
    if isinstance(inner, MriVqvaeError):
        return inner
    return LatentsError(
        f"case {item['case_id']!r} ({item['image']}): {type(inner).__name__}: {inner}"
    )


def _header(
    source: AutoencoderRun, manifest: Manifest, manifest_path: str | Path | None
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


def _journal_entries(path: Path) -> list[dict[str, Any]]:
    """The case entries of a journal; a line cut short by a kill is skipped."""
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and "case_id" in entry:
            entries.append(entry)
    return entries


def _previous_entries(out_dir: Path, header: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Case entries of earlier encodes into `out_dir` by the same model and preprocessing."""
    path = out_dir / INDEX
    if not path.is_file():
        return {}
    doc = read_index(path)
    changed = [k for k in IDENTITY if doc.get(k) != header[k]]
    if changed:
        raise LatentsError(
            f"{out_dir} already holds latents made differently (index.json differs in "
            f"{changed}: e.g. vqvae_sha256 {str(doc.get('vqvae_sha256'))[:12]}... vs "
            f"{str(header['vqvae_sha256'])[:12]}...): choose another --out or delete that folder"
        )
    cases = [e for e in doc.get("cases", []) if isinstance(e, dict)]
    return {str(e["case_id"]): dict(e) for e in cases + _journal_entries(out_dir / JOURNAL)}


def _still_listed(entry: Mapping[str, Any], case: Case | None) -> bool:
    """True when the manifest still lists the entry's case with the same file and split."""
    return (case is not None and entry.get("source_sha256") == case.sha256
            and entry.get("split") == (case.split or ""))


def _reusable(entry: Mapping[str, Any] | None, item: Mapping[str, Any], out_dir: Path) -> bool:
    """True when `entry` still describes `item` and its file still has the recorded sha256."""
    if entry is None or any(entry.get(k) != item[k] for k in ("subject_id", "split")):
        return False
    if entry.get("source_sha256") != item["sha256"]:
        return False
    path = out_dir / str(entry.get("file"))
    return path.is_file() and sha256_file(path) == entry.get("sha256")


class _Index:
    """index.json and its journal, kept by rank 0 only (other ranks' calls do nothing)."""

    def __init__(self, out: Path, header: dict[str, Any], entries: dict[str, dict[str, Any]]):
        self.out, self.header, self.entries = out, header, entries
        self.main = distributed.is_main()
        self._journal: IO[str] | None = None

    def write(self, failures: list[Failure]) -> None:
        """Write index.json with every entry, then drop the journal it now holds."""
        if not self.main:
            return
        self.close()
        doc = {**self.header, "updated_utc": utc_iso(),
               "cases": [self.entries[k] for k in sorted(self.entries)],
               "failures": [asdict(f) for f in failures]}
        atomic_write_text(self.out / INDEX, json.dumps(doc, indent=2) + "\n")
        (self.out / JOURNAL).unlink(missing_ok=True)

    def append(self, entry: dict[str, Any]) -> None:
        """Record one encoded case: in memory, and on rank 0 as a fsynced journal line."""
        self.entries[entry["case_id"]] = entry
        if not self.main:
            return
        if self._journal is None:
            self._journal = open(self.out / JOURNAL, "a", encoding="utf-8")  # noqa: SIM115
        self._journal.write(json.dumps(entry) + "\n")
        self._journal.flush()
        os.fsync(self._journal.fileno())

    def close(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None


def _labels(case: Case) -> dict[str, str]:
    """The manifest labels an entry records (prior classes, see ``prior.label_field``)."""
    return {"modality": case.modality, "source_id": case.source_id}


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
    or is read from `preprocessed` (a `preprocess` folder of that config; verified). index.json:
    see `mri_vqvae.artifacts.latents`. Resumable: a case whose entry and file still match is
    kept, not recomputed. A bad case is listed in failures.csv and skipped, or raised when
    `strict`. Under DDP each rank encodes its share of the cases, rank 0 writes index.json and
    failures.csv, and every rank returns the result of the whole encode.
    """
    out = Path(out_dir)
    source = _open_source(vqvae_run)
    header = _header(source, manifest, manifest_path)
    ensure_writable(out)  # a read-only or full folder is a clear error before any case
    previous = _previous_entries(out, header)
    items = case_items(manifest, source.data, split)
    by_id = {c.case_id: c for c in manifest.cases}
    index = _Index(out, header, {  # other splits' entries stay while the manifest lists them
        cid: {**e, **_labels(by_id[cid])} for cid, e in previous.items()
        if _still_listed(e, by_id.get(cid))
    })
    distributed.barrier()  # every rank has read the old index.json before rank 0 rewrites it
    dev = resolve_device(device)
    model = source.model.to(dev).eval()  # type: ignore[attr-defined]
    chain = with_store(build_transforms(source.data), preprocessed, source.data)
    encoded: list[str] = []
    reused: list[str] = []

    def process(item: dict[str, Any]) -> str:
        cid = item["case_id"]
        if _reusable(index.entries.get(cid), item, out):
            reused.append(cid)
            return cid
        index.entries.pop(cid, None)
        try:
            grid = encode_item(model, chain, item, dev)
        except (OSError, RuntimeError, ValueError) as exc:
            raise _case_error(item, exc) from None  # the case error says what the cause was
        content = npy_bytes(grid)
        atomic_write_bytes(out / f"{cid}.npy", content)
        index.append({"case_id": cid, "subject_id": item["subject_id"], "split": item["split"],
                      "file": f"{cid}.npy", "sha256": hashlib.sha256(content).hexdigest(),
                      "source_sha256": item["sha256"], **_labels(by_id[cid])})
        encoded.append(cid)
        return cid

    index.write([])
    mine = distributed.shard(items)
    try:
        _, failures = run_batch(mine, process, strict=strict, desc="encode", out_dir=out)
    finally:
        index.close()
    if distributed.is_distributed():
        encoded, reused, failures = _merge(index, items, mine, encoded, reused, failures)
    index.write(failures)
    if index.main:
        write_failures(out / FAILURES, failures)
    log.info("encoded %d case(s), reused %d, %d failed, into %s", len(encoded), len(reused),
             len(failures), out)
    return EncodeResult(out, encoded, reused, failures)


def _ids(case_ids: list[str], most: int = 10) -> str:
    """Up to `most` case ids for a log line, with how many more."""
    more = f" (+{len(case_ids) - most} more)" if len(case_ids) > most else ""
    return f"{case_ids[:most]}{more}"


def _merge(
    index: _Index,
    items: list[dict[str, Any]],
    mine: list[dict[str, Any]],
    encoded: list[str],
    reused: list[str],
    failures: list[Failure],
) -> tuple[list[str], list[str], list[Failure]]:
    """Every rank's outcome; `index.entries` becomes the whole encode's.

    Entries of cases outside `items` are the same on every rank (read before the encode); each
    case of `items` takes the entry of the rank that processed it, or none when it failed.
    """
    log.info("rank %d of %d: encoded %s, reused %s, %d failed", distributed.rank(),
             distributed.world_size(), _ids(encoded), _ids(reused), len(failures))
    ours = {it["case_id"]: index.entries[it["case_id"]] for it in mine
            if it["case_id"] in index.entries}
    entries, encoded, reused, failures = distributed.merge_shards(
        (ours, encoded, reused, failures)
    )
    for item in items:
        index.entries.pop(item["case_id"], None)
    index.entries.update(entries)
    return encoded, reused, failures

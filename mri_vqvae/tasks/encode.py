"""Encode a manifest with a trained autoencoder into a latents folder (`artifacts.latents`).

Resumable without quadratic rewrites: index.json is written once when the encode starts (the
entries still valid from earlier runs) and once at the end; in between, each encoded grid is
appended to ``index.journal`` as one JSON line (flushed and fsynced) after its .npy is written
atomically (both kept by `artifacts.latents.IndexWriter`). A killed encode so loses nothing: a
rerun reads index.json plus the journal (a line cut short by the kill is skipped), keeps each
grid whose file still matches its recorded sha256, encodes only the rest, and folds the journal
into index.json.

Under ``torchrun`` (`mri_vqvae.core.distributed`) the cases are sharded: rank r encodes its
contiguous share and writes only those .npy files (atomically); rank 0 journals its own cases as
it goes, then gathers every rank's entries and failures and writes index.json and failures.csv,
the same documents a single process would write. A kill mid-run loses at most the entries of
other ranks' cases: their grids are re-encoded by the rerun (the sha256 check never trusts a
file that index.json and the journal do not vouch for). With ``--part I/N`` (no torchrun) a
process encodes the share rank I-1 would, journals its entries under ``parts/`` and leaves
index.json alone; ``mri-vqvae merge`` writes it (`merge_encode`, `mri_vqvae.tasks.parts`).

Augmented views (``augment`` N > 0, `mri_vqvae.tasks.views`): each train case is also encoded
as N seeded views. A case is preprocessed once for itself and all its views, which travel with it
(same rank, failed together); each view is its own grid: file, index entry, journal line and
resume check. Val and test cases are never augmented. The header records augment_views,
augment_digest and augment_seed, part of the identity a rerun must match; N = 0 writes exactly
what an encode without views writes.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import Compose

from mri_vqvae.artifacts.latents import (
    DTYPE,
    FAILURES,
    FORMAT,
    FORMAT_VERSION,
    INDEX,
    MAX_CODEBOOK,
    IndexWriter,
    LatentsError,
    npy_bytes,
    previous_entries,
    view_id,
)
from mri_vqvae.artifacts.loading import AutoencoderRun, open_autoencoder_run
from mri_vqvae.core import distributed
from mri_vqvae.core.atomic import atomic_write_bytes
from mri_vqvae.core.device import resolve_device
from mri_vqvae.core.errors import MriVqvaeError, innermost_error, listed
from mri_vqvae.core.outputs import ensure_writable, remove_stale_temps
from mri_vqvae.core.provenance import sha256_file
from mri_vqvae.data.case import Case
from mri_vqvae.data.datasets import case_items, plain_volume
from mri_vqvae.data.manifest import Manifest
from mri_vqvae.data.preprocessed import with_store
from mri_vqvae.data.transforms import IMAGE, build_transforms
from mri_vqvae.models.autoencoders.base import DiscreteAutoencoder
from mri_vqvae.tasks.cases import Failure, run_batch, write_failures
from mri_vqvae.tasks.parts import (
    Merged,
    Part,
    PartJournal,
    finish_part,
    part_lock,
    refuse_distributed,
)
from mri_vqvae.tasks.views import Views, training_views

log = logging.getLogger(__name__)

COMMAND = "encode"


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
    model: DiscreteAutoencoder,
    chain: Compose,
    item: Mapping[str, Any],
    device: torch.device,
    views: Sequence[int] = (0,),
    spec: Views | None = None,
) -> dict[int, np.ndarray]:
    """Preprocess one case item with `chain` once and encode `views` of it (0: the case itself,
    k: its k-th augmented view of `spec`): -> {view: (d, h, w) uint16 code indices}.

    `model` must be in eval mode; `encode_indices` never moves the codebook.
    """
    prepped = chain(dict(item))
    spec = spec or Views()
    grids = {}
    for k in views:
        volume = (plain_volume(prepped[IMAGE]) if k == 0
                  else spec.volume(prepped, str(item["case_id"]), k))  # (1, D, H, W)
        indices = model.encode_indices(volume[None].to(device))[0].cpu()  # (d, h, w) int64
        assert int(indices.max()) < MAX_CODEBOOK and int(indices.min()) >= 0
        grids[k] = indices.numpy().astype(DTYPE)
    return grids


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
    source: AutoencoderRun, manifest: Manifest, manifest_path: str | Path | None, views: Views
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
        **views.header(),
    }


def _source_case(entry: Mapping[str, Any], by_id: Mapping[str, Case]) -> Case | None:
    """The manifest case of an entry (a view's is its source_case), None when unlisted."""
    return by_id.get(str(entry.get("source_case") or entry["case_id"]))


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


def _labels(case: Case) -> dict[str, str]:
    """The manifest labels an entry records (prior classes, see ``prior.label_field``)."""
    return {"modality": case.modality, "source_id": case.source_id}


def _entry(item: Mapping[str, Any], case: Case, view: int, content: bytes) -> dict[str, Any]:
    """The index entry of view `view` of a case item (0: the case itself) whose .npy is
    `content`."""
    gid = view_id(item["case_id"], view)
    entry = {"case_id": gid, "subject_id": item["subject_id"], "split": item["split"],
             "file": f"{gid}.npy", "sha256": hashlib.sha256(content).hexdigest(),
             "source_sha256": item["sha256"], **_labels(case)}
    return {**entry, "view": view, "source_case": item["case_id"]} if view else entry


def encode_manifest(
    vqvae_run: str | Path,
    manifest: Manifest,
    out_dir: str | Path,
    split: str | None = None,
    strict: bool = False,
    device: str | torch.device = "auto",
    manifest_path: str | Path | None = None,
    preprocessed: str | Path | None = None,
    augment: int = 0,
    part: Part | None = None,
    view_overrides: Sequence[str] = (),
) -> EncodeResult:
    """Encode the cases of `split` (all if None) into uint16 grids under `out_dir`.

    The VQ-VAE is ``vqvae_run/checkpoints/best`` (else ``last``) in eval mode; each case goes
    through the deterministic preprocessing chain of the data config stored in that checkpoint,
    or is read from `preprocessed` (a `preprocess` folder of that config; verified). Each train
    case also gives `augment` seeded augmented views (`views.training_views`; `view_overrides`
    change their augmentation). index.json: see
    `mri_vqvae.artifacts.latents`. Resumable: a grid whose entry and file still match is kept,
    not recomputed. A bad case (with its views) is listed in failures.csv and skipped, or raised
    when `strict`. Under DDP each rank encodes its share of the cases, rank 0 writes index.json
    and failures.csv, and every rank returns the result of the whole encode (``encoded`` and
    ``reused`` list grid ids: case_ids and view ids). With `part` only its share is encoded,
    its entries journalled under ``parts/`` (`mri_vqvae.tasks.parts`; `merge_encode` writes
    index.json), and the result is the part's.
    """
    if augment < 0:
        raise LatentsError(f"augment={augment}: the number of views per train case is >= 0")
    refuse_distributed(part)
    out = Path(out_dir)
    source = _open_source(vqvae_run)
    views = training_views(source, augment, view_overrides)
    header = _header(source, manifest, manifest_path, views)
    ensure_writable(out)  # a read-only or full folder is a clear error before any case
    previous = previous_entries(out, header)
    items = case_items(manifest, source.data, split)
    by_id = {c.case_id: c for c in manifest.cases}
    kept = {  # other splits' entries stay while the manifest lists them
        cid: {**e, **_labels(case)} for cid, e in previous.items()
        if _still_listed(e, case := _source_case(e, by_id))
    }
    with contextlib.ExitStack() as stack:
        folder = None if part is None else stack.enter_context(part_lock(out, part))
        index = IndexWriter(out, header, kept) if folder is None else PartJournal(folder, kept)
        distributed.barrier()  # every rank has read the old index.json before rank 0 rewrites it
        dev = resolve_device(device)
        model = source.model.to(dev).eval()  # type: ignore[attr-defined]
        chain = with_store(build_transforms(source.data), preprocessed, source.data)
        encoded: list[str] = []
        reused: list[str] = []

        def grid_ids(item: Mapping[str, Any]) -> dict[int, str]:
            return {k: view_id(item["case_id"], k) for k in views.of(item)}

        def process(item: dict[str, Any]) -> str:
            ids = grid_ids(item)
            todo = [k for k, gid in ids.items()
                    if not _reusable(index.entries.get(gid), item, out)]
            for k in todo:
                index.entries.pop(ids[k], None)
            try:
                grids = encode_item(model, chain, item, dev, todo, views) if todo else {}
            except (MriVqvaeError, OSError, RuntimeError, ValueError) as exc:
                for gid in ids.values():
                    index.entries.pop(gid, None)  # a bad case keeps none of its grids
                raise _case_error(item, exc) from None  # the case error says what the cause was
            for k in todo:
                content = npy_bytes(grids[k])
                atomic_write_bytes(out / f"{ids[k]}.npy", content)
                index.append(_entry(item, by_id[item["case_id"]], k, content))
                encoded.append(ids[k])
            reused.extend(gid for k, gid in ids.items() if k not in todo)
            return str(item["case_id"])

        if isinstance(index, IndexWriter):
            index.write([])
        mine = distributed.shard(items) if part is None else part.take(items)
        try:
            _, failures = run_batch(mine, process, strict=strict, desc="encode", out_dir=out)
        finally:
            index.close()
        if isinstance(index, PartJournal):
            assert folder is not None and part is not None
            ids = {gid for it in items for gid in grid_ids(it).values()}
            outside = {g: e for g, e in kept.items() if g not in ids}
            ours = [index.entries[g] for it in mine for g in grid_ids(it).values()
                    if g in index.entries]
            finish_part(folder, part, COMMAND, {"index": header, "outside": outside}, ours,
                        failures)
        else:
            if distributed.is_distributed():
                encoded, reused, failures = _merge(index, items, mine, grid_ids,
                                                   (encoded, reused, failures))
            index.write([asdict(f) for f in failures])
            if index.main:
                write_failures(out / FAILURES, failures)
    log.info("encoded %d grid(s), reused %d, %d case(s) failed, into %s", len(encoded),
             len(reused), len(failures), out)
    return EncodeResult(out, encoded, reused, failures)


def merge_encode(out: Path, merged: Merged) -> None:
    """index.json and failures.csv of a folder its parts encoded, as one process writes them."""
    remove_stale_temps([out])
    entries = {**merged.header["outside"], **{e["case_id"]: e for e in merged.records}}
    IndexWriter(out, merged.header["index"], entries).write([asdict(f) for f in merged.failures])
    write_failures(out / FAILURES, merged.failures)


def _merge(
    index: IndexWriter,
    items: list[dict[str, Any]],
    mine: list[dict[str, Any]],
    grid_ids: Callable[[Mapping[str, Any]], dict[int, str]],
    outcome: tuple[list[str], list[str], list[Failure]],
) -> tuple[list[str], list[str], list[Failure]]:
    """Every rank's outcome (encoded, reused, failures); `index.entries` becomes the whole
    encode's.

    Entries of cases outside `items` are the same on every rank (read before the encode); each
    grid of a case of `items` takes the entry of the rank that processed the case, or none when
    it failed.
    """
    encoded, reused, failures = outcome
    log.info("rank %d of %d: encoded %s, reused %s, %d failed", distributed.rank(),
             distributed.world_size(), listed(encoded), listed(reused), len(failures))
    ours = {gid: index.entries[gid] for it in mine for gid in grid_ids(it).values()
            if gid in index.entries}
    entries, encoded, reused, failures = distributed.merge_shards(
        (ours, encoded, reused, failures)
    )
    for item in items:
        for gid in grid_ids(item).values():
            index.entries.pop(gid, None)
    index.entries.update(entries)
    return encoded, reused, failures

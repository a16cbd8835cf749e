"""Batch reconstruction of a manifest split with a trained VQ-VAE: NIfTI + metrics, resumable.

On disk (``--out DIR``)::

    reconstruct.json          what made the folder: VQ-VAE checkpoint, weights sha256, data, grid
    images/<case_id>.nii.gz   the reconstruction, clamped to [0, 1] (the preprocessed scale)
    cases/<case_id>.json      the case's sidecar, written last: metrics, sha256 of its image
    metrics.csv               case_id, the metrics of `CASE_METRICS` (whole volume, then
                              foreground), codes_used (an empty cell: not finite, e.g. the PSNR
                              of an exact reconstruction; the JSON files hold null there)
    index.json                every finished case of the selection, with its sidecar's content
    failures.csv              case_id, path, reason
    sub-*/.../anat/*_desc-recon_<suffix>.nii.gz (+ .json), dataset_description.json,
    participants.tsv          with ``bids``: the BIDS-Derivatives view (`mri_vqvae.data.bids`)

Resume: a case is done when its sidecar exists, names the same VQ-VAE weights, grid and source
file sha256, and its image still hashes to the sha256 the sidecar recorded. A rerun skips such a
case before preprocessing it, so no case is ever done twice; anything else is (re)computed. The
image is written before its sidecar, both atomically, so a kill at any moment leaves each case
either finished or to be redone. metrics.csv and index.json are rebuilt from the sidecars at the
end of every run (a killed run's are rebuilt by the rerun).

Under ``torchrun`` (`mri_vqvae.core.distributed`) the sorted cases are sharded: rank r checks and
reconstructs only its contiguous share, writing those images and sidecars (atomically, as above);
rank 0 alone writes reconstruct.json first and, after gathering every rank's finished sidecars
and failures, metrics.csv, index.json and failures.csv: the same tables one process writes.
Resume works the same (a rerun may use another number of processes). ``--part I/N`` does the
share rank I-1 would without torchrun and records it under ``parts/`` (`mri_vqvae.tasks.parts`);
``mri-vqvae merge`` writes the tables (`merge_reconstruct`).

Grids: by default the reconstruction lies on the preprocessed grid (RAS, ``data.spacing``,
``data.spatial_size``). With `native_space` it is resampled onto the input file's own grid and
affine with `mri_vqvae.tasks.likelihood.resample_to_grid` (MONAI ``ResampleToMatch``, bilinear here,
zeros outside what the preprocessing crop kept), the helper `mri-vqvae likelihood --native` uses;
intensities stay on the [0, 1] scale. Metrics are always measured on the preprocessed grid.
With `spatial_size` larger than the training size the chain pads/crops to that box instead and
each case is reconstructed by a sliding window (`mri_vqvae.tasks.sliding`; recorded in
reconstruct.json as ``sliding_window``); at the training size nothing changes.

Test hook: with ``MRI_VQVAE_TEST_KILL_AFTER_CASE=k`` in the environment, the process SIGKILLs
itself right after committing the k-th case it computed (tests of resume use it; never set it
otherwise).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import signal
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mri_vqvae.core import distributed
from mri_vqvae.core.atomic import atomic_write_text
from mri_vqvae.core.device import resolve_device
from mri_vqvae.core.errors import MriVqvaeError, describe_error
from mri_vqvae.core.jsonio import json_ready
from mri_vqvae.core.outputs import (
    OutputError,
    ensure_writable,
    output_cause,
    output_error,
    output_lock,
    remove_stale_temps,
)
from mri_vqvae.core.provenance import sha256_file
from mri_vqvae.data import bids as bids_view
from mri_vqvae.data.case import Case
from mri_vqvae.data.manifest import Manifest
from mri_vqvae.data.writers import write_nifti
from mri_vqvae.metrics.image import CASE_METRICS
from mri_vqvae.metrics.quality import quality_of
from mri_vqvae.tasks.cases import Failure, Prepared, iter_prepared, progress, write_failures
from mri_vqvae.tasks.parts import Merged, Part, finish_part, part_lock, refuse_distributed
from mri_vqvae.tasks.sliding import SlidingWindow, field_of_view, reconstruct_volume

if TYPE_CHECKING:
    from mri_vqvae.artifacts.loading import AutoencoderRun
    from mri_vqvae.config import DataConfig

log = logging.getLogger(__name__)

FORMAT = "mri-vqvae-reconstruction"
FORMAT_VERSION = 1
COMMAND = "reconstruct"
KILL_ENV = "MRI_VQVAE_TEST_KILL_AFTER_CASE"
CSV_COLUMNS = ("case_id", *CASE_METRICS, "codes_used")
_IDENTITY = ("vqvae_sha256", "data", "grid", "sliding_window")


class ReconstructError(MriVqvaeError, ValueError):
    """A case or an output folder that cannot be reconstructed into (says which and why)."""


@dataclass(frozen=True)
class ReconstructResult:
    """What a run did: ``computed`` now, ``reused`` from an earlier run, ``records`` (sidecars)."""

    out_dir: Path
    computed: list[str]
    reused: list[str]
    failures: list[Failure]
    records: dict[str, dict[str, Any]]


def folder_identity(source: AutoencoderRun, native_space: bool) -> dict[str, Any]:
    """reconstruct.json content: what must agree before a rerun may reuse a folder's cases."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "vqvae_run": str(source.run_dir),
        "vqvae_checkpoint": str(Path(source.checkpoint).resolve()),
        "vqvae_sha256": source.weights_sha256,
        "data": source.data.model_dump(mode="json"),
        "grid": "native" if native_space else "preprocessed",
    }


def claim_folder(out: Path, identity: dict[str, Any]) -> None:
    """Check `out` takes writes (`OutputError` if not), then write reconstruct.json or check
    that an existing one was made the same way."""
    ensure_writable(out)
    path = out / "reconstruct.json"
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ReconstructError(f"{path} is unreadable ({exc}); choose another --out") from None
        changed = [k for k in _IDENTITY if old.get(k) != identity.get(k)]
        if changed:
            raise ReconstructError(
                f"{out} already holds reconstructions made differently ({', '.join(changed)} "
                f"differ from this run's): choose another --out or delete that folder"
            )
        return
    atomic_write_text(path, json.dumps(identity, indent=2) + "\n")


def sidecar_path(out: Path, case_id: str) -> Path:
    return out / "cases" / f"{case_id}.json"


def finished_case(out: Path, item: dict[str, Any], identity: dict[str, Any]
                  ) -> dict[str, Any] | None:
    """The sidecar of `item` when the case is done and its image verifies, else None."""
    path = sidecar_path(out, item["case_id"])
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        log.warning("%s is unreadable; the case is redone", path)
        return None
    same = (doc.get("vqvae_sha256") == identity["vqvae_sha256"]
            and doc.get("grid") == identity["grid"] and doc.get("source_sha256") == item["sha256"]
            and set(CASE_METRICS) <= set(doc.get("metrics") or {}))
    image = out / str(doc.get("image", ""))
    if not same or not image.is_file() or sha256_file(image) != doc.get("image_sha256"):
        log.warning("%s does not verify (changed input, model or image, or metrics of an older "
                    "version); the case is redone", path)
        return None
    return doc


@torch.no_grad()
def reconstruct_prepared(model: torch.nn.Module, prepared: Prepared, device: torch.device,
                         window: SlidingWindow | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Reconstruct one preprocessed case: -> ((D, H, W) float32 in [0, 1], its metrics)."""
    assert prepared.volume is not None
    target = torch.from_numpy(prepared.volume)[None, None].to(device)
    recon, indices = reconstruct_volume(model, target, window)
    quality = quality_of(recon.cpu(), target.cpu(), prepared.item, indices)
    return recon[0, 0].cpu().numpy(), asdict(quality)


def _native(prepared: Prepared, recon: np.ndarray, data: DataConfig
            ) -> tuple[np.ndarray, np.ndarray]:
    """`recon` resampled onto the input file's own grid: ((X, Y, Z), (4, 4) affine)."""
    from mri_vqvae.data.io import read_volume
    from mri_vqvae.tasks.likelihood import resample_to_grid

    assert prepared.affine is not None
    item = prepared.item  # the raw file again: confined and verified like the first read
    scan, affine = read_volume(item["image"], data.max_voxels, data.max_shear,
                               min_size=data.min_size, root=item.get("root"),
                               sha256=item.get("sha256"), series_uid=item.get("series_uid"))
    return resample_to_grid(recon, prepared.affine, scan.shape, affine, mode="bilinear"), affine


def commit_case(out: Path, prepared: Prepared, recon: np.ndarray, affine: np.ndarray,
                metrics: dict[str, Any], identity: dict[str, Any], session: str
                ) -> dict[str, Any]:
    """Write the image, then the sidecar that marks the case done; returns the sidecar."""
    item = prepared.item
    rel = f"images/{item['case_id']}.nii.gz"
    write_nifti(out / rel, recon, affine)
    doc = {
        "case_id": item["case_id"],
        "subject_id": item["subject_id"],
        "split": item["split"],
        "source": item["image"],
        "source_sha256": item["sha256"],
        "image": rel,
        "image_sha256": sha256_file(out / rel),
        "grid": identity["grid"],
        "shape": [int(s) for s in recon.shape],
        "affine": np.asarray(affine, dtype=np.float64).tolist(),
        "vqvae_sha256": identity["vqvae_sha256"],
        "session": session,
        "metrics": {k: v for k, v in metrics.items() if k not in ("case_id", "subject_id",
                                                                  "split")},
    }
    doc = json_ready(doc)  # the same values a rerun reads back from the sidecar
    atomic_write_text(sidecar_path(out, item["case_id"]), json.dumps(doc, indent=2) + "\n")
    return doc


def write_tables(out: Path, records: dict[str, dict[str, Any]], identity: dict[str, Any],
                 failures: list[Failure]) -> None:
    """metrics.csv, index.json and failures.csv from the finished cases' sidecars."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(CSV_COLUMNS)
    for cid in sorted(records):
        m = records[cid]["metrics"]
        writer.writerow([cid, *("" if m[k] is None else m[k] for k in CSV_COLUMNS[1:])])
    atomic_write_text(out / "metrics.csv", buf.getvalue())
    index = {**identity, "cases": [records[c] for c in sorted(records)],
             "failures": [asdict(f) for f in failures]}
    atomic_write_text(out / "index.json", json.dumps(json_ready(index), indent=2) + "\n")
    write_failures(out / "failures.csv", failures)
    bids_view.write_participants(out)


def publish_case(out: Path, case: Case, doc: dict[str, Any], name: bids_view.BidsName) -> None:
    """The case's BIDS name (a link to its image) and a sidecar holding its record."""
    sidecar = {"CaseID": case.case_id, **bids_view.case_fields(case), "Split": case.split,
               "Description": f"VQ-VAE reconstruction on the {doc['grid']} grid, [0, 1]",
               "Image": doc["image"], "mri_vqvae": doc}
    bids_view.publish(out, name, out / doc["image"], sidecar)


def _kill_after() -> int | None:
    raw = os.environ.get(KILL_ENV)
    return int(raw) if raw else None


def merge_reconstruct(out: Path, merged: Merged) -> None:
    """The tables of a folder its parts reconstructed, as one process writes them."""
    remove_stale_temps([out, out / "images", out / "cases", *bids_view.view_folders(out)])
    write_tables(out, {r["case_id"]: r for r in merged.records}, merged.header, merged.failures)


@contextlib.contextmanager
def _lock_on_main(out: Path) -> Iterator[None]:
    """Rank 0 holds `output_lock(out)` for the run and clears a killed run's temp files first;
    its refusal (another run writes there, not writable) is raised on every rank."""
    with contextlib.ExitStack() as stack:
        error: OutputError | None = None
        if distributed.is_main():
            try:
                stack.enter_context(output_lock(out))
                remove_stale_temps([out, out / "images", out / "cases",
                                    *bids_view.view_folders(out)])
            except OutputError as exc:
                error = exc
        error = distributed.broadcast_object(error)
        if error is not None:
            raise error
        yield


def reconstruct_manifest(
    vqvae_run: str | Path,
    manifest: Manifest,
    out_dir: str | Path,
    split: str | None = None,
    native_space: bool = False,
    strict: bool = False,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    threads: int | None = None,
    preprocessed: str | Path | None = None,
    part: Part | None = None,
    bids: bool = False,
    spatial_size: tuple[int, int, int] | None = None,
    overlap: float = 0.5,
) -> ReconstructResult:
    """Reconstruct every case of `split` (all if None) into `out_dir` (see the module doc).

    The VQ-VAE is the run's checkpoints/best (else last) in eval mode; each case goes through the
    deterministic chain of its training data config, in `num_workers` worker processes. A bad
    case goes to failures.csv, or raises `ReconstructError` at once when `strict`. `threads` sets
    torch's CPU threads for the run (None: torch's default). Under torchrun each rank does its
    share of the cases and every rank returns the result of the whole run. `OutputError` comes
    first when `out_dir` is not writable or another run holds its lock (``out_dir/.lock``).
    With `part` only its share is done, and recorded under ``parts/`` instead of the tables
    (`mri_vqvae.tasks.parts`; `merge_reconstruct` writes them). With `bids` each case also
    gets its BIDS name (`publish_case`). `spatial_size` / `overlap`: a larger field of view
    and its sliding window's overlap (`mri_vqvae.tasks.sliding`; `SlidingWindowError` if bad).
    """
    from mri_vqvae.artifacts.loading import open_autoencoder_run
    from mri_vqvae.config import config_digest
    from mri_vqvae.core.device import cpu_threads
    from mri_vqvae.data.datasets import case_items

    refuse_distributed(part)
    out = Path(out_dir)
    with _lock_on_main(out) if part is None else part_lock(out, part) as held:
        source = open_autoencoder_run(vqvae_run)
        data, window = field_of_view(source.data, spatial_size, overlap)
        source = replace(source, data=data)  # the chain pads/crops to the field of view
        identity = folder_identity(source, native_space)
        if window is not None:
            identity["sliding_window"] = window.as_dict()
        bids = bids or bids_view.has_view(out)  # a view there is kept in step (every rank)
        _claim_on_main(out, identity, bids, bids_view.dataset_description(
            COMMAND, config_digest(source.data), manifest.name, manifest.digest,
            {"VQ-VAE": source.weights_sha256}))
        names = bids_view.case_names(manifest.cases, "recon") if bids else {}
        cases = {c.case_id: c for c in manifest.cases}
        dev = resolve_device(device)
        model = source.model.to(dev).eval()
        items = case_items(manifest, source.data, split)
        mine = distributed.shard(items) if part is None else part.take(items)
        records: dict[str, dict[str, Any]] = {}
        for item in mine:
            doc = finished_case(out, item, identity)
            if doc is not None:
                records[item["case_id"]] = doc
                if bids:
                    publish_case(out, cases[item["case_id"]], doc, names[item["case_id"]])
        reused = sorted(records)
        todo = [item for item in mine if item["case_id"] not in records]
        computed: list[str] = []
        failures: list[Failure] = []
        stopped: str | None = None  # the reason of the case that stopped a strict run
        session = uuid.uuid4().hex
        kill_after = _kill_after()
        bar = progress(len(mine), "reconstruct")
        bar.skip(len(reused))
        with bar, cpu_threads(dev, threads):
            for prepared in iter_prepared(todo, source.data, num_workers, preprocessed):
                item = prepared.item
                try:
                    if prepared.error is not None:
                        raise ReconstructError(prepared.error)
                    recon, metrics = reconstruct_prepared(model, prepared, dev, window)
                    affine = prepared.affine
                    if native_space:
                        recon, affine = _native(prepared, recon, source.data)
                    assert affine is not None
                    doc = commit_case(out, prepared, recon, affine, metrics, identity, session)
                    if bids:
                        publish_case(out, cases[item["case_id"]], doc, names[item["case_id"]])
                except (MriVqvaeError, OSError, RuntimeError, ValueError) as exc:
                    cause = output_cause(exc, out)  # a full or read-only --out fails the run
                    if cause is not None:
                        raise output_error(out, cause) from exc
                    reason = describe_error(exc)
                    failures.append(Failure(item["case_id"], item["image"], reason))
                    if strict:
                        stopped = f"case {item['case_id']} ({item['image']}): {reason}"
                        break
                    log.warning("skipping %s: %s", item["case_id"], reason)
                    bar.update(1)
                    continue
                records[item["case_id"]] = doc
                computed.append(item["case_id"])
                bar.update(1)
                if kill_after is not None and len(computed) >= kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)
        if distributed.is_distributed():  # every rank's outcome, in case order (contiguous shards)
            log.info("rank %d of %d: reconstructed %s, reused %s, %d failed", distributed.rank(),
                     distributed.world_size(), computed, reused, len(failures))
            records, computed, reused, failures, stopped = distributed.merge_shards(
                (records, computed, reused, failures, stopped))
            reused = sorted(reused)
        if part is not None and stopped is None:
            finish_part(held, part, COMMAND, identity,
                        [records[i["case_id"]] for i in mine if i["case_id"] in records], failures)
        elif part is None and distributed.is_main():
            write_tables(out, records, identity, failures)
        distributed.barrier()  # the tables are written before any rank returns
        if stopped is not None:
            raise ReconstructError(stopped)
        log.info("reconstructed %d case(s), reused %d, %d failed, into %s", len(computed),
                 len(reused), len(failures), out)
        return ReconstructResult(out, computed, reused, failures, records)


def _claim_on_main(out: Path, identity: dict[str, Any], bids: bool,
                   description: dict[str, Any]) -> None:
    """`claim_folder` and `bids_view.start_view` on rank 0; a refusal is raised on every rank."""
    error: MriVqvaeError | None = None
    if distributed.is_main():
        try:
            claim_folder(out, identity)
            bids_view.start_view(out, bids, description)
        except (ReconstructError, OutputError, bids_view.BidsError) as exc:
            error = exc
    error = distributed.broadcast_object(error)
    if error is not None:
        raise error


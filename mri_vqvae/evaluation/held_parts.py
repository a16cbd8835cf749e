"""``evaluate --part I/N``: a part's share of the held-out pass on disk, and the parts read back.

A part evaluates the contiguous share of the sorted held-out cases that rank I-1 of N would
take (`mri_vqvae.tasks.parts`) and `record_part` stores it under ``OUT/parts/<I>-of-<N>/``::

    arrays/<case_id>.npz   what the held-out pass keeps of an evaluated case (`save_held`)
    part.json              written last: the header (`part_header`), one record per evaluated
                           case (its metrics, bits and npz) and the part's failures

and nothing else: no metrics.json, tables or report. The final run, the same evaluate command
without ``--part`` into the same OUT, reads them back with `finished_parts` (every part
finished, made by evaluate with the final run's own header, covering the held-out cases once)
instead of evaluating those cases again: `load_held` returns the `HeldOut` one process
computes, bit for bit, and the final run removes ``parts/`` once its files are written.
``mri-vqvae merge`` refuses these parts: the rest of an evaluation needs the models.
"""

from __future__ import annotations

import contextlib
import io
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mri_vqvae.core import distributed
from mri_vqvae.core.atomic import atomic_write_bytes
from mri_vqvae.core.errors import EvaluationError, MriVqvaeError
from mri_vqvae.evaluation.passes import CaseView, HeldOut, LesionCase
from mri_vqvae.metrics.quality import CaseQuality
from mri_vqvae.tasks.cases import Failure
from mri_vqvae.tasks.parts import PARTS, Merged, Part, PartError, finish_part, merge_parts

if TYPE_CHECKING:
    from mri_vqvae.artifacts.loading import AutoencoderRun, PriorRun
    from mri_vqvae.data.manifest import Manifest

COMMAND = "evaluate"
ARRAYS = "arrays"


@dataclass(frozen=True)
class PartResult:
    """What ``evaluate --part`` recorded: its folder, the cases it evaluated, its failures."""

    folder: Path
    evaluated: list[str]
    failures: list[Failure]


def part_header(source: AutoencoderRun, prior: PriorRun | None, manifest: Manifest, split: str,
                report_cases: int) -> dict[str, Any]:
    """What decides the per-case records, so every part and the final run must share it: the
    weights, the manifest, the split, the data config and how many report views are kept."""
    return {
        "vqvae_sha256": source.weights_sha256,
        "prior_sha256": None if prior is None else prior.sha256s["prior"],
        "manifest_digest": manifest.digest,
        "split": split,
        "data": source.data.model_dump(mode="json"),
        "report_cases": report_cases,
    }


def save_held(held: HeldOut, out: Path, folder: Path) -> list[dict[str, Any]]:
    """Store `held` (one share of the cases) under `folder`; returns one record per evaluated case.

    A record (JSON-ready, case order) holds the case's `CaseQuality` fields, its bits (None
    without a prior) and ``arrays``, the path relative to `out` of ``folder/arrays/<case>.npz``:
    ``volume`` (D, H, W), ``indices`` (d, h, w), ``features`` (F,); for a report view also
    ``reconstruction`` (D, H, W) and ``bits_map`` (D, H, W, when the view has one); for a
    lesion case ``lesion`` (D, H, W) bool and ``latent_bits`` (d, h, w, when there is a map).
    """
    shutil.rmtree(folder / ARRAYS, ignore_errors=True)  # an earlier try's
    lesions = {les.case_id: les for les in held.lesions}
    records = []
    for i, case in enumerate(held.cases):
        arrays = {"volume": held.volumes[i], "indices": held.indices[i].numpy(),
                  "features": held.features[i]}
        if i < len(held.views):  # the views are those of the first cases
            arrays["reconstruction"] = held.views[i].reconstruction
            if held.views[i].bits_map is not None:
                arrays["bits_map"] = held.views[i].bits_map
        lesion = lesions.get(case.case_id)
        if lesion is not None:
            arrays["lesion"] = lesion.lesion
            if lesion.latent_bits is not None:
                arrays["latent_bits"] = lesion.latent_bits
        path = folder / ARRAYS / f"{case.case_id}.npz"
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        atomic_write_bytes(path, buf.getvalue())
        records.append({"case_id": case.case_id, "quality": asdict(case),
                        "bits": held.bits[i] if held.bits else None,
                        "arrays": path.relative_to(out).as_posix()})
    return records


def load_held(out: Path, records: list[dict[str, Any]], failures: list[Failure]) -> HeldOut:
    """The `HeldOut` of `records` written by `save_held` (their paths relative to `out`), in
    their order; views and lesions come back where they were stored."""
    held = HeldOut(failures=list(failures))
    for record in records:
        quality = CaseQuality(**record["quality"])
        with np.load(out / record["arrays"], allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
        held.cases.append(quality)
        held.volumes.append(arrays["volume"])
        held.indices.append(torch.from_numpy(arrays["indices"]))
        held.features.append(arrays["features"])
        if record["bits"] is not None:
            held.bits.append(float(record["bits"]))
        if "reconstruction" in arrays:
            held.views.append(CaseView(quality, arrays["volume"], arrays["reconstruction"],
                                       arrays.get("bits_map"), record["bits"]))
        if "lesion" in arrays:
            held.lesions.append(LesionCase(quality.case_id, arrays["lesion"], held.indices[-1],
                                           arrays.get("latent_bits")))
    return held


def record_part(out: Path, folder: Path, part: Part, header: dict[str, Any],
                held: HeldOut) -> PartResult:
    """Store part `part`'s `held` in `folder` (held by `part_lock`) and end it (part.json)."""
    records = save_held(held, out, folder)
    finish_part(folder, part, COMMAND, header, records, held.failures)
    return PartResult(folder, [c.case_id for c in held.cases], held.failures)


@contextlib.contextmanager
def finished_parts(out: Path, header: dict[str, Any], case_ids: list[str], report_cases: int,
                   strict: bool) -> Iterator[HeldOut | None]:
    """The held-out pass the parts in ``out/parts/`` recorded (None when there is no parts/),
    read by rank 0 and shared, while rank 0 holds the folder's and every part's lock.

    `PartError` (on every rank) when a part runs or has not finished, or the parts are of
    another command, were made with another `header` or do not cover `case_ids` once; with
    `strict`, the `EvaluationError` one process raises at the first failed case.
    """
    with contextlib.ExitStack() as stack:
        found: HeldOut | MriVqvaeError | None = None
        if distributed.is_main() and (out / PARTS).is_dir():
            try:
                merged = stack.enter_context(merge_parts(out))
                _check(out, merged, header, case_ids)
                if strict and merged.failures:
                    first = merged.failures[0]  # the first in case order, where one run stops
                    raise EvaluationError(f"case {first.case_id} ({first.path}): {first.reason}")
                found = load_held(out, merged.records, merged.failures)
                found.views = found.views[:report_cases]  # each part kept its first views
            except MriVqvaeError as exc:
                found = exc
        found = distributed.broadcast_object(found)
        if isinstance(found, MriVqvaeError):
            raise found
        yield found


def _check(out: Path, merged: Merged, header: dict[str, Any], case_ids: list[str]) -> None:
    """`PartError` unless `merged` are evaluate parts with `header` covering `case_ids`."""
    if merged.command != COMMAND:
        raise PartError(f"{out / PARTS} holds parts of `{merged.command}`, not of evaluate: "
                        f"merge them (mri-vqvae merge {out}) or evaluate into another --out")
    differ = sorted(k for k in header.keys() | merged.header.keys()
                    if header.get(k) != merged.header.get(k))
    if differ:
        raise PartError(f"the evaluate parts in {out / PARTS} were made with another "
                        f"{', '.join(differ)} than this run: run this command with the "
                        "arguments the parts used, or rerun every part with this command's "
                        "arguments and --part I/N")
    done = [r["case_id"] for r in merged.records] + [f.case_id for f in merged.failures]
    if sorted(done) != sorted(case_ids):
        raise PartError(f"the evaluate parts in {out / PARTS} do not cover the held-out cases "
                        "once each: rerun every part")

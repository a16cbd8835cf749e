"""The held-out guard: evaluate only a held-out split of the manifest a run was trained on.

`check_held_out` refuses the train split (or an unknown one), a run that recorded no manifest
digest or another manifest's, an empty split, and held-out subjects that also have training
cases; it returns what it checked (JSON-ready, for metrics.json). Works on manifests and run
folders only (no volumes, no torch).

Another manifest is accepted in one case: the run folder holds its own copy of its training
manifest (``manifest.json``, whose digest is the recorded one), and the evaluated split is the
same in both (the same cases with the same sha256) with none of its subjects in the copy's
train split. That is a kit rebuilt on another CPU, whose augmented training copies differ in
their bytes while the real scans do not: the held-out scans are then exactly those the run was
tested on.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mri_vqvae.core.errors import EvaluationError, ManifestError
from mri_vqvae.data.manifest import Manifest, load_manifest

HELD_OUT_SPLITS = ("val", "test")


def recorded_manifest_digests(run_dir: Path, extra: Mapping[str, Any]) -> dict[str, str]:
    """Manifest digests a VQ-VAE run recorded: ``run.json`` and the checkpoint's extra."""
    found: dict[str, str] = {}
    run_json = run_dir / "run.json"
    if run_json.is_file():
        try:
            doc = json.loads(run_json.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            doc = {}
        if isinstance(doc, dict) and doc.get("manifest_digest"):
            found[str(run_json)] = str(doc["manifest_digest"])
    if extra.get("manifest_digest"):
        found["checkpoint extra.manifest_digest"] = str(extra["manifest_digest"])
    return found


def training_manifest_copy(run_dir: Path) -> Manifest | None:
    """The run folder's copy of its training manifest (``manifest.json``), or None when it has
    none that loads (its files are not needed, only its cases and splits)."""
    path = run_dir / "manifest.json"
    if not path.is_file():
        return None
    try:
        return load_manifest(path, check_files=False)
    except (ManifestError, OSError, ValueError):
        return None


def _split_differences(manifest: Manifest, copy: Manifest, split: str) -> list[str]:
    """Why `split` of `manifest` is not the run's held-out `split` of `copy` ([] when it is)."""
    mine = {c.case_id: c.sha256 for c in manifest.cases if c.split == split}
    theirs = {c.case_id: c.sha256 for c in copy.cases if c.split == split}
    problems = [f"case {cid!r} is not in the run's {split} split"
                for cid in sorted(set(mine) - set(theirs))]
    problems += [f"case {cid!r} of the run's {split} split is missing"
                 for cid in sorted(set(theirs) - set(mine))]
    problems += [f"case {cid!r} has other bytes (sha256) than the run's"
                 for cid in sorted(set(mine) & set(theirs)) if mine[cid] != theirs[cid]]
    held = {c.subject_id for c in manifest.cases if c.split == split}
    trained = sorted(held & {c.subject_id for c in copy.cases if c.split == "train"})
    problems += [f"subject {sid!r} trained the run" for sid in trained]
    return problems


def _refuse_unless_the_copy_vouches(manifest: Manifest, split: str, recorded: Mapping[str, str],
                                    wrong: Mapping[str, str], run_label: str,
                                    copy: Manifest | None) -> None:
    """Raise `EvaluationError` unless `copy` is the recorded manifest with the same `split`."""
    vouched = copy is not None and all(copy.matches(d) for d in recorded.values())
    differences = _split_differences(manifest, copy, split) if copy and vouched else []
    if vouched and not differences:
        return
    where, digest = next(iter(wrong.items()))
    why = f" (against the run's manifest.json: {differences[0]})" if differences else ""
    raise EvaluationError(
        f"manifest {manifest.name!r} has digest {manifest.digest[:16]}..., but {run_label} was "
        f"trained on a manifest with digest {digest[:16]}... ({where}); the held-out cases "
        f"cannot be trusted{why}: pass the exact manifest the run used (a copy is in the run "
        "folder as manifest.json)"
    )


def refuse_split(split: str) -> None:
    """Raise `EvaluationError` unless `split` is a held-out split (val or test)."""
    if split == "train":
        raise EvaluationError(
            "refusing to evaluate on the train split: its cases trained the model, so the "
            "numbers would not measure generalisation; pass --split test (or val)"
        )
    if split not in HELD_OUT_SPLITS:
        raise EvaluationError(f"unknown split {split!r}; use one of {list(HELD_OUT_SPLITS)}")


def check_held_out(manifest: Manifest, split: str, recorded: Mapping[str, str],
                   run_label: str, copy: Manifest | None = None) -> dict[str, Any]:
    """Refuse anything but a held-out split of the manifest the run was trained on.

    Raises `EvaluationError` when `split` is ``train`` (or unknown), when the run recorded no
    manifest digest or one that `Manifest.matches` refuses (another manifest; lesion masks
    recorded since are allowed) unless `copy` (`training_manifest_copy`, digest recorded) has
    the same `split` (module doc), when the split is empty, or when a held-out subject also has
    training cases. Returns what was checked (JSON-ready).
    """
    refuse_split(split)
    if not recorded:
        raise EvaluationError(
            f"{run_label} records no manifest digest (run.json manifest_digest or checkpoint "
            "extra.manifest_digest), so it cannot be checked that the evaluated cases were held "
            "out; evaluate a run made by `mri-vqvae train-vqvae`"
        )
    wrong = {where: d for where, d in recorded.items() if not manifest.matches(d)}
    if wrong:
        _refuse_unless_the_copy_vouches(manifest, split, recorded, wrong, run_label, copy)
    held = {c.subject_id for c in manifest.cases if c.split == split}
    train = {c.subject_id for c in manifest.cases if c.split == "train"}
    if not held:
        raise EvaluationError(f"manifest {manifest.name!r} has no case in split {split!r}")
    overlap = sorted(held & train)
    if overlap:
        raise EvaluationError(
            f"subjects {overlap[:5]} of split {split!r} also have training cases in manifest "
            f"{manifest.name!r}: they are not held out; re-split the manifest by subject and "
            "retrain, or evaluate on a split whose subjects the model never saw"
        )
    return {"split": split, "manifest_digest": manifest.digest,
            "digest_sources": sorted(recorded), "held_out_subjects": len(held),
            "train_subjects": len(train), "subject_overlap": 0,
            "matched_by": "the run's manifest.json, same split" if wrong else "digest"}

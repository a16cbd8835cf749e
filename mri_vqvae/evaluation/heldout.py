"""The held-out guard: evaluate only a held-out split of the manifest a run was trained on.

`check_held_out` refuses the train split (or an unknown one), a run that recorded no manifest
digest or another manifest's, an empty split, and held-out subjects that also have training
cases; it returns what it checked (JSON-ready, for metrics.json). Works on manifests and run
folders only (no volumes, no torch).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mri_vqvae.core.errors import EvaluationError
from mri_vqvae.data.manifest import Manifest

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
                   run_label: str) -> dict[str, Any]:
    """Refuse anything but a held-out split of the manifest the run was trained on.

    Raises `EvaluationError` when `split` is ``train`` (or unknown), when the run recorded no
    manifest digest or one that `Manifest.matches` refuses (another manifest; lesion masks
    recorded since are allowed), when the split is empty, or
    when a held-out subject also has training cases. Returns what was checked (JSON-ready).
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
        where, digest = next(iter(wrong.items()))
        raise EvaluationError(
            f"manifest {manifest.name!r} has digest {manifest.digest[:16]}..., but {run_label} was "
            f"trained on a manifest with digest {digest[:16]}... ({where}); the splits may "
            "differ, so held-out cases cannot be trusted: pass the exact manifest the run used "
            "(a copy is in the run folder as manifest.json)"
        )
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
            "train_subjects": len(train), "subject_overlap": 0}

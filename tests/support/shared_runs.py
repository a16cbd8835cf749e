"""A VQ-VAE run and a prior run over it, as the API, export and docs/api.md tests use them:
the runs of `tests.support.runs` plus the run files a shared model is described from."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from mri_vqvae.data.manifest import load_manifest, write_manifest
from tests.support.runs import make_manifest, make_prior_run, make_vqvae_run
from tests.support.volumes import make_head, write_nifti

TRAIN_SOURCES = ("nilearn-mni152", "mricron-ch2", "nilearn-mni152")
"""Catalog sources given to the train cases (tr0, tr1, tr2) of the runs' manifest copy."""


@dataclass(frozen=True)
class SharedRuns:
    """``root/runs/{vqvae,prior}/<run>`` (best checkpoints, manifest.json copy in the VQ-VAE run)
    and ``scan``, a head the training chain takes."""

    root: Path
    vqvae: Path
    prior: Path
    scan: Path


def make_shared_runs(root: Path) -> SharedRuns:
    manifest, _ = make_manifest(root)
    sources = iter(TRAIN_SOURCES)
    cases = tuple(dataclasses.replace(c, source_id=next(sources)) if c.split == "train" else c
                  for c in manifest.cases)
    manifest = dataclasses.replace(manifest, cases=cases)
    vqvae = make_vqvae_run(root / "runs", manifest.digest)
    write_manifest(manifest, vqvae / "manifest.json")
    assert load_manifest(vqvae / "manifest.json").digest == manifest.digest
    prior = make_prior_run(root / "runs", vqvae, manifest.digest)
    scan = write_nifti(root / "scan.nii.gz", make_head(seed=99))
    return SharedRuns(root, vqvae, prior, scan)

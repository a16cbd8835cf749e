"""Merging manifests into one: paths rewritten under the common data root, provenance kept.

Stdlib only.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from mri_vqvae.core.errors import ManifestError
from mri_vqvae.data import checks
from mri_vqvae.data.case import Case
from mri_vqvae.data.manifest import Manifest

log = logging.getLogger(__name__)


def _common_root(roots: Sequence[Path]) -> Path:
    try:
        common = Path(os.path.commonpath([str(r) for r in roots]))
    except ValueError as exc:
        raise ManifestError(
            f"data roots {[str(r) for r in roots]} share no common folder ({exc}); move the "
            "data under one folder and rebuild the manifests"
        ) from None
    if common == Path(common.anchor):
        log.warning("merged data roots only share the filesystem root %s", common)
    return common


def merge_manifests(manifests: Sequence[Manifest], name: str, notes: str = "") -> Manifest:
    """Collate manifests into one (paths rewritten under the common data root).

    Provenance (source_id, origin, derived_from) is kept. Refuses a case_id in two inputs and a
    subject_id whose cases would sit in two splits. The split seed and fractions are kept when
    every input shares them (else None); `notes` defaults to the inputs' notes joined.
    """
    if not manifests:
        raise ManifestError("merge: give at least one manifest")
    root = _common_root([m.data_root for m in manifests])
    owner: dict[str, str] = {}
    cases: list[Case] = []
    for m in manifests:
        prefix = PurePosixPath(m.data_root.relative_to(root).as_posix())
        for c in m.cases:
            if c.case_id in owner:
                raise ManifestError(
                    f"merge: case_id {c.case_id!r} is in both {owner[c.case_id]!r} and "
                    f"{m.name!r}; rename the case in one source (case ids must be unique)"
                )
            owner[c.case_id] = m.name
            cases.append(dataclasses.replace(c, path=str(prefix / c.path)))
    leaks = checks.leak_problems(cases)
    if leaks:
        raise ManifestError(f"merge {name!r}: {leaks[0]}; re-split one input so the subject's "
                            "cases share a split, or merge unsplit manifests and split after")
    for p in checks.duplicate_content(cases):
        log.warning("merge %s: %s", name, p)
    seeds = {m.split_seed for m in manifests}
    fracs = [m.split_fractions for m in manifests]
    same = all(f == fracs[0] for f in fracs)
    joined = notes or " | ".join(f"{m.name}: {m.notes}" for m in manifests if m.notes)
    return Manifest(name, tuple(cases), seeds.pop() if len(seeds) == 1 else None,
                    fracs[0] if same else None, root, joined)

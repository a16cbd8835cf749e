"""Train / val / test splits by subject, never by file, reproducible from a seed.

Subjects are sorted, then shuffled with ``random.Random(seed)``; derived cases follow the case
they were derived from. A manifest whose every case has a split is frozen: re-splitting it
needs ``force=True``. Stdlib only.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections import Counter
from collections.abc import Iterable, Mapping

from mri_vqvae.core.errors import ManifestError
from mri_vqvae.data import schema
from mri_vqvae.data.case import SPLITS, Case
from mri_vqvae.data.manifest import Manifest

DEFAULT_FRACTIONS: Mapping[str, float] = {"train": 0.8, "val": 0.1, "test": 0.1}


def _check_fractions(fractions: Mapping[str, float]) -> dict[str, float]:
    bad = sorted(set(fractions) - set(SPLITS))
    if bad:
        raise ManifestError(f"split fractions: unknown split {bad[0]!r}; use {list(SPLITS)}")
    out = {s: float(fractions.get(s, 0.0)) for s in SPLITS}
    total = sum(out.values())
    if any(not math.isfinite(v) or v < 0 for v in out.values()) or abs(total - 1) > 1e-6:
        raise ManifestError(f"split fractions must be >= 0 and sum to 1, got {dict(fractions)}")
    return {s: v / total for s, v in out.items()}


def _split_counts(n: int, fractions: Mapping[str, float]) -> dict[str, int]:
    """Largest-remainder counts; with >= 3 subjects each split with a fraction > 0 gets one."""
    raw = {s: n * fractions[s] for s in SPLITS}
    counts = {s: int(raw[s]) for s in SPLITS}
    for s in sorted(SPLITS, key=lambda s: counts[s] - raw[s])[: n - sum(counts.values())]:
        counts[s] += 1
    if n >= 3:
        for s in ("val", "test"):
            if fractions[s] > 0 and counts[s] == 0:
                donor = max(SPLITS, key=lambda d: counts[d])
                counts[donor] -= 1
                counts[s] += 1
    return counts


def _split_unit(case: Case, by_id: Mapping[str, Case]) -> str:
    """The subject of the case's oldest ancestor: derived cases follow their source."""
    seen = {case.case_id}
    while case.derived_from in by_id and case.derived_from not in seen:
        case = by_id[case.derived_from]
        seen.add(case.case_id)
    return case.subject_id


def _balance(need: dict[str, int], total: int) -> None:
    """Make the counts add up to `total`: train absorbs the difference first."""
    diff = total - sum(need.values())
    for s in SPLITS:
        step = diff if diff > 0 else max(diff, -need[s])
        need[s] += step
        diff -= step
        if diff == 0:
            return


def assign_splits(
    cases: Iterable[Case],
    fractions: Mapping[str, float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    fixed: Mapping[str, str] | None = None,
) -> list[Case]:
    """Assign train/val/test by subject: sorted subject ids, then ``random.Random(seed)`` shuffle.

    `fixed` maps subject_id -> split and wins. Derived cases land with their source case. Counts
    use the fractions over all subjects (largest remainder); with >= 3 subjects, val and test
    get at least one subject each when their fraction is > 0.
    """
    cases = list(cases)
    fractions = _check_fractions(fractions)
    fixed = dict(fixed or {})
    for subject, split in fixed.items():
        schema.choice(split, f"fixed split of subject {subject!r}", SPLITS)
    by_id = {c.case_id: c for c in cases}
    units = {c.case_id: _split_unit(c, by_id) for c in cases}
    subjects = sorted(set(units.values()))
    free = [s for s in subjects if s not in fixed]
    random.Random(seed).shuffle(free)
    targets = _split_counts(len(subjects), fractions)
    fixed_counts = Counter(fixed[s] for s in subjects if s in fixed)
    need = {s: max(0, targets[s] - fixed_counts[s]) for s in SPLITS}
    _balance(need, len(free))
    order = [s for s in SPLITS for _ in range(need[s])]
    chosen = dict(zip(free, order, strict=True)) | {s: fixed[s] for s in subjects if s in fixed}
    return [dataclasses.replace(c, split=chosen[units[c.case_id]]) for c in cases]


def split_manifest(
    manifest: Manifest,
    fractions: Mapping[str, float] | None = None,
    seed: int | None = None,
    fixed: Mapping[str, str] | None = None,
    force: bool = False,
) -> Manifest:
    """(Re)assign splits. A frozen manifest (every case split) raises unless `force`.

    Without `force`, subjects that already have a split keep it; only new subjects are assigned.
    """
    if manifest.frozen and not force:
        raise ManifestError(
            f"manifest {manifest.name!r}: splits are frozen (every case has one); re-splitting "
            "changes which subjects are held out: pass force=True (CLI: --force) to do it anyway"
        )
    fractions = fractions or manifest.split_fractions or DEFAULT_FRACTIONS
    seed = (manifest.split_seed or 0) if seed is None else seed
    keep = {} if force else {c.subject_id: c.split for c in manifest.cases if c.split}
    cases = assign_splits(manifest.cases, fractions, seed, {**keep, **(fixed or {})})
    return dataclasses.replace(manifest, cases=tuple(cases), split_seed=seed,
                               split_fractions=_check_fractions(fractions))

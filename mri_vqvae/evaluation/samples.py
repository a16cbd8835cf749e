"""Samples drawn for an evaluation, measured against the held-out scans.

`draw_and_measure` writes ``num_samples`` samples into ``out/samples/`` with
`mri_vqvae.tasks.sample.sample_volumes` (a conditional prior draws its classes in turn) and uses
the volumes it decoded, clipped to [0, 1]: diversity (mean pairwise MS-SSIM, also of as many
held-out scans), the MMD between VQ-VAE encoder features of samples and held-out scans, and a
montage of the samples beside as many held-out scans (``figures/samples_vs_held_out.png``).

`plausibility_block` runs the anatomical checks of `mri_vqvae.metrics.plausibility` on every
sample and every held-out scan, against a reference brain (the mean of the training scans the
evaluation read) and the pooled held-out intensities, and says how many samples fall inside the
range of the real scans (leave-one-out for the real scans themselves).
"""

from __future__ import annotations

import csv
import io
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mri_vqvae.core.atomic import atomic_write_text
from mri_vqvae.evaluation.passes import HeldOut
from mri_vqvae.evaluation.report.figures import paired_montage
from mri_vqvae.metrics.plausibility import (
    RegistrationSettings,
    fine_structure,
    foreground_fraction,
    head_overlap,
    inner_detail,
    inner_head,
    inner_structure_correlation,
    inside_fraction,
    intensity_histogram,
    largest_component_fraction,
    leave_one_out_inside,
    mirror_symmetry,
    others_range,
    real_range,
    reference_correlation,
    register_rigid,
    wasserstein1,
)
from mri_vqvae.metrics.quality import FOREGROUND
from mri_vqvae.metrics.sets import (
    FEATURE_GRID,
    gaussian_mmd2,
    mean_pairwise_ms_ssim,
    pooled_features,
)
from mri_vqvae.tasks.sample import SampleSettings, class_labels, sample_volumes

if TYPE_CHECKING:
    from mri_vqvae.artifacts.loading import PriorRun
    from mri_vqvae.models.autoencoders.vqvae.model import VQVAE

NOT_FID = (
    "MMD between VQ-VAE encoder features (z_e average-pooled to 2x2x2) of samples and held-out "
    "scans. This is NOT an FID: no pretrained feature network is available offline, and the "
    "features come from the model under test, so it is only comparable between runs that share "
    "the VQ-VAE."
)

MONTAGE = Path("figures") / "samples_vs_held_out.png"
CHECKS = {
    "reference_r": "Pearson r with the reference brain inside its head (reference > "
                   "foreground), after rigid registration to it",
    "inner_structure_r": "Pearson r of fine structure (volume minus its Gaussian blur, sigma 2 "
                         "voxels) with the reference's, deep inside the reference's head "
                         "(beyond 35 % of its largest depth), after rigid registration: internal "
                         "anatomy, not the outline",
    "inner_detail": "standard deviation of the fine structure (as for inner_structure_r) in the "
                    "same deep region of the registered volume, over its mean intensity there: "
                    "how much detail, not whether it is anatomy (a blurred head scores low)",
    "head_overlap": "Dice overlap of the head (voxels > foreground) with the reference's head "
                    "after rigid registration: the head's size and shape",
    "symmetry_r": "Pearson r of the registered volume and its left-right mirror (about the "
                  "grid's mid-sagittal plane) inside the head and its mirror",
    "largest_component": "fraction of the head (voxels > foreground) in its largest "
                         "26-connected component",
    "foreground_fraction": "fraction of the grid's voxels above the foreground threshold",
    "intensity_w1": "Wasserstein-1 (intensity units) between the head intensities and those of "
                    "the held-out scans pooled (each held-out scan: the others pooled)",
}

FLOORS = {"intensity_w1": 0.0}  # a distance: its range runs from 0 to the real maximum


def draw_and_measure(run: PriorRun, model: VQVAE, held: HeldOut, settings: SampleSettings,
                     out: Path, threads: int | None = 1) -> tuple[np.ndarray, dict[str, Any]]:
    """Draw samples into ``out/samples/`` as `mri-vqvae sample` would with ``settings``:
    (volumes (N, D, H, W) in [0, 1], the samples block)."""
    num_samples, seed = settings.num_samples, settings.seed
    start = time.perf_counter()
    drawn = sample_volumes(run, settings, out / "samples", threads=threads, keep_volumes=True)
    seconds = time.perf_counter() - start
    assert drawn.volumes is not None
    volumes = np.clip(drawn.volumes, 0.0, 1.0)
    real = np.stack(held.volumes)
    pick = np.sort(np.random.default_rng(seed).permutation(len(real))[:num_samples])
    montage = paired_montage([(f"sample {i}", v) for i, v in enumerate(volumes)],
                             [(held.cases[i].case_id, real[i]) for i in pick], run.data.spacing,
                             out / MONTAGE, ("samples", "held-out scans"))
    sample_features = pooled_features(model, torch.from_numpy(volumes)[:, None])
    mmd2, bandwidth = gaussian_mmd2(sample_features, np.stack(held.features))
    resolved = settings.resolved(run)
    classes = class_labels(run)
    return volumes, {
        "num_samples": num_samples,
        "seed": seed,
        "seconds_per_sample": seconds / max(num_samples, 1),
        "sample_threads": threads,
        "temperature": resolved.temperature,
        "top_k": resolved.top_k,
        "folder": "samples",
        "label_field": classes.field,
        "labels": drawn.labels if classes.names else None,
        "label_mode": "in turn" if classes.names else None,
        "diversity": {
            "measure": "mean pairwise MS-SSIM (lower = more diverse)",
            "samples": mean_pairwise_ms_ssim(volumes),
            "held_out": mean_pairwise_ms_ssim(real[pick]),
            "num_held_out_used": int(len(pick)),
        },
        "montage": {"figure": str(montage.relative_to(out)),
                    "held_out_cases": [held.cases[i].case_id for i in pick]},
        "mmd": {"mmd2": mmd2, "bandwidth": bandwidth, "kernel": "gaussian, median heuristic",
                "estimator": "biased (V-statistic), >= 0",
                "features": f"VQ-VAE z_e average-pooled to {FEATURE_GRID}^3, flattened",
                "num_samples": len(sample_features), "num_held_out": len(held.features),
                "note": NOT_FID},
    }


def _inner_of(reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(`inner_head`, `fine_structure`) of a reference: computed once, shared by its volumes."""
    return inner_head(reference), fine_structure(reference)


def _volume_checks(volume: np.ndarray, reference: np.ndarray | None,
                   inner: tuple[np.ndarray, np.ndarray] | None, spacing: Sequence[float],
                   settings: RegistrationSettings) -> tuple[dict[str, float], float]:
    """The checks of one volume (X, Y, Z) but the histogram distance, and seconds registering;
    `inner` is `_inner_of(reference)`, computed once per reference by the caller."""
    start = time.perf_counter()
    registered = None if reference is None else register_rigid(volume, reference, spacing,
                                                                 settings)
    seconds = time.perf_counter() - start
    fine = None if registered is None else fine_structure(registered)  # once, for both checks
    return {
        "reference_r": math.nan if reference is None
        else reference_correlation(registered, reference),
        "inner_structure_r": math.nan if reference is None or inner is None
        else inner_structure_correlation(registered, reference, inner[0], fine=fine,
                                         reference_fine=inner[1]),
        "inner_detail": math.nan if inner is None else inner_detail(registered, inner[0],
                                                                   fine=fine),
        "head_overlap": math.nan if reference is None else head_overlap(registered, reference),
        "symmetry_r": mirror_symmetry(registered),
        "largest_component": largest_component_fraction(volume),
        "foreground_fraction": foreground_fraction(volume),
    }, seconds


def _check_summary(name: str, sample_values: list[float], real_values: list[float]
                   ) -> dict[str, Any]:
    floor = FLOORS.get(name)
    low, high = real_range(real_values, floor)
    return {
        "measure": CHECKS[name],
        "samples": sample_values,
        "held_out": real_values,
        "real_range": [low, high],
        "samples_inside_real_range": inside_fraction(sample_values, low, high),
        "held_out_inside_leave_one_out_range": leave_one_out_inside(real_values, floor),
        "num_nan": {"samples": int(np.sum(~np.isfinite(sample_values))),
                    "held_out": int(np.sum(~np.isfinite(real_values)))},
    }


def plausibility_block(samples: np.ndarray, real: np.ndarray, real_ids: Sequence[str],
                       reference: np.ndarray | None, num_reference: int,
                       spacing: Sequence[float], settings: RegistrationSettings | None = None,
                       groups: Sequence[str | None] | None = None,
                       group_references: Mapping[str, np.ndarray] | None = None
                       ) -> dict[str, Any]:
    """The plausibility checks of samples (N, X, Y, Z) and held-out scans (M, X, Y, Z), both in
    [0, 1] on the preprocessed grid, against `reference` (X, Y, Z; the mean of `num_reference`
    training scans, None when there is none: the registered checks are then NaN). With
    ``groups`` (one per sample, then per scan: e.g. the contrast a sample was drawn as and each
    scan's) a volume whose group has a mean in ``group_references`` is registered to and
    correlated with that mean instead: a T2w scan is judged against T2w anatomy.

    Each check (`CHECKS`) lists per-sample and per-scan values, the real range (min..max over
    the held-out scans; from 0 for the distance, `FLOORS`), the fraction of samples inside it and
    of held-out scans inside the range of the others; a failed registration is NaN (counted, and
    outside every range).
    """
    s = settings or RegistrationSettings()
    volumes = (*samples, *real)
    own = list(groups) if groups is not None else [None] * len(volumes)
    refs = dict(group_references or {})
    chosen = [refs.get(str(g), reference) if g is not None else reference for g in own]
    inners = {id(r): _inner_of(r) for r in chosen if r is not None}  # one per reference
    done = [_volume_checks(v, r, None if r is None else inners[id(r)], spacing, s)
            for v, r in zip(volumes, chosen, strict=True)]
    values = {k: [d[k] for d, _ in done] for k in CHECKS if k != "intensity_w1"}
    hists = [intensity_histogram(v) for v in (*samples, *real)]
    n = len(samples)
    pool = np.sum(hists[n:], axis=0) if len(real) else np.zeros_like(hists[0])
    values["intensity_w1"] = [wasserstein1(h, pool) for h in hists[:n]] + \
        [wasserstein1(h, pool - h) for h in hists[n:]]
    checks = {k: _check_summary(k, v[:n], v[n:]) for k, v in values.items()}
    inside_all = [all(_inside(k, c, "samples", i) for k, c in checks.items()) for i in range(n)]
    seconds = [t for _, t in done]
    failed = [reference is not None and not math.isfinite(values["reference_r"][i])
              for i in range(len(done))]
    matched = [str(g) if g is not None and str(g) in refs else None for g in own]
    return {
        "reference": f"mean of the {num_reference} training scans read by this evaluation "
                     "(preprocessed grid; augmented copies left out when real scans were read)"
                     if reference is not None
                     else "none: no training scan could be read",
        "reference_groups": sorted(refs) if refs else None,
        "reference_of": {"samples": matched[:n], "held_out": matched[n:]} if refs else None,
        "foreground_threshold": FOREGROUND,
        "registration": {**s.as_dict(), "seconds_per_volume": float(np.mean(seconds)),
                         "max_seconds": float(np.max(seconds)),
                         "num_failed": {"samples": int(sum(failed[:n])),
                                        "held_out": int(sum(failed[n:]))}},
        "held_out_cases": list(real_ids),
        "checks": checks,
        "samples_inside_every_range": float(np.mean(inside_all)) if n else math.nan,
    }


def write_plausibility_csv(path: Path, block: dict[str, Any]) -> None:
    """plausibility.csv: one row per sample, then per held-out scan: each check's value and
    whether it lies inside the real range (held-out scans: the range of the others)."""
    checks = block["checks"]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["set", "id", *checks, *(f"{k}_inside" for k in checks)])
    first = next(iter(checks.values()))
    for kind, ids in (("samples", range(len(first["samples"]))),
                      ("held_out", block["held_out_cases"])):
        for i, name in enumerate(ids):
            row = [checks[k][kind][i] for k in checks]
            inside = [_inside(k, checks[k], kind, i) for k in checks]
            writer.writerow([kind, name, *row, *inside])
    atomic_write_text(path, buf.getvalue())


def _inside(name: str, check: dict[str, Any], kind: str, i: int) -> bool:
    values = np.asarray(check[kind], np.float64)  # null (NaN in JSON) reads as NaN
    low, high = check["real_range"] if kind == "samples" else \
        others_range(values, i, FLOORS.get(name))
    return inside_fraction(values[i:i + 1], _number(low), _number(high)) == 1.0


def _number(value: float | None) -> float:
    return math.nan if value is None else float(value)

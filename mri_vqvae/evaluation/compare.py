"""`mri-vqvae compare`: priors side by side, from the evaluation folders `evaluate` wrote for each.

Every folder must evaluate the same VQ-VAE weights on the same manifest and held-out split with
a prior and samples (so the numbers are comparable); the page then shows, per prior: its kind
and run, held-out bits per latent (exact, or an upper bound) beside the unigram floor, seconds
per sample, the samples inside every plausibility range and per check, diversity beside
real-vs-real, memorisation and MMD, and each prior's sample montage. Writes compare.json (the
rows) and compare.html (self-contained, like report.html).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mri_vqvae.core.atomic import atomic_write_text
from mri_vqvae.core.errors import EvaluationError
from mri_vqvae.core.jsonio import json_ready
from mri_vqvae.evaluation.report.evaluation_report import fmt
from mri_vqvae.evaluation.report.html import Figure, Section, Table, write_html_report

SAME = ("vqvae_sha256", "manifest_digest", "split")


def _load(folder: Path) -> dict[str, Any]:
    path = folder / "metrics.json"
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise EvaluationError(f"{path} cannot be read as an evaluation ({exc}); pass folders "
                              "written by `mri-vqvae evaluate`") from None
    if not metrics.get("likelihood") or not metrics.get("samples"):
        raise EvaluationError(f"{folder} evaluates no prior with samples; run `mri-vqvae "
                              "evaluate --prior RUN -n 8` for each prior you compare")
    return metrics


def _check_comparable(folders: Sequence[Path], docs: Sequence[dict[str, Any]]) -> None:
    first = docs[0]["inputs"]
    for folder, doc in zip(folders[1:], docs[1:], strict=True):
        for key in SAME:
            if doc["inputs"].get(key) != first.get(key):
                raise EvaluationError(
                    f"{folder} has {key} {doc['inputs'].get(key)!r}, but {folders[0]} has "
                    f"{first.get(key)!r}: compare evaluations of one VQ-VAE on one manifest and "
                    "split, so every prior is judged on the same held-out scans"
                )


def prior_row(folder: Path, metrics: dict[str, Any]) -> dict[str, Any]:
    """The comparison numbers of one evaluation folder (see the module doc)."""
    lik, smp, inputs = metrics["likelihood"], metrics["samples"], metrics["inputs"]
    plaus = smp.get("plausibility") or {}
    return {
        "folder": str(folder),
        "prior_kind": inputs.get("prior_kind"),
        "prior_run": inputs.get("prior_run"),
        "bits_are": lik.get("bits_are"),
        "held_out_bits": lik["held_out"]["mean"],
        "unigram_bits": lik["unigram_bits"]["held_out"]["mean"],
        "seconds_per_sample": smp.get("seconds_per_sample"),
        "num_samples": smp["num_samples"],
        "inside_every_range": plaus.get("samples_inside_every_range"),
        "inside_per_check": {k: c["samples_inside_real_range"]
                             for k, c in plaus.get("checks", {}).items()},
        "diversity": smp["diversity"]["samples"],
        "diversity_real": smp["diversity"]["held_out"],
        "memorised": smp["memorisation"]["num_flagged"],
        "mmd2": smp["mmd"]["mmd2"],
        "montage": str(folder / smp["montage"]["figure"]),
        "lesion_auroc": (lik.get("lesions") or {}).get("mean_auroc_prior"),
        "lesion_auroc_healed": (lik.get("lesions") or {}).get("mean_auroc_healed"),
    }


def _sections(rows: Sequence[dict[str, Any]]) -> list[Section]:
    names = [f"{r['prior_kind']} ({Path(str(r['prior_run'])).name})" for r in rows]
    main = Table(
        ["prior", "held-out bits/latent", "unigram", "s / sample", "inside every range",
         "diversity (real)", "memorised", "MMD²", "lesion AUROC (healed)"],
        [[n, f"{fmt(r['held_out_bits'], 3)} ({r['bits_are']})", fmt(r["unigram_bits"], 3),
          fmt(r["seconds_per_sample"], 2), f"{fmt(r['inside_every_range'], 2)} of "
          f"{r['num_samples']}", f"{fmt(r['diversity'], 3)} ({fmt(r['diversity_real'], 3)})",
          r["memorised"], fmt(r["mmd2"], 3),
          f"{fmt(r['lesion_auroc'], 3)} ({fmt(r['lesion_auroc_healed'], 3)})"]
         for n, r in zip(names, rows, strict=True)],
        "Bits: 'exact' is -log2 p; 'bound' an upper bound on it. Inside every range: the "
        "fraction of samples inside the held-out scans' range on every plausibility check. "
        "Diversity: mean pairwise MS-SSIM (lower = more diverse), real-vs-real in brackets.")
    checks = sorted({k for r in rows for k in r["inside_per_check"]})
    per_check = Table(["prior", *checks],
                      [[n, *(fmt(r["inside_per_check"].get(k), 2) for k in checks)]
                       for n, r in zip(names, rows, strict=True)],
                      "Fraction of samples inside the real range, per check.")
    montages = [Figure(Path(r["montage"]), f"{n}: samples beside held-out scans")
                for n, r in zip(names, rows, strict=True)]
    return [Section("Priors side by side", [main, per_check]), Section("Samples", montages)]


def compare_evaluations(folders: Sequence[str | Path], out: str | Path) -> Path:
    """Write out/compare.json and out/compare.html for `folders` (>= 2); returns the page."""
    paths = [Path(f) for f in folders]
    if len(paths) < 2:
        raise EvaluationError("compare needs at least two evaluation folders")
    docs = [_load(p) for p in paths]
    _check_comparable(paths, docs)
    rows = [prior_row(p, d) for p, d in zip(paths, docs, strict=True)]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    first = docs[0]["inputs"]
    atomic_write_text(out / "compare.json", json.dumps(json_ready(
        {"vqvae_sha256": first["vqvae_sha256"], "manifest_digest": first["manifest_digest"],
         "split": first["split"], "priors": rows}), indent=2) + "\n")
    return write_html_report(out / "compare.html", "Priors side by side", _sections(rows),
                             f"one VQ-VAE ({str(first['vqvae_sha256'])[:12]}...), manifest "
                             f"{first['manifest_name']}, split {first['split']}")

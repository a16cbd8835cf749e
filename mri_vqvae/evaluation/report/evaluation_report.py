"""report.html of `mri-vqvae evaluate`: metrics.json and the held-out pass's views as one page.

Sections: overview, reconstruction (mean ± std [CI] of every metric), per-case views, likelihood
(prior bits beside the uniform and unigram baselines, and bits maps over the scans the held-out
pass kept), samples (beside as many held-out scans), anatomical plausibility (each check, samples
vs real scans), training curves, per-case table. Figures go to out/figures/*.png and are
embedded in the page (`html`); with ``viewer`` the first shown case, its bits map and the first
sample beside a held-out scan are also in interactive 3D viewers (`viewer`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from mri_vqvae.artifacts.run_summary import describe_stop
from mri_vqvae.artifacts.runs import read_metrics
from mri_vqvae.evaluation.passes import CaseView
from mri_vqvae.evaluation.report.figures import (
    case_views,
    likelihood_overlay,
    plausibility_strips,
    training_curves,
)
from mri_vqvae.evaluation.report.html import Block, Figure, Section, Table, write_html_report
from mri_vqvae.evaluation.report.viewer import case_viewer, likelihood_viewer, samples_viewer
from mri_vqvae.metrics.image import CASE_METRICS, METRICS
from mri_vqvae.metrics.quality import CaseQuality


@dataclass(frozen=True)
class RunCurves:
    """A run's metrics.jsonl records, labelled (``vqvae`` / ``prior``)."""

    label: str
    run_name: str
    records: Sequence[Mapping[str, Any]]

    @classmethod
    def of(cls, label: str, run_dir: Path) -> RunCurves:
        """The records of ``run_dir/metrics.jsonl``."""
        return cls(label, run_dir.name, read_metrics(run_dir))


def fmt(value: Any, digits: int = 4) -> str:
    """A number for a table: fixed digits; None -> ``n/a``; inf/nan as words."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if np.isfinite(value) else str(value)
    return str(value)


def stat_text(block: Mapping[str, Any] | None, digits: int = 4) -> str:
    """``mean ± std [low, high]`` of a metrics.json summary block ({mean, std, ci, ...})."""
    if not block or block.get("mean") is None:
        return "n/a"
    low, high = block["ci"]
    return (f"{block['mean']:.{digits}f} ± {fmt(block['std'], digits)} "
            f"[{fmt(low, digits)}, {fmt(high, digits)}]")


def _how_matched(check: Mapping[str, Any]) -> str:
    """How the evaluated manifest was matched to the run's (metrics.json ``held_out_check``)."""
    sources = ", ".join(check["digest_sources"])
    if check.get("matched_by", "digest") == "digest":
        return f"the manifest digest matches the run's ({sources})"
    return (f"the manifest digest differs from the run's ({sources}), but the run folder's own "
            "manifest.json, which has the recorded digest, holds the same held-out cases with "
            "the same sha256 (a kit rebuilt on another CPU)")


def _overview(metrics: Mapping[str, Any]) -> Section:
    inputs = metrics["inputs"]
    check = metrics["held_out_check"]
    prior = inputs["prior_run"]
    rows = [["VQ-VAE run", inputs["vqvae_run"]], ["VQ-VAE sha256", inputs["vqvae_sha256"]],
            ["prior run", f"{prior} ({inputs['prior_kind']})" if prior else "none"],
            ["manifest", f"{inputs['manifest_name']} (digest {inputs['manifest_digest']})"],
            ["split", inputs["split"]], ["created (UTC)", metrics.get("created_utc", "")]]
    blocks: list[Block] = [
        Table(["", ""], rows),
        f"Held-out check passed: {_how_matched(check)}, the split is not train, and none of "
        f"the {check['held_out_subjects']} held-out subjects has training cases.",
    ]
    cited = inputs.get("data_citations") or {}
    for key, caption in (("trained_on", "Data the models were trained on"),
                         ("evaluated", "Data evaluated here")):
        if cited.get(key):
            blocks.append(Table(["source, licence, citation"], [[line] for line in cited[key]],
                                caption))
    training = metrics.get("training") or []
    if training:
        blocks.append(Table(
            ["stage", "run", "steps", "how it ended", "precision"],
            [[t["stage"], t["run"], f"{t['steps_done']} / {t['max_steps']}", describe_stop(t),
              t["precision"] or "n/a"] for t in training],
            "Training runs evaluated here"))
        blocks += [f"WARNING — {t['stage']}: {describe_stop(t)}. These results are not those "
                   f"of the configured run." for t in training if not t["complete"]]
    return Section("Overview", blocks)


def _reconstruction(metrics: Mapping[str, Any]) -> Section:
    rec = metrics["reconstruction"]
    stats = rec["metrics"]
    rows = [[k.upper().replace("_", "-"), stat_text(stats[k]),
             stat_text(stats[f"{k}_foreground"])] for k in METRICS]
    rows.append(["codes used per case", stat_text(stats["codes_used"], 1), ""])
    inputs, book, ms = metrics["inputs"], rec["codebook"], rec["ms_ssim_settings"]
    level = int(round(100 * inputs.get("ci_level", 0.95)))
    return Section("Reconstruction", [
        Table(["metric", "whole volume", f"foreground (target > {rec['foreground']['threshold']})"],
              rows, f"{rec['num_cases']} held-out cases ({rec['num_failures']} failed): mean ± "
                    f"std [{level} % bootstrap CI of the mean, {inputs['num_resamples']} "
                    f"resamples, seed {inputs['seed']}]"),
        f"MS-SSIM: {ms['scales']} scales, Gaussian window {ms['kernel_size']} (sigma "
        f"{ms['sigma']}), weights {[round(w, 4) for w in ms['weights']]}. PSNR of a perfect "
        "reconstruction is infinite and left out of the statistics (counted in metrics.json).",
        Table(["codebook size", "codes used (all held-out grids)", "usage", "perplexity"],
              [[book["codebook_size"], book["codes_used"], fmt(book["usage"], 3),
                fmt(book["perplexity"], 2)]], "Codebook usage on the held-out scans"),
    ])


def _case_views(views: Sequence[CaseView], spacing: Sequence[float], figures: Path,
                viewer: bool) -> Section:
    blocks: list[Block] = []
    if viewer and views:
        blocks.append(case_viewer(views[0].quality.case_id, views[0].image,
                                  views[0].reconstruction, spacing))
    for v in views:
        q = v.quality
        path = case_views(q.case_id, v.image, v.reconstruction, spacing,
                          figures / f"case_{q.case_id}.png")
        blocks.append(Figure(path, f"{q.case_id}: PSNR {fmt(q.psnr, 2)} dB, SSIM "
                                   f"{fmt(q.ssim, 3)}, MS-SSIM {fmt(q.ms_ssim, 3)}"))
    return Section("Per-case views", blocks or ["no case to show"])


def _likelihood(metrics: Mapping[str, Any], views: Sequence[CaseView],
                spacing: Sequence[float], out: Path, viewer: bool) -> Section:
    figures = out / "figures"
    lik = metrics["likelihood"]
    unigram = lik["unigram_bits"]
    blocks: list[Block] = [Table(
        ["grids", "prior bits per latent", "unigram baseline", "cases"],
        [["held-out", stat_text(lik["held_out"]), stat_text(unigram["held_out"]),
          lik["held_out"]["n"]],
         ["train", stat_text(lik["train"]), stat_text(unigram["train"]), lik["train"]["n"]],
         ["gap (held-out - train)", fmt(lik["generalisation_gap"]), "", ""],
         ["uniform over the codebook", fmt(lik["uniform_bits"]), "", ""]],
        f"Prior negative log-likelihood per latent ({lik['bits_note']}); a large gap means the "
        f"prior overfits. Unigram baseline: {unigram['fitted_on']}")]
    mapped = [v for v in views if v.bits_map is not None]
    if viewer and mapped:
        blocks.append(likelihood_viewer(mapped[0].quality.case_id, mapped[0].image,
                                        mapped[0].bits_map, spacing))
    for v in views:
        cid = v.quality.case_id
        if v.bits_map is None:
            continue
        path = likelihood_overlay(cid, v.image, v.bits_map, spacing,
                                  figures / f"likelihood_{cid}.png",
                                  f"{cid}: mean {fmt(v.mean_bits, 3)} bits/latent")
        blocks.append(Figure(path, f"{cid}: -log2 p per latent over the scan"))
    if views and all(v.bits_map is None for v in views):
        blocks.append("This prior gives no per-latent -log2 p, so there are no bits maps.")
    return Section("Likelihood maps", blocks + _lesions(lik.get("lesions"), out))


def _lesions(block: Mapping[str, Any] | None, out: Path) -> list[Block]:
    """The lesion-AUROC table and overlays (nothing when no held-out case has a lesion mask)."""
    if not block:
        return []
    keys = ["auroc_prior", "auroc_unigram", "auroc_healed"]
    rows = [[r["case_id"], r["lesion_voxels"], f"{r['region']}: {r['region_voxels']}",
             *(fmt(r[k], 3) for k in keys)] for r in block["cases"]]
    rows.append(["mean", "", "", *(fmt(block[f"mean_{k}"], 3) for k in keys)])
    healed = block["healed"]
    how = "the prior cannot redraw part of a grid: no healed map" if not healed else \
        f"healed: {healed['measure']}, latents with p < {healed['redraw_below_p']} redrawn, " \
        f"{healed['draws']} draws"
    blocks: list[Block] = [Table(
        ["case", "lesion voxels", "region: voxels", "AUROC prior", "AUROC unigram",
         "AUROC healed"], rows,
        f"Do the maps point at the lesion? {block['measure']}; baseline: {block['baseline']}; "
        f"{how}. 0.5 is chance; goal {block['goal']}.")]
    blocks += [Figure(out / r["figure"], f"{r['case_id']}: lesion outlined in cyan")
               for r in block["cases"] if r["figure"]]
    return blocks


def _samples_viewer(smp: Mapping[str, Any], views: Sequence[CaseView],
                    spacing: Sequence[float], out: Path) -> list[Block]:
    """The first sample beside a held-out scan of the montage (else the first case shown)."""
    first = sorted((out / smp["folder"]).glob("sample_*.nii.gz"))[0]
    sample = nib.load(first).get_fdata(dtype=np.float32)
    shown = {v.quality.case_id: v.image for v in views}
    real = [c for c in smp["montage"]["held_out_cases"] if c in shown] or list(shown)
    return [samples_viewer([("sample 0", np.clip(sample, 0.0, 1.0))],
                           [(c, shown[c]) for c in real[:1]], spacing)]


def _samples(metrics: Mapping[str, Any], out: Path, viewer: list[Block]) -> Section:
    smp = metrics["samples"]
    div, mmd, mem = smp["diversity"], smp["mmd"], smp["memorisation"]
    classes = (f"; classes of {smp['label_field']} in turn" if smp.get("labels") else "")
    shown = smp["montage"]["held_out_cases"]
    blocks: list[Block] = [
        Figure(out / smp["montage"]["figure"],
               f"{smp['num_samples']} samples (seed {smp['seed']}, temperature "
               f"{smp['temperature']}, top-k {smp['top_k']}{classes}; NIfTI files in "
               f"{smp['folder']}/) beside {len(shown)} held-out scans ({', '.join(shown)}), "
               "mid slices"),
        *viewer,
        Table(["measure", "samples", "held-out scans"],
              [["mean pairwise MS-SSIM (lower = more diverse)", fmt(div["samples"]),
                f"{fmt(div['held_out'])} ({div['num_held_out_used']} scans)"],
               [f"feature MMD² ({mmd['kernel']}, bandwidth {fmt(mmd['bandwidth'], 3)})",
                fmt(mmd["mmd2"], 5), ""]],
              "Diversity and distribution distance"),
        mmd["note"],
        Table(["sample", "nearest training case", "r", "flagged"],
              [[m["sample"], m["nearest_train_case"], fmt(m["r"]), "yes" if m["flagged"] else ""]
               for m in mem["samples"]],
              f"Memorisation ({mem['measure']}): {mem['rule']}; threshold r = "
              f"{fmt(mem['threshold'])}, {mem['num_flagged']} flagged"),
        Table(["held-out case", "nearest training case", "r"],
              [[m["case_id"], m["nearest_train_case"], fmt(m["r"])] for m in mem["held_out"]],
              "Each held-out scan's nearest training scan (sets the threshold)"),
    ]
    return Section("Samples", blocks)


def _range_text(low: Any, high: Any) -> str:
    return "n/a" if low is None or high is None else f"{fmt(low, 3)} .. {fmt(high, 3)}"


def _percent(value: Any) -> str:
    return "n/a" if value is None else f"{100 * value:.0f} %"


def _plausibility(metrics: Mapping[str, Any], figures: Path) -> Section:
    plaus = metrics["samples"]["plausibility"]
    checks, reg = plaus["checks"], plaus["registration"]
    rows = [[name, _range_text(*c["real_range"]), _percent(c["samples_inside_real_range"]),
             _percent(c["held_out_inside_leave_one_out_range"]),
             f"{c['num_nan']['samples']} / {c['num_nan']['held_out']}", c["measure"]]
            for name, c in checks.items()]
    strips = plausibility_strips({k: (c["samples"], c["held_out"], c["real_range"])
                                  for k, c in checks.items()},
                                 figures / "plausibility.png",
                                 "samples (red) vs held-out scans (green, range shaded)")
    failed = reg["num_failed"]
    return Section("Anatomical plausibility", [
        Table(["check", "real range (held-out min .. max)", "samples inside",
               "held-out inside the others' range", "NaN (samples / held-out)", "measure"],
              rows, f"Samples inside every range: {_percent(plaus['samples_inside_every_range'])}"
                    f". Reference brain: {plaus['reference']}; foreground = intensity > "
                    f"{plaus['foreground_threshold']}."),
        Figure(strips, "Each check per sample and per held-out scan; the shaded band is the "
                       "range of the held-out scans"),
        f"Rigid registration to the reference ({reg['metric']}, {reg['iterations']} iterations "
        f"at shrink factors {reg['shrink']}, seed {reg['seed']}): "
        f"{fmt(reg['seconds_per_volume'], 2)} s per volume on average; failed for "
        f"{failed['samples']} sample(s) and {failed['held_out']} held-out scan(s) (NaN, counted "
        "outside every range). Per-volume values are in plausibility.csv.",
    ])


def _curves(runs: Sequence[RunCurves], figures: Path) -> Section:
    blocks: list[Block] = []
    for run in runs:
        path = training_curves(run.records, figures / f"curves_{run.label}.png",
                               f"{run.label}: {run.run_name}")
        blocks.append(Figure(path, f"{run.label} run {run.run_name}: metrics.jsonl") if path
                      else f"{run.label} run {run.run_name}: no metrics.jsonl records")
    return Section("Training curves", blocks)


def _per_case(metrics: Mapping[str, Any], cases: Sequence[CaseQuality]) -> Section:
    rows = [[c.case_id, *(fmt(getattr(c, k)) for k in CASE_METRICS), c.codes_used]
            for c in cases]
    blocks: list[Block] = [Table(["case", *CASE_METRICS, "codes used"], rows,
                                 "All held-out cases (also in per_case.csv)")]
    failures = metrics.get("failures") or []
    if failures:
        blocks.append(Table(["case", "file", "reason"],
                            [[f["case_id"], f["path"], f["reason"]] for f in failures],
                            "Failures (also in failures.csv)"))
    return Section("Per-case metrics", blocks)


def evaluation_report(out: str | Path, metrics: Mapping[str, Any], cases: Sequence[CaseQuality],
                      views: Sequence[CaseView], runs: Sequence[RunCurves],
                      spacing: Sequence[float], viewer: bool = True) -> Path:
    """Write out/report.html for an evaluation folder (figures go to out/figures/*.png).

    `metrics` is metrics.json's content, `cases` every held-out case's metrics, `views` the cases
    to show (volumes (X, Y, Z) on the preprocessed grid, bits maps with a prior); `viewer` adds
    the interactive 3D viewers (NiiVue, inlined; about 1 MB more).
    """
    out = Path(out)
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    sections = [_overview(metrics), _reconstruction(metrics),
                _case_views(views, spacing, figures, viewer)]
    if metrics.get("likelihood"):
        sections.append(_likelihood(metrics, views, spacing, out, viewer))
    smp = metrics.get("samples")
    if smp:
        shown = _samples_viewer(smp, views, spacing, out) if viewer else []
        sections += [_samples(metrics, out, shown), _plausibility(metrics, figures)]
    sections += [_curves(runs, figures), _per_case(metrics, cases)]
    inputs = metrics["inputs"]
    title = f"Evaluation of {Path(inputs['vqvae_run']).name} on " \
            f"{inputs['manifest_name']} / {inputs['split']}"
    note = " The 3D viewers need JavaScript and WebGL2; the figures do not." if viewer else ""
    return write_html_report(out / "report.html", title, sections,
                             "Self-contained page: every figure is embedded; opens offline." + note)

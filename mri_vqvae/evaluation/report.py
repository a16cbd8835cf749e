"""Figures and pages a person looks at.

* `orthogonal_montage`: mid axial / coronal / sagittal slices of several volumes;
* evaluation figures: `case_views` (input, reconstruction, absolute error), `likelihood_overlay`
  (a bits map in colour over the scan), `training_curves` (a run's metrics.jsonl);
* `render_html` / `write_html_report`: one self-contained page (inline CSS, every image a base64
  PNG data URI, no script, no external link), so it opens offline and can be mailed as one file.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mri_vqvae.artifacts.run_summary import describe_stop  # noqa: E402
from mri_vqvae.core.atomic import atomic_path, atomic_write_text  # noqa: E402

VIEWS = ("axial", "coronal", "sagittal")


def mid_slices(volume: np.ndarray, spacing: Sequence[float]) -> list[tuple[np.ndarray, float]]:
    """Mid axial, coronal and sagittal slices of a RAS volume (X, Y, Z), each as (image, aspect).

    Images are oriented for ``imshow(origin="lower")``: anterior / superior up, patient right on
    the right of the axial and coronal views (neurological convention).
    """
    x, y, z = (n // 2 for n in volume.shape)
    sx, sy, sz = spacing
    return [
        (volume[:, :, z].T, sy / sx),
        (volume[:, y, :].T, sz / sx),
        (volume[x, :, :].T, sz / sy),
    ]


def orthogonal_montage(
    rows: Sequence[tuple[str, np.ndarray]],
    spacing: Sequence[float],
    path: str | Path,
    title: str = "",
    vmax: float | None = None,
) -> Path:
    """Save a PNG grid: one row per (label, volume (X, Y, Z) RAS), columns axial/coronal/sagittal.

    Written atomically; returns `path`.
    """
    fig, axes = plt.subplots(len(rows), 3, figsize=(9, 3 * len(rows)), squeeze=False)
    for r, (label, volume) in enumerate(rows):
        top = vmax if vmax is not None else float(np.percentile(volume, 99.5)) or 1.0
        for c, (img, aspect) in enumerate(mid_slices(np.asarray(volume), spacing)):
            ax = axes[r][c]
            ax.imshow(img, cmap="gray", origin="lower", aspect=aspect, vmin=0, vmax=top)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(VIEWS[c])
        axes[r][0].set_ylabel(label)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
    return Path(path)


# --- evaluation figures --------------------------------------------------------------------------


def _save(fig: Any, path: str | Path) -> Path:
    """Save `fig` as PNG atomically, close it, return `path`."""
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
    return Path(path)


def _blank(ax: Any) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def case_views(
    case_id: str,
    image: np.ndarray,
    reconstruction: np.ndarray,
    spacing: Sequence[float],
    path: str | Path,
) -> Path:
    """PNG of one case: rows input, reconstruction (grey, [0, 1]), |error| (magma, own scale).

    `image` and `reconstruction` are (X, Y, Z) RAS volumes on the same grid; columns are the mid
    axial, coronal and sagittal slices.
    """
    error = np.abs(np.asarray(reconstruction, np.float32) - np.asarray(image, np.float32))
    top = float(np.percentile(error, 99.5)) or 1.0
    rows = [("input", image, "gray", 1.0), ("reconstruction", reconstruction, "gray", 1.0),
            (f"|error| (0-{top:.2f})", error, "magma", top)]
    fig, axes = plt.subplots(3, 3, figsize=(9, 9), squeeze=False)
    for r, (label, volume, cmap, vmax) in enumerate(rows):
        for c, (img, aspect) in enumerate(mid_slices(np.asarray(volume), spacing)):
            ax = axes[r][c]
            ax.imshow(img, cmap=cmap, origin="lower", aspect=aspect, vmin=0, vmax=vmax)
            _blank(ax)
            if r == 0:
                ax.set_title(VIEWS[c])
        axes[r][0].set_ylabel(label)
    fig.suptitle(case_id)
    return _save(fig, path)


def likelihood_overlay(
    label: str,
    image: np.ndarray,
    bits_map: np.ndarray,
    spacing: Sequence[float],
    path: str | Path,
    title: str = "",
) -> Path:
    """PNG: the scan in grey with the bits-per-latent map (X, Y, Z) as a colour overlay.

    One row, three views; the overlay (inferno, alpha 0.5, from the map's minimum to its maximum)
    shares one colour bar in bits.
    """
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.6), squeeze=False)
    low, top = float(np.min(bits_map)), float(np.max(bits_map))
    low, top = (low, top) if top > low else (0.0, top or 1.0)
    shown = None
    scan_views = mid_slices(np.asarray(image), spacing)
    for c, ((img, aspect), (bits, _)) in enumerate(
        zip(scan_views, mid_slices(np.asarray(bits_map), spacing), strict=True)
    ):
        ax = axes[0][c]
        ax.imshow(img, cmap="gray", origin="lower", aspect=aspect, vmin=0, vmax=1)
        shown = ax.imshow(bits, cmap="inferno", origin="lower", aspect=aspect, vmin=low,
                          vmax=top, alpha=0.5)
        _blank(ax)
        ax.set_title(VIEWS[c])
    axes[0][0].set_ylabel(label)
    fig.colorbar(shown, ax=axes[0].tolist(), shrink=0.8, label="bits / latent")
    if title:
        fig.suptitle(title)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
    return Path(path)


CURVE_PRIORITY = ("loss", "psnr", "ssim", "bits_per_latent", "perplexity", "codes_used")
_NOT_CURVES = frozenset({"step", "epoch", "split", "time", "lr"})


def curve_keys(records: Sequence[Mapping[str, Any]], limit: int = 4) -> list[str]:
    """Up to `limit` numeric metric names in `records`, the usual ones (`CURVE_PRIORITY`) first."""
    found: list[str] = []
    for record in records:
        for key, value in record.items():
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            if numeric and key not in _NOT_CURVES and key not in found:
                found.append(key)
    ranked = [k for k in CURVE_PRIORITY if k in found] + [k for k in found
                                                          if k not in CURVE_PRIORITY]
    return ranked[:limit]


def training_curves(records: Sequence[Mapping[str, Any]], path: str | Path, title: str = ""
                    ) -> Path | None:
    """PNG of a run's metrics.jsonl records: one panel per metric, one line per split.

    Returns None (and writes nothing) when the records hold no numeric metric.
    """
    keys = curve_keys(records)
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3), squeeze=False)
    splits = sorted({str(r.get("split", "")) for r in records})
    for ax, key in zip(axes[0], keys, strict=True):
        for split in splits:
            pts = [(r["step"], r[key]) for r in records if str(r.get("split", "")) == split
                   and isinstance(r.get(key), (int, float)) and "step" in r]
            if pts:
                steps, values = zip(*pts, strict=True)
                ax.plot(steps, values, marker="." if len(pts) < 30 else None, label=split)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


# --- self-contained HTML -------------------------------------------------------------------------


def png_data_uri(path: str | Path) -> str:
    """``data:image/png;base64,...`` of a PNG file (so the page needs no other file)."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


@dataclass(frozen=True)
class Figure:
    """A PNG to embed, with a caption."""

    path: Path
    caption: str = ""


@dataclass(frozen=True)
class Table:
    """A table: header cells and rows of cells (str() of each; escaped when rendered)."""

    header: Sequence[str]
    rows: Sequence[Sequence[Any]]
    caption: str = ""


@dataclass(frozen=True)
class Section:
    """A titled part of a report: paragraphs (str), figures and tables in order."""

    title: str
    blocks: Sequence[str | Figure | Table] = field(default_factory=list)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;
max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f2f2f2}figure{margin:1em 0}img{max-width:100%;height:auto}
figcaption,caption{color:#555;font-size:.9em;text-align:left}
nav a{margin-right:1em}p.note{color:#555}
"""


def _anchor(title: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in title.lower()).strip("-")


def _block_html(block: str | Figure | Table) -> str:
    if isinstance(block, Figure):
        cap = html.escape(block.caption)
        return (f'<figure><img src="{png_data_uri(block.path)}" alt="{cap}">'
                f"<figcaption>{cap}</figcaption></figure>")
    if isinstance(block, Table):
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in block.header)
        thead = f"<thead><tr>{head}</tr></thead>" if any(str(h) for h in block.header) else ""
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
            for row in block.rows
        )
        cap = f"<caption>{html.escape(block.caption)}</caption>" if block.caption else ""
        return f"<table>{cap}{thead}<tbody>{body}</tbody></table>"
    return f'<p class="note">{html.escape(block)}</p>'


def render_html(title: str, sections: Sequence[Section], subtitle: str = "") -> str:
    """One self-contained HTML page: inline CSS, PNGs as base64 data URIs, no script, no link."""
    nav = " ".join(f'<a href="#{_anchor(s.title)}">{html.escape(s.title)}</a>' for s in sections)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="note">{html.escape(subtitle)}</p>' if subtitle else "",
        f"<nav>{nav}</nav>",
    ]
    for s in sections:
        parts.append(f'<section id="{_anchor(s.title)}"><h2>{html.escape(s.title)}</h2>')
        parts += [_block_html(b) for b in s.blocks]
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(p for p in parts if p) + "\n"


def write_html_report(path: str | Path, title: str, sections: Sequence[Section],
                      subtitle: str = "") -> Path:
    """Render `sections` (`render_html`) and write the page atomically; returns `path`."""
    atomic_write_text(path, render_html(title, sections, subtitle))
    return Path(path)


# --- the evaluation report (report.html of `mri-vqvae evaluate`) ---------------------------------

METRIC_ROWS = ("psnr", "ssim", "ms_ssim", "nmse")


@dataclass(frozen=True)
class CaseView:
    """One held-out case to show: volumes (X, Y, Z) on the preprocessed grid, its metrics."""

    case_id: str
    image: np.ndarray
    reconstruction: np.ndarray
    metrics: Mapping[str, Any]


@dataclass(frozen=True)
class LikelihoodView:
    """A held-out scan (X, Y, Z) and its bits-per-latent map on the same grid."""

    case_id: str
    image: np.ndarray
    bits_map: np.ndarray
    mean_bits: float


@dataclass(frozen=True)
class RunCurves:
    """A run's metrics.jsonl records, labelled (``vqvae`` / ``prior``)."""

    label: str
    run_name: str
    records: Sequence[Mapping[str, Any]]


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


def _overview(metrics: Mapping[str, Any]) -> Section:
    inputs = metrics["inputs"]
    check = metrics["held_out_check"]
    rows = [["VQ-VAE run", inputs["vqvae_run"]], ["VQ-VAE sha256", inputs["vqvae_sha256"]],
            ["prior run", inputs["prior_run"] or "none"],
            ["manifest", f"{inputs['manifest_name']} (digest {inputs['manifest_digest']})"],
            ["split", inputs["split"]], ["created (UTC)", metrics.get("created_utc", "")]]
    blocks: list[str | Figure | Table] = [
        Table(["", ""], rows),
        f"Held-out check passed: the manifest digest matches the run's "
        f"({', '.join(check['digest_sources'])}), the split is not train, and none of the "
        f"{check['held_out_subjects']} held-out subjects has training cases.",
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
             stat_text(stats[f"{k}_foreground"])] for k in METRIC_ROWS]
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


def _case_views(views: Sequence[CaseView], spacing: Sequence[float], figures: Path) -> Section:
    blocks: list[str | Figure | Table] = []
    for v in views:
        path = case_views(v.case_id, v.image, v.reconstruction, spacing,
                          figures / f"case_{v.case_id}.png")
        m = v.metrics
        blocks.append(Figure(path, f"{v.case_id}: PSNR {fmt(m.get('psnr'), 2)} dB, SSIM "
                                   f"{fmt(m.get('ssim'), 3)}, MS-SSIM {fmt(m.get('ms_ssim'), 3)}"))
    return Section("Per-case views", blocks or ["no case to show"])


def _likelihood(metrics: Mapping[str, Any], views: Sequence[LikelihoodView],
                spacing: Sequence[float], figures: Path) -> Section:
    lik = metrics["likelihood"]
    blocks: list[str | Figure | Table] = [Table(
        ["grids", "bits per latent", "cases"],
        [["held-out", stat_text(lik["held_out"]), lik["held_out"]["n"]],
         ["train", stat_text(lik["train"]), lik["train"]["n"]],
         ["gap (held-out - train)", fmt(lik["generalisation_gap"]), ""],
         ["uniform over the codebook", fmt(lik["uniform_bits"]), ""]],
        "Prior negative log-likelihood per latent; a large gap means the prior overfits")]
    for v in views:
        path = likelihood_overlay(v.case_id, v.image, v.bits_map, spacing,
                                  figures / f"likelihood_{v.case_id}.png",
                                  f"{v.case_id}: mean {v.mean_bits:.3f} bits/latent")
        blocks.append(Figure(path, f"{v.case_id}: -log2 p per latent over the scan"))
    return Section("Likelihood maps", blocks)


def _samples(metrics: Mapping[str, Any], out: Path, views: Sequence[CaseView],
             spacing: Sequence[float], figures: Path) -> Section:
    smp = metrics["samples"]
    div, mmd, mem = smp["diversity"], smp["mmd"], smp["memorisation"]
    blocks: list[str | Figure | Table] = [
        Figure(out / smp["folder"] / "samples.png",
               f"{smp['num_samples']} samples (seed {smp['seed']}, temperature "
               f"{smp['temperature']}, top-k {smp['top_k']}); NIfTI files in {smp['folder']}/"),
    ]
    if views:
        real = orthogonal_montage([(v.case_id, v.image) for v in views[:8]], spacing,
                                  figures / "held_out_scans.png", title="held-out scans",
                                  vmax=1.0)
        blocks.append(Figure(real, "held-out scans, for comparison"))
    blocks += [
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


def _curves(runs: Sequence[RunCurves], figures: Path) -> Section:
    blocks: list[str | Figure | Table] = []
    for run in runs:
        path = training_curves(run.records, figures / f"curves_{run.label}.png",
                               f"{run.label}: {run.run_name}")
        blocks.append(Figure(path, f"{run.label} run {run.run_name}: metrics.jsonl") if path
                      else f"{run.label} run {run.run_name}: no metrics.jsonl records")
    return Section("Training curves", blocks)


def _per_case(metrics: Mapping[str, Any], cases: Sequence[Mapping[str, Any]]) -> Section:
    cols = ["psnr", "ssim", "ms_ssim", "nmse", "psnr_foreground", "ssim_foreground"]
    rows = [[c["case_id"], *(fmt(c.get(k)) for k in cols), c.get("codes_used")] for c in cases]
    blocks: list[str | Figure | Table] = [Table(["case", *cols, "codes used"], rows,
                                                "All held-out cases (also in per_case.csv)")]
    failures = metrics.get("failures") or []
    if failures:
        blocks.append(Table(["case", "file", "reason"],
                            [[f["case_id"], f["path"], f["reason"]] for f in failures],
                            "Failures (also in failures.csv)"))
    return Section("Per-case metrics", blocks)


def evaluation_report(
    out: str | Path,
    metrics: Mapping[str, Any],
    views: Sequence[CaseView],
    likelihoods: Sequence[LikelihoodView],
    runs: Sequence[RunCurves],
    cases: Sequence[Mapping[str, Any]],
    spacing: Sequence[float],
) -> Path:
    """Write out/report.html for an evaluation folder (figures go to out/figures/*.png).

    Sections: overview, reconstruction table (mean ± std [CI]), per-case views, likelihood maps
    and samples (when metrics.json has them), training curves, per-case table.
    """
    out = Path(out)
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    sections = [_overview(metrics), _reconstruction(metrics), _case_views(views, spacing, figures)]
    if metrics.get("likelihood"):
        sections.append(_likelihood(metrics, likelihoods, spacing, figures))
    if metrics.get("samples"):
        sections.append(_samples(metrics, out, views, spacing, figures))
    sections += [_curves(runs, figures), _per_case(metrics, cases)]
    inputs = metrics["inputs"]
    title = f"Evaluation of {Path(inputs['vqvae_run']).name} on " \
            f"{inputs['manifest_name']} / {inputs['split']}"
    return write_html_report(out / "report.html", title, sections,
                             "Self-contained page: every figure is embedded; opens offline.")

"""Words for a model's facts (`mri_vqvae.artifacts.export.model_facts`): the export's model card
(README.md) and the text of `mri-vqvae info`. Pure string formatting, no I/O."""

from __future__ import annotations

from typing import Any

_ROLES = (("autoencoder", "VQ-VAE (autoencoder)"), ("prior", "prior"))
_METRIC_NAMES = {"psnr": "PSNR (dB)", "ssim": "SSIM", "ms_ssim": "MS-SSIM", "nmse": "NMSE",
                 "psnr_foreground": "PSNR, foreground (dB)",
                 "ssim_foreground": "SSIM, foreground"}


def _grid(facts: dict[str, Any]) -> str:
    g = facts["grid"]
    size = "x".join(str(s) for s in g["spatial_size"])
    spacing = "x".join(f"{s:g}" for s in g["spacing"])
    latent = "x".join(str(s) for s in g["latent_shape"])
    return f"{size} voxels at {spacing} mm ({g['orientation']}) -> {latent} codes"


def info_lines(facts: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) pairs of the card facts `mri-vqvae info` prints, in order."""
    ae = facts["autoencoder"]
    lines = [("kind", facts["kind"])]
    for role, _ in _ROLES:
        model = facts[role]
        if model is None:
            continue
        lines += [(f"{role} parameters", f"{model['parameters']:,}"),
                  (f"{role} training steps", str(model["training_steps"])),
                  (f"{role} weights sha256", model["weights_sha256"])]
    lines += [
        ("codebook", f"{ae['codebook_size']} codes, downsampling x{ae['downsampling_factor']}"),
        ("grid", _grid(facts)),
        ("data config", ", ".join(f"{k}={v}" for k, v in facts["data"].items())),
        ("manifest digest", str(facts["manifest_digest"])),
        ("licences", "; ".join(facts["licences"]) or "unknown (no training manifest)"),
    ]
    metrics = facts["held_out_metrics"]
    if metrics is not None:
        psnr = (metrics["reconstruction"].get("psnr") or {}).get("mean")
        lines.append(("held-out metrics", f"{metrics['split']} split, n={metrics['num_cases']}, "
                                          f"PSNR {psnr} dB ({metrics['evaluation']})"))
    return lines


def info_text(facts: dict[str, Any]) -> str:
    """``label: value`` lines of `info_lines`."""
    return "".join(f"{label}: {value}\n" for label, value in info_lines(facts))


def _ci(summary: dict[str, Any]) -> str:
    if summary.get("mean") is None:
        return "n/a"
    low, high = summary.get("ci") or (None, None)
    interval = "" if low is None else f" [{low:.4g}, {high:.4g}]"
    return f"{summary['mean']:.4g}{interval}"


def _metrics_section(metrics: dict[str, Any] | None) -> list[str]:
    if metrics is None:
        return ["No held-out evaluation was found for these weights. Run `mri-vqvae evaluate` "
                "and export again (or pass `--metrics`) to add one."]
    rows = ["| metric | mean [95 % CI] | n |", "| --- | --- | --- |"]
    for key, summary in metrics["reconstruction"].items():
        rows.append(f"| {_METRIC_NAMES.get(key, key)} | {_ci(summary)} | {summary['n']} |")
    bits = metrics.get("bits_per_latent")
    if bits is not None:
        rows.append(f"| prior bits per latent | {_ci(bits)} | {bits['n']} |")
    return [f"From `mri-vqvae evaluate` ({metrics['evaluation']}, {metrics['created_utc']}) on "
            f"the **{metrics['split']}** split of manifest `{metrics['manifest_digest']}`: "
            f"{metrics['num_cases']} held-out scans.", "", *rows]


def _models_section(facts: dict[str, Any]) -> list[str]:
    rows = ["| model | kind | parameters | training steps | weights sha256 |",
            "| --- | --- | --- | --- | --- |"]
    for role, name in _ROLES:
        m = facts[role]
        if m is not None:
            rows.append(f"| {name} | `{m['kind']}` | {m['parameters']:,} | "
                        f"{m['training_steps']} | `{m['weights_sha256'][:16]}...` |")
    ae, prior = facts["autoencoder"], facts["prior"]
    rows += ["", f"- Grid: {_grid(facts)}; codebook of {ae['codebook_size']} codes, "
                 f"downsampling x{ae['downsampling_factor']} per axis."]
    if prior is not None:
        labels = (f"conditioned on `{prior['label_field']}` ({', '.join(prior['label_names'])})"
                  if prior["label_field"] else "unconditional")
        rows.append(f"- Prior: {labels}; its bits are {prior['likelihood']}.")
    for role, name in _ROLES:
        if facts[role] is not None:
            fields = ", ".join(f"`{k}={v}`" for k, v in facts[role]["config"].items())
            rows.append(f"- {name} config: {fields}.")
    return rows


def _data_section(facts: dict[str, Any]) -> list[str]:
    td = facts["training_data"]
    lines = [f"Manifest digest: `{facts['manifest_digest']}`."]
    if td["known"]:
        lines += ["", f"{td['train_cases']} training scans from:", "",
                  "| source | scans | licence |", "| --- | --- | --- |"]
        lines += [f"| {s['name'] or s['id']} (`{s['id']}`) | {s['train_cases']} | "
                  f"{s['licence'] or 'not recorded: check ' + str(s['url'])} |"
                  for s in td["sources"]]
    lines += ["", "Cite:", "", *(f"- {c}" for c in td["citations"])]
    data = ", ".join(f"`{k}={v}`" for k, v in facts["data"].items())
    return [*lines, "", f"Preprocessing (data config): {data}."]


def _trained_on(facts: dict[str, Any]) -> str:
    td = facts["training_data"]
    scans = "an unrecorded number of scans" if not td["known"] else \
        f"{td['train_cases']} scans from {len(td['sources'])} source(s)"
    spacing = "x".join(f"{s:g}" for s in facts["grid"]["spacing"])
    return f"Trained on {scans}, at {spacing} mm"


def card_markdown(doc: dict[str, Any]) -> str:
    """The model card of an export (`doc`: its export.json) as Markdown."""
    parts = [
        f"# mri-vqvae model: {doc['kind']}", "",
        f"Exported {doc['created_utc']} with mri-vqvae {doc['mri_vqvae_version']} from the run(s) "
        + ", ".join(f"`{v}`" for v in doc["exported_from"].values() if v) + ".", "",
        "## Architecture and size", "", *_models_section(doc), "",
        "## Training data", "", *_data_section(doc), "",
        "## Held-out evaluation", "", *_metrics_section(doc["held_out_metrics"]), "",
        "## Intended use", "",
        "Research only: studying discrete latent representations of 3D MRI, synthetic volumes "
        "for method development, and likelihood maps as an exploratory signal. **Not for "
        "diagnosis, treatment or any clinical decision**, and not a medical device.", "",
        "## Limits", "",
        f"- {_trained_on(doc)}: quality and likelihoods hold only for inputs like the "
        "training data (contrast, field of view, the preprocessing above).",
        "- Synthetic volumes are not anatomically validated and may reproduce training scans; "
        "the licences and citations above apply to anything made with the model.",
        "- Likelihood maps are per latent block, not per voxel, and are not calibrated "
        "abnormality scores.", "",
        "## Loading", "", "```python", "import mri_vqvae as mv", "",
        'model = mv.load("path/to/this/folder")', "```", "",
    ]
    return "\n".join(parts)

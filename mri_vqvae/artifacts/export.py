"""Sharing trained models: opening a run or export folder, its facts, and `mri-vqvae export`.

An export folder loads with no run folder present::

    <DIR>/export.json          the facts (`model_facts`) plus format, created_utc, exported_from
    <DIR>/README.md            the model card (`mri_vqvae.artifacts.model_card.card_markdown`)
    <DIR>/vqvae/               the VQ-VAE checkpoint: model.safetensors, config.json, COMPLETE
    <DIR>/prior/               the prior checkpoint (exports of a prior run)
    <DIR>/configs/<role>.yaml  each run's config.yaml, where the run has one
    <DIR>/manifest.json        the VQ-VAE run's copy of its training manifest, where it has one

Each checkpoint is the run's own: ``model.safetensors`` copied byte for byte (sha256 checked),
``config.json`` as recorded minus the resume state (``state.pt`` is not exported) and minus the
training machine's folders: a prior's ``extra.vqvae_checkpoint`` becomes ``../vqvae`` (the export's
own VQ-VAE, resolved against the prior folder) and ``extra.latents_dir`` the latents folder's
name. Weights are not
re-saved: safetensors writes its header metadata in hash-map order, so a re-save can change the
file's sha256, which the prior records for its VQ-VAE. The folder is built in a hidden sibling
and renamed into place, so DIR is either complete or absent; a non-empty DIR is replaced only with
``force`` and only when it is an export itself.

The facts (``export.json``, `mri-vqvae info`): kind, each model's kind / parameters / training
steps / weights sha256 / config, codebook and grids, the data config, the manifest digest, the
training sources of the VQ-VAE run's manifest with licences and citations (the sources catalog),
and the held-out metrics (with n) of an `evaluate` metrics.json of these weights, given or found
under ``<runs root>/eval/``.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from mri_vqvae import __version__
from mri_vqvae.artifacts.checkpoint_folder import CONFIG, MARKER, WEIGHTS, read_meta, verify_file
from mri_vqvae.artifacts.loading import (
    AutoencoderRun,
    PriorRun,
    find_checkpoint,
    open_autoencoder_run,
    open_prior_run,
)
from mri_vqvae.artifacts.run_summary import training_summary
from mri_vqvae.core.atomic import atomic_write_text, make_temp_dir, swap_in_folder
from mri_vqvae.core.errors import MriVqvaeError
from mri_vqvae.core.provenance import sha256_file, utc_iso
from mri_vqvae.data.catalog import load_catalog
from mri_vqvae.data.checks import file_problems
from mri_vqvae.data.kit_sources import run_citations, source_citations
from mri_vqvae.data.manifest import Manifest, load_manifest
from mri_vqvae.models.registry import Role, model_kind

EXPORT_FORMAT = "mri-vqvae-export"
EXPORT_VERSION = 1
EXPORT_JSON = "export.json"
CARD = "README.md"
MANIFEST = "manifest.json"
FOLDERS: dict[Role, str] = {"autoencoder": "vqvae", "prior": "prior"}
_WHAT = ("pass a training run folder (runs/vqvae/<run> or runs/prior/<run>) or a folder written "
         "by `mri-vqvae export`")
_RECONSTRUCTION = ("psnr", "ssim", "ms_ssim", "nmse", "psnr_foreground", "ssim_foreground")


class ExportError(MriVqvaeError, ValueError):
    """A folder that is neither run nor export, an incomplete run, or a refused --out."""


@dataclass(frozen=True)
class OpenedModels:
    """A run or export folder, opened: the autoencoder (always), the prior (prior runs and their
    exports), the folder given (absolute) and the export's export.json (None for a run)."""

    source: Path
    autoencoder: AutoencoderRun
    prior: PriorRun | None
    exported: dict[str, Any] | None


# --- what a folder is ----------------------------------------------------------------------------


def folder_kind(path: str | Path) -> Literal["export", "run"]:
    """``export`` (it holds export.json) or ``run`` (checkpoints/, or a checkpoint folder)."""
    path = Path(path)
    if not path.exists():
        raise ExportError(f"{path} does not exist; {_WHAT}")
    if not path.is_dir():
        raise ExportError(f"{path} is a file, not a folder; {_WHAT}")
    if (path / EXPORT_JSON).is_file():
        return "export"
    if (path / "checkpoints").is_dir() or (path / CONFIG).is_file():
        return "run"
    held = sorted(p.name for p in path.iterdir())
    content = "it is empty" if not held else f"it holds {held[:5]}"
    raise ExportError(
        f"{path} is neither a training run folder (no checkpoints/) nor an export (no "
        f"{EXPORT_JSON}): {content}; {_WHAT}"
    )


def run_checkpoint(path: str | Path) -> tuple[Path, Role]:
    """The complete checkpoint a run folder is used through (best, else last) and its role."""
    try:
        _, folder = find_checkpoint(path, "autoencoder")
    except MriVqvaeError as exc:
        raise ExportError(
            f"{path} is an incomplete run: it holds no complete checkpoint (checkpoints/best or "
            "checkpoints/last with its COMPLETE marker), because training has not saved one yet "
            "or the folder was copied partially. Wait for the first checkpoint, continue the run "
            f"with --resume, or pass a finished run. ({exc})"
        ) from None
    return folder, model_kind(read_meta(folder)["kind"]).role


def read_export(path: str | Path) -> dict[str, Any]:
    """The export.json of an export folder, checked for its format."""
    file = Path(path) / EXPORT_JSON
    try:
        doc = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ExportError(f"{file} is unreadable ({exc}); export the run again") from None
    if not isinstance(doc, dict) or doc.get("format") != EXPORT_FORMAT:
        raise ExportError(f"{file} is not an mri-vqvae export description (format "
                          f"{doc.get('format') if isinstance(doc, dict) else None!r})")
    if int(doc.get("format_version", 0)) > EXPORT_VERSION:
        raise ExportError(f"{file} has format_version {doc['format_version']}, newer than this "
                          f"mri-vqvae reads ({EXPORT_VERSION}); upgrade mri-vqvae")
    return doc


def _autoencoder_of(prior: PriorRun) -> AutoencoderRun:
    """The VQ-VAE of a prior run as an `AutoencoderRun` (the prior records its data config)."""
    folder = prior.paths.vqvae_checkpoint
    return AutoencoderRun(
        run_dir=find_checkpoint(folder, "autoencoder")[0], checkpoint=folder, model=prior.vqvae,
        weights_sha256=prior.sha256s["vqvae"], step=read_meta(folder).get("step"),
        data=prior.data, latent_shape=prior.latent_shape,
        codebook_size=int(prior.extra["codebook_size"]),
    )


def open_models(path: str | Path, device: str | torch.device = "cpu",
                vqvae: str | Path | None = None) -> OpenedModels:
    """Open a VQ-VAE run, a prior run (with its VQ-VAE; `vqvae` overrides the recorded folder,
    sha256 still checked) or an export, on `device`. `ExportError` for anything else."""
    root = Path(path).expanduser().resolve()
    if folder_kind(root) == "export":
        doc = read_export(root)
        if doc.get("prior") is not None:
            prior = open_prior_run(root / FOLDERS["prior"], root / FOLDERS["autoencoder"], device)
            return OpenedModels(root, _autoencoder_of(prior), prior, doc)
        return OpenedModels(root, open_autoencoder_run(root / FOLDERS["autoencoder"], device),
                            None, doc)
    folder, role = run_checkpoint(root)
    if role == "autoencoder":
        return OpenedModels(root, open_autoencoder_run(folder, device), None, None)
    prior = open_prior_run(folder, vqvae, device)
    return OpenedModels(root, _autoencoder_of(prior), prior, None)


# --- facts ---------------------------------------------------------------------------------------


def _checkpoint_facts(folder: Path, model: torch.nn.Module) -> dict[str, Any]:
    meta = read_meta(folder)
    return {
        "kind": model_kind(meta["kind"]).name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "training_steps": meta.get("step"),
        "weights_sha256": meta["files"][WEIGHTS],
        "config": meta["config"],
    }


def _recorded_digest(run: AutoencoderRun) -> str | None:
    """The VQ-VAE's manifest digest: its checkpoint's extra, else its run.json."""
    digest = (read_meta(run.checkpoint).get("extra") or {}).get("manifest_digest")
    if digest is None:
        digest = training_info(run.run_dir).get("manifest_digest")
    return None if digest is None else str(digest)


def training_info(run_dir: Path) -> dict[str, Any]:
    """A run folder's run.json ({} when absent or unreadable)."""
    try:
        doc = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def training_sources(run_dir: Path) -> dict[str, Any]:
    """The sources of the train cases in a run's manifest copy: catalog records with counts,
    licences and citation lines (`source_citations`); ``known`` False without a manifest."""
    try:
        doc = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
        cases = [c for c in doc["cases"] if isinstance(c, dict) and c.get("split") == "train"]
    except (OSError, ValueError, KeyError, TypeError):
        return {"known": False, "train_cases": None, "sources": [], "citations": [
            f"training sources unknown: the run {run_dir.name} has no readable manifest.json"]}
    counts = Counter(str(c.get("source_id")) for c in cases)
    catalog = load_catalog()
    sources = [{"id": sid, "train_cases": n,
                **{k: catalog.get(sid, {}).get(k) for k in ("name", "licence", "url", "citation")}}
               for sid, n in counts.items()]
    return {"known": True, "train_cases": len(cases), "sources": sources,
            "citations": source_citations(counts, catalog)}


def training_citations(folder: str | Path) -> list[str]:
    """Citation lines of the data the VQ-VAE of a run folder or an export folder learnt from: a
    run's manifest copy (`run_citations`); an export, which has none, what its export.json
    recorded."""
    folder = Path(folder)
    if (folder / EXPORT_JSON).is_file():
        return list(read_export(folder)["training_data"]["citations"])
    return run_citations(folder)


def _summary(block: dict[str, Any]) -> dict[str, Any]:
    return {k: block.get(k) for k in ("mean", "std", "ci", "ci_level", "n")}


def _matching_metrics(opened: OpenedModels) -> Path | None:
    """The newest ``<runs root>/eval/*/metrics.json`` of these VQ-VAE weights (and prior's)."""
    runs_root = opened.autoencoder.run_dir.parent.parent
    found = []
    for path in sorted((runs_root / "eval").glob("*/metrics.json")):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            inputs = doc["inputs"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if inputs.get("vqvae_sha256") != opened.autoencoder.weights_sha256:
            continue
        same_prior = opened.prior is not None and \
            inputs.get("prior_sha256") == opened.prior.sha256s["prior"]
        found.append((same_prior, str(doc.get("created_utc")), path))
    return max(found)[2] if found else None


def held_out_metrics(opened: OpenedModels, metrics: str | Path | None) -> dict[str, Any] | None:
    """Held-out results of `metrics` (an `evaluate` metrics.json), else of the newest matching
    one under the runs root; None when there is none. Refuses a file about other weights."""
    path = Path(metrics) if metrics is not None else _matching_metrics(opened)
    if path is None:
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        inputs, recon = doc["inputs"], doc["reconstruction"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ExportError(f"--metrics {path} is not an `mri-vqvae evaluate` metrics.json "
                          f"({exc!r}); pass the metrics.json of an evaluate folder") from None
    if inputs.get("vqvae_sha256") != opened.autoencoder.weights_sha256:
        raise ExportError(
            f"--metrics {path} evaluates VQ-VAE weights {str(inputs.get('vqvae_sha256'))[:12]}..., "
            f"not this run's {opened.autoencoder.weights_sha256[:12]}...; pass the metrics.json "
            "of an evaluate run of this model"
        )
    likelihood = doc.get("likelihood") or {}
    scored = opened.prior is not None and inputs.get("prior_sha256") == opened.prior.sha256s[
        "prior"] and likelihood.get("held_out")
    return {
        "evaluation": path.parent.name,
        "created_utc": doc.get("created_utc"),
        "split": inputs.get("split"),
        "manifest_digest": inputs.get("manifest_digest"),
        "num_cases": recon.get("num_cases"),
        "reconstruction": {k: _summary(recon["metrics"][k]) for k in _RECONSTRUCTION
                           if k in recon.get("metrics", {})},
        "bits_per_latent": _summary(likelihood["held_out"]) if scored else None,
    }


def model_facts(opened: OpenedModels, metrics: str | Path | None = None) -> dict[str, Any]:
    """The facts of an opened run (see the module doc); an export's are its export.json's."""
    if opened.exported is not None:
        return {k: v for k, v in opened.exported.items() if k not in _EXPORT_ONLY}
    ae = opened.autoencoder
    autoencoder = {
        **_checkpoint_facts(ae.checkpoint, ae.model),  # type: ignore[arg-type]
        "codebook_size": ae.codebook_size,
        "downsampling_factor": int(ae.model.factor),
        "manifest_digest": _recorded_digest(ae),
        "training": training_summary(ae.run_dir),
    }
    prior = None
    if opened.prior is not None:
        p = opened.prior
        prior = {
            **_checkpoint_facts(p.paths.prior_checkpoint, p.prior),  # type: ignore[arg-type]
            "likelihood": p.prior.likelihood,
            "label_field": p.extra.get("label_field") if p.prior.num_classes else None,
            "label_names": list(p.extra.get("label_names") or []),
            "manifest_digest": p.extra["manifest_digest"],
            "training": training_summary(p.paths.run_dir),
        }
    sources = training_sources(ae.run_dir)
    return {
        "kind": autoencoder["kind"] + ("" if prior is None else f" + {prior['kind']}"),
        "autoencoder": autoencoder,
        "prior": prior,
        "grid": {"orientation": "RAS", "spatial_size": list(ae.data.spatial_size),
                 "spacing": list(ae.data.spacing), "latent_shape": list(ae.latent_shape)},
        "data": ae.data.model_dump(mode="json"),
        "manifest_digest": (prior or autoencoder)["manifest_digest"],
        "training_data": sources,
        "licences": sorted({s["licence"] or f"{s['id']}: not recorded"
                            for s in sources["sources"]}),
        "held_out_metrics": held_out_metrics(opened, metrics),
        "mri_vqvae_version": __version__,
    }


_EXPORT_ONLY = ("format", "format_version", "created_utc", "exported_from")


# --- writing an export ---------------------------------------------------------------------------


def _copy_checkpoint(src: Path, dst: Path) -> None:
    """`src`'s weights byte for byte (sha256 checked) and config.json without the resume state."""
    meta = read_meta(src)
    weights = verify_file(src, meta, WEIGHTS)
    dst.mkdir()
    shutil.copyfile(weights, dst / WEIGHTS)
    if sha256_file(dst / WEIGHTS) != meta["files"][WEIGHTS]:
        raise ExportError(f"copying {weights} to {dst} changed its bytes; check the disk")
    doc = {**meta, "files": {WEIGHTS: meta["files"][WEIGHTS]}}
    if isinstance(meta.get("extra"), dict) and "vqvae_checkpoint" in meta["extra"]:
        doc["extra"] = _portable_prior_extra(meta["extra"])
    atomic_write_text(dst / CONFIG, json.dumps(doc, indent=2, allow_nan=False) + "\n")
    atomic_write_text(dst / MARKER, f"{utc_iso()}\n")


def _portable_prior_extra(extra: dict[str, Any]) -> dict[str, Any]:
    """A prior's extra without the training machine's absolute folders: the VQ-VAE is the
    export's own (``../vqvae`` from the prior folder), the latents folder keeps only its name."""
    portable = {**extra, "vqvae_checkpoint": f"../{FOLDERS['autoencoder']}"}
    if extra.get("latents_dir"):
        portable["latents_dir"] = Path(str(extra["latents_dir"])).name
    return portable


def _check_out(out: Path, force: bool) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise ExportError(f"--out {out} is a file; choose a new or empty folder")
    held = sorted(p.name for p in out.iterdir())
    if not held:
        return
    if not force:
        raise ExportError(f"--out {out} is not empty (it holds {held[:5]}); choose a new or "
                          "empty folder, or pass --force to replace an earlier export there")
    if not (out / EXPORT_JSON).is_file():
        raise ExportError(f"--out {out} holds {held[:5]} but no {EXPORT_JSON}: it is not an "
                          "earlier export, so even --force does not replace it; choose another")


def export_run(run: str | Path, out: str | Path, metrics: str | Path | None = None,
               force: bool = False, vqvae: str | Path | None = None) -> Path:
    """Write the export folder of a VQ-VAE or prior run to `out` (see the module doc)."""
    from mri_vqvae.artifacts.model_card import card_markdown

    out = Path(out).expanduser().resolve()
    if folder_kind(Path(run).expanduser()) == "export":
        raise ExportError(f"{run} is already an export; copy the folder to share it")
    _check_out(out, force)
    opened = open_models(run, "cpu", vqvae)
    facts = model_facts(opened, metrics)
    doc = {"format": EXPORT_FORMAT, "format_version": EXPORT_VERSION, "created_utc": utc_iso(),
           "exported_from": {"autoencoder": opened.autoencoder.run_dir.name,
                             "prior": None if opened.prior is None
                             else opened.prior.paths.run_dir.name}, **facts}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out.parent, f".{out.name}.tmp-")
    try:
        checkpoints: dict[Role, tuple[Path, Path]] = {
            "autoencoder": (opened.autoencoder.checkpoint, opened.autoencoder.run_dir)}
        if opened.prior is not None:
            checkpoints["prior"] = (opened.prior.paths.prior_checkpoint,
                                    opened.prior.paths.run_dir)
        if (opened.autoencoder.run_dir / MANIFEST).is_file():
            shutil.copyfile(opened.autoencoder.run_dir / MANIFEST, tmp / MANIFEST)
        for role, (folder, run_dir) in checkpoints.items():
            _copy_checkpoint(folder, tmp / FOLDERS[role])
            if (run_dir / "config.yaml").is_file():
                (tmp / "configs").mkdir(exist_ok=True)
                shutil.copyfile(run_dir / "config.yaml", tmp / "configs" / f"{FOLDERS[role]}.yaml")
        atomic_write_text(tmp / EXPORT_JSON, json.dumps(doc, indent=2, allow_nan=False) + "\n")
        atomic_write_text(tmp / CARD, card_markdown(doc))
        swap_in_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def training_manifest(export: str | Path, data_root: str | Path) -> Manifest:
    """The export's ``manifest.json`` over `data_root`, every real case checked by sha256 (not
    the augmented copies, whose bytes depend on the CPU: docs/architecture.md); `ExportError`
    names the first bad files, or a missing manifest.json."""
    path = Path(export) / MANIFEST
    if not path.is_file():
        raise ExportError(f"{export} has no {MANIFEST} (exported before exports carried it); "
                          "pass the manifest the model was trained on")
    manifest = load_manifest(path, data_root=data_root, check_files=False)
    real = [c for c in manifest.cases if c.origin != "augmented"]
    if problems := file_problems(manifest.data_root, real, checksums=True):
        raise ExportError(f"the data under {manifest.data_root} is not what {path} records "
                          f"({len(problems)} real case(s)): {'; '.join(map(str, problems[:3]))}")
    return manifest

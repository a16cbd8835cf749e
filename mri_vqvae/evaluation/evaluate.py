"""Held-out evaluation of a trained VQ-VAE (and optionally its prior) on the cases of one split.

Each case goes through the deterministic chain of the config the VQ-VAE was trained with, then
the model in eval mode (the codebook never moves). Reconstruction metrics (`quality_of`) are per
case on the [0, 1] scale (the decoder output is clamped to it first), each over the whole volume
and inside the foreground, ``target > FOREGROUND``: PSNR, SSIM, MS-SSIM and NMSE of
`mri_vqvae.evaluation.metrics` (see there for the MS-SSIM settings and the masked forms). Volumes
are
(1, 1, D, H, W) tensors for the metrics, (D, H, W) arrays once preprocessed (`iter_prepared`).

`evaluate_runs` ties these together for `mri-vqvae evaluate`: it refuses anything but a held-out
split of the manifest the VQ-VAE was trained on (`heldout.check_held_out`), summarises per-case
values (`statistics.summarise`), measures samples against the held-out scans
(`sample_metrics`), and writes metrics.json, per_case.csv and report.html (`report`).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from mri_vqvae.artifacts.checkpoint import LoadedCheckpoint, load_checkpoint
from mri_vqvae.artifacts.run_summary import training_summary
from mri_vqvae.config import DataConfig, ExperimentConfig
from mri_vqvae.core import distributed
from mri_vqvae.core.atomic import atomic_write_text
from mri_vqvae.core.errors import CheckpointError, EvaluationError, MriVqvaeError
from mri_vqvae.core.outputs import ensure_writable
from mri_vqvae.data.datasets import case_items
from mri_vqvae.data.kit_sources import citations, run_citations
from mri_vqvae.data.manifest import Manifest
from mri_vqvae.data.preprocessed import with_store
from mri_vqvae.data.transforms import build_transforms
from mri_vqvae.evaluation.heldout import check_held_out, recorded_manifest_digests
from mri_vqvae.evaluation.metrics import (
    MsSsimSettings,
    masked_psnr,
    mean_of,
    ms_ssim_settings,
    multiscale_per_mask,
    nmse,
    plain_float,
    prepare_pair,
    psnr,
    ssim_window,
)
from mri_vqvae.evaluation.sample_metrics import (
    FEATURE_GRID,
    NearestScan,
    code_perplexity,
    gaussian_mmd2,
    mean_pairwise_ms_ssim,
    memorisation_flags,
    pooled_features,
)
from mri_vqvae.evaluation.statistics import BOOTSTRAP_RESAMPLES, CI_LEVEL, summarise
from mri_vqvae.tasks.cases import Failure, run_batch, write_failures

if TYPE_CHECKING:
    from mri_vqvae.artifacts.latents import VQVAESource
    from mri_vqvae.models.autoencoders.vqvae.model import VQVAE
    from mri_vqvae.models.priors.pixelcnn.model import GatedPixelCNN3D
    from mri_vqvae.tasks.sample import PriorRun

log = logging.getLogger(__name__)

FOREGROUND = 0.05  # intensity on the [0, 1] scale above which a voxel counts as foreground
METRIC_KEYS = ("psnr", "ssim", "ms_ssim", "nmse")
FOREGROUND_KEYS = tuple(f"{k}_foreground" for k in METRIC_KEYS)
NOT_FID = (
    "MMD between VQ-VAE encoder features (z_e average-pooled to 2x2x2) of samples and held-out "
    "scans. This is NOT an FID: no pretrained feature network is available offline, and the "
    "features come from the model under test, so it is only comparable between runs that share "
    "the VQ-VAE."
)


# --- per-case reconstruction quality -------------------------------------------------------------


@dataclass(frozen=True)
class CaseQuality:
    """Reconstruction metrics of one case (``*_foreground``: inside ``target > FOREGROUND``)."""

    case_id: str
    subject_id: str
    split: str
    psnr: float
    ssim: float
    nmse: float
    psnr_foreground: float
    codes_used: int
    ms_ssim: float = math.nan
    ssim_foreground: float = math.nan
    ms_ssim_foreground: float = math.nan
    nmse_foreground: float = math.nan


@dataclass(frozen=True)
class QualityReport:
    """Per-case metrics, their means, and codebook usage over all cases together."""

    cases: list[CaseQuality]
    failures: list[Failure]
    codes_used: int
    codebook_size: int

    def summary(self) -> dict[str, Any]:
        """Means over cases plus codebook usage, JSON-ready."""
        keys = ("psnr", "ssim", "nmse", "psnr_foreground", "ms_ssim", "ssim_foreground",
                "ms_ssim_foreground", "nmse_foreground")
        means = {k: mean_of([getattr(c, k) for c in self.cases]) for k in keys}
        return {
            "num_cases": len(self.cases),
            "num_failures": len(self.failures),
            **{f"mean_{k}": v for k, v in means.items()},
            "codes_used": self.codes_used,
            "codebook_size": self.codebook_size,
            "codebook_usage": self.codes_used / self.codebook_size,
            "cases": [asdict(c) for c in self.cases],
        }


def quality_of(pred: Tensor, target: Tensor, item: Mapping[str, Any], indices: Tensor
               ) -> CaseQuality:
    """Every metric of one reconstruction: pred, target (1, 1, D, H, W), indices (1, d, h, w).

    SSIM and MS-SSIM maps are computed once for the whole volume and the foreground together.
    """
    pred, target = prepare_pair(pred, target, 1.0)
    mask = (target > FOREGROUND).float()
    shape = tuple(target.shape[2:])
    ssim_all, ssim_fg = multiscale_per_mask(pred, target, [None, mask],
                                    MsSsimSettings(ssim_window(shape), (1.0,)), relu=False)
    ms_all, ms_fg = multiscale_per_mask(pred, target, [None, mask], ms_ssim_settings(shape))
    return CaseQuality(
        case_id=str(item["case_id"]),
        subject_id=str(item.get("subject_id", "")),
        split=str(item.get("split", "")),
        psnr=float(psnr(pred, target)[0]),
        ssim=float(ssim_all[0]),
        nmse=float(nmse(pred, target)[0]),
        psnr_foreground=float(masked_psnr(pred, target, mask)[0]),
        codes_used=int(indices.unique().numel()),
        ms_ssim=float(ms_all[0]),
        ssim_foreground=float(ssim_fg[0]),
        ms_ssim_foreground=float(ms_fg[0]),
        nmse_foreground=float(nmse(pred, target, mask)[0]),
    )


def experiment_of(loaded: LoadedCheckpoint) -> ExperimentConfig:
    """The experiment config a VQ-VAE checkpoint was trained with (stored in its extra)."""
    raw = loaded.extra.get("experiment")
    if raw is None:
        raise CheckpointError(
            f"{loaded.path}: no experiment config in the checkpoint's extra; it was not written "
            "by train-vqvae, so the preprocessing it expects is unknown"
        )
    return ExperimentConfig.model_validate(raw)


@torch.no_grad()
def case_quality(model: torch.nn.Module, image: torch.Tensor, item: dict[str, Any]
                 ) -> tuple[CaseQuality, torch.Tensor]:
    """Metrics of one preprocessed volume (1, D, H, W); returns them and the code indices."""
    target = plain_float(image).unsqueeze(0)  # (1, 1, D, H, W)
    out = model(target)
    return quality_of(out.reconstruction, target, item, out.indices), out.indices


def evaluate_reconstruction(
    checkpoint: str | Path, manifest: Manifest, split: str, strict: bool = False
) -> QualityReport:
    """Reconstruct every case of `split` with the VQ-VAE in `checkpoint` and measure quality."""
    loaded = load_checkpoint(checkpoint)
    model = loaded.model.eval()
    config = experiment_of(loaded)
    chain = build_transforms(config.data)
    seen: set[int] = set()

    def one(item: dict[str, Any]) -> CaseQuality:
        quality, indices = case_quality(model, chain(dict(item))["image"], item)
        seen.update(indices.unique().tolist())
        return quality

    cases, failures = run_batch(
        case_items(manifest, config.data, split), one, strict=strict, desc=f"evaluate {split}"
    )
    return QualityReport(cases, failures, len(seen), model.config.codebook_size)


# --- preprocessing many cases (optionally in worker processes) -----------------------------------


@dataclass(frozen=True)
class Prepared:
    """One case after the deterministic chain: volume (D, H, W) float32, affine (4, 4) RAS.

    ``error`` holds the reason (and volume/affine are None) when preprocessing failed.
    """

    item: dict[str, Any]
    volume: np.ndarray | None
    affine: np.ndarray | None
    error: str | None = None


def describe_error(exc: BaseException) -> str:
    """One line naming the innermost cause (MONAI wraps reader errors in RuntimeError)."""
    while exc.__cause__ is not None and not isinstance(exc, MriVqvaeError):
        exc = exc.__cause__
    text = str(exc) if isinstance(exc, MriVqvaeError) else f"{type(exc).__name__}: {exc}"
    return text.replace("\n", " ")


class _PreparedCases(Dataset):
    """``ds[i]`` -> `Prepared` of ``items[i]``; errors are caught and described (picklable)."""

    def __init__(self, items: Sequence[dict[str, Any]], data: DataConfig,
                 preprocessed: str | Path | None = None) -> None:
        self.items = list(items)
        self.chain = with_store(build_transforms(data), preprocessed, data)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Prepared:
        item = self.items[i]
        try:
            image = self.chain(dict(item))["image"]
        except Exception as exc:  # any unreadable case is reported, never fatal in a worker
            return Prepared(item, None, None, describe_error(exc))
        volume = plain_float(image)[0].cpu().numpy().astype(np.float32)
        return Prepared(item, volume, np.asarray(image.affine, dtype=np.float64))


def _first(batch: list[Prepared]) -> Prepared:
    return batch[0]


def iter_prepared(items: Sequence[dict[str, Any]], data: DataConfig, num_workers: int = 0,
                  preprocessed: str | Path | None = None) -> Iterator[Prepared]:
    """Preprocess `items` in order with `num_workers` worker processes (0: in this process);
    verified volumes of a `preprocessed` folder are read instead where it has them."""
    if not items:
        return iter(())
    loader = DataLoader(_PreparedCases(items, data, preprocessed), batch_size=1, shuffle=False,
                        num_workers=num_workers, collate_fn=_first)
    return iter(loader)


def progress(total: int, desc: str, enabled: bool = True) -> tqdm:
    """A tqdm bar with ETA on a terminal (off otherwise)."""
    return tqdm(total=total, desc=desc, unit="case", disable=not enabled or not sys.stderr.isatty())


# --- the evaluate command ------------------------------------------------------------------------


@dataclass(frozen=True)
class EvaluateSettings:
    """What `evaluate_runs` measures; ``max_train_cases`` None uses every training case."""

    split: str = "test"
    num_samples: int = 8
    seed: int = 0
    num_resamples: int = BOOTSTRAP_RESAMPLES
    max_train_cases: int | None = None
    report_cases: int = 4
    num_workers: int = 0
    strict: bool = False
    sample_batch_size: int = 8
    sample_threads: int | None = 1
    preprocessed: str | None = None  # a `preprocess` folder read instead of the raw files


@dataclass
class HeldOut:
    """What the held-out pass kept: per-case metrics, volumes (D, H, W), grids (d, h, w)."""

    cases: list[CaseQuality] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    paths: dict[str, str] = field(default_factory=dict)
    volumes: list[np.ndarray] = field(default_factory=list)
    indices: list[Tensor] = field(default_factory=list)
    features: list[np.ndarray] = field(default_factory=list)
    bits: list[float] = field(default_factory=list)
    views: list[tuple[str, np.ndarray, np.ndarray]] = field(default_factory=list)


@dataclass(frozen=True)
class EvaluationResult:
    """Where `evaluate_runs` wrote its files, and metrics.json's content."""

    out_dir: Path
    metrics: dict[str, Any]
    failures: list[Failure]

    @property
    def metrics_path(self) -> Path:
        return self.out_dir / "metrics.json"

    @property
    def per_case_path(self) -> Path:
        return self.out_dir / "per_case.csv"

    @property
    def report_path(self) -> Path:
        return self.out_dir / "report.html"


def default_eval_dir(runs_root: str | Path, run_names: Sequence[str]) -> Path:
    """``runs_root/eval/<UTC>-<run>[_<run>]/``, created (``-2``... on a clash)."""
    from mri_vqvae.artifacts.runs import unique_dir, utc_stamp

    return unique_dir(Path(runs_root) / "eval", f"{utc_stamp()}-{'_'.join(run_names)}")


@torch.no_grad()
def _held_out_pass(model: VQVAE, data: DataConfig, items: list[dict[str, Any]],
                   prior: GatedPixelCNN3D | None, s: EvaluateSettings, device: torch.device
                   ) -> HeldOut:
    """Metrics, grids, encoder features (and bits, with a prior) of every held-out case."""
    held = HeldOut()
    bar = progress(len(items), f"evaluate {s.split}")
    with bar:
        for prepared in iter_prepared(items, data, s.num_workers, s.preprocessed):
            bar.update(1)
            item = prepared.item
            try:
                if prepared.error is not None:
                    raise EvaluationError(prepared.error)
                assert prepared.volume is not None
                target = torch.from_numpy(prepared.volume)[None, None].to(device)
                z_e = model.encode(target)
                q = model.quantize(z_e)
                recon = model.decode(q.quantized).float()
                quality = quality_of(recon.cpu(), target.cpu(), item, q.indices)
            except (MriVqvaeError, OSError, RuntimeError, ValueError) as exc:
                reason = describe_error(exc)
                if s.strict:
                    raise EvaluationError(f"case {item['case_id']} ({item['image']}): {reason}"
                                          ) from None
                log.warning("skipping %s: %s", item["case_id"], reason)
                held.failures.append(Failure(item["case_id"], item["image"], reason))
                continue
            held.cases.append(quality)
            held.paths[quality.case_id] = item["image"]
            held.volumes.append(prepared.volume)
            held.indices.append(q.indices[0].cpu())
            held.features.append(F.adaptive_avg_pool3d(z_e.float(), FEATURE_GRID)
                                 .flatten(1)[0].cpu().numpy())
            if prior is not None:
                held.bits.append(float(prior.grid_bits(q.indices)[0]))
            if len(held.views) < s.report_cases:
                held.views.append((quality.case_id, prepared.volume,
                                   recon[0, 0].clamp(0, 1).cpu().numpy()))
    return held


def _train_items(manifest: Manifest, data: DataConfig, s: EvaluateSettings
                 ) -> list[dict[str, Any]]:
    items = case_items(manifest, data, "train")
    if s.max_train_cases is not None and len(items) > s.max_train_cases:
        rng = np.random.default_rng(s.seed)
        keep = sorted(rng.choice(len(items), size=s.max_train_cases, replace=False).tolist())
        items = [items[i] for i in keep]
    return items


@torch.no_grad()
def _train_pass(model: VQVAE, prior: GatedPixelCNN3D, data: DataConfig,
                items: list[dict[str, Any]], nearest: NearestScan, s: EvaluateSettings,
                device: torch.device) -> tuple[list[float], list[Failure]]:
    """Bits per latent of each training case; streams every training scan into `nearest`."""
    bits: list[float] = []
    failures: list[Failure] = []
    bar = progress(len(items), "train grids")
    with bar:
        for prepared in iter_prepared(items, data, s.num_workers, s.preprocessed):
            bar.update(1)
            item = prepared.item
            if prepared.error is not None or prepared.volume is None:
                log.warning("skipping training case %s: %s", item["case_id"], prepared.error)
                failures.append(Failure(item["case_id"], item["image"], str(prepared.error)))
                continue
            x = torch.from_numpy(prepared.volume)[None, None].to(device)
            bits.extend(prior.grid_bits(model.encode_indices(x)).tolist())
            nearest.update(str(item["case_id"]), prepared.volume)
    return bits, failures


def _reconstruction_block(held: HeldOut, s: EvaluateSettings, spatial: Sequence[int],
                          codebook_size: int) -> dict[str, Any]:
    keys = METRIC_KEYS + FOREGROUND_KEYS + ("codes_used",)
    stats = {k: summarise([getattr(c, k) for c in held.cases], s.num_resamples, s.seed).as_dict()
             for k in keys}
    used = len(set(torch.cat([g.reshape(-1) for g in held.indices]).tolist())) if held.indices \
        else 0
    return {
        "num_cases": len(held.cases),
        "num_failures": len(held.failures),
        "ms_ssim_settings": ms_ssim_settings(spatial).as_dict(),
        "foreground": {"threshold": FOREGROUND,
                       "definition": "voxels of the preprocessed target above the threshold "
                                     "on the [0, 1] intensity scale"},
        "metrics": stats,
        "codebook": {"codebook_size": codebook_size, "codes_used": used,
                     "usage": used / codebook_size,
                     "perplexity": code_perplexity(held.indices, codebook_size)},
    }


def json_ready(obj: Any) -> Any:
    """A JSON-ready copy: NaN and inf become None (JSON has neither), numpy scalars numbers."""
    if isinstance(obj, Mapping):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_per_case(path: Path, held: HeldOut, nearest: NearestScan | None,
                   num_samples: int) -> None:
    """per_case.csv: one row per held-out case (metrics, bits, nearest training scan)."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    cols = ["case_id", "subject_id", "split", *METRIC_KEYS, *FOREGROUND_KEYS, "codes_used"]
    extra = ["bits_per_latent", "nearest_train_case", "nearest_train_r"] if held.bits else []
    writer.writerow(cols + extra)
    for i, case in enumerate(held.cases):
        row: list[Any] = [getattr(case, c) for c in cols]
        if extra:
            ref = None if nearest is None else nearest.best_id[num_samples + i]
            r = math.nan if nearest is None else nearest.best[num_samples + i]
            row += [held.bits[i], ref or "", r]
        writer.writerow(row)
    atomic_write_text(path, buf.getvalue())


def evaluate_runs(
    vqvae_run: str | Path,
    manifest: Manifest,
    out_dir: str | Path | None,
    prior_run: str | Path | None = None,
    settings: EvaluateSettings | None = None,
    device: str | torch.device = "cpu",
    manifest_path: str | Path | None = None,
    runs_root: str | Path = "runs",
) -> EvaluationResult:
    """Evaluate a VQ-VAE run (and a prior run) on a held-out split; write the evaluation folder.

    Files: metrics.json (see docs/evaluation.md for the schema), per_case.csv, failures.csv,
    figures/*.png, samples/ (with a prior) and report.html (self-contained). `out_dir` None
    makes ``runs_root/eval/<UTC>-<runs>/`` once every check has passed.

    Under torchrun the per-case passes (held-out metrics and bits, training bits and nearest
    scans) are sharded across the ranks and gathered in case order; rank 0 alone draws the
    samples and writes every file, and every rank returns the same result.
    """
    from mri_vqvae.artifacts.latents import load_vqvae_source

    s = settings or EvaluateSettings()
    dev = distributed.resolve_device(device)
    source = load_vqvae_source(vqvae_run)
    loaded_extra = load_checkpoint(source.checkpoint).extra
    recorded = recorded_manifest_digests(source.run_dir, loaded_extra)
    guard = check_held_out(manifest, s.split, recorded, f"VQ-VAE run {source.run_dir}")
    prior = _load_prior(prior_run, source, manifest, dev) if prior_run is not None else None
    names = [source.run_dir.name] + ([] if prior is None else [prior.paths.run_dir.name])
    main = distributed.is_main()
    if out_dir is not None:
        out = Path(out_dir)
    else:  # one new folder, made by rank 0
        out = distributed.broadcast_object(default_eval_dir(runs_root, names) if main else None)
    if main:
        ensure_writable(out)
    model = source.model.to(dev).eval()
    items = case_items(manifest, source.data, s.split)
    held = _sharded_held_out_pass(model, source.data, items,
                                  None if prior is None else prior.prior, s, dev)
    if not held.cases:
        raise EvaluationError(
            f"no case of split {s.split!r} could be evaluated ({len(held.failures)} failed: "
            f"{held.failures[0].reason if held.failures else 'none listed'})"
        )
    metrics: dict[str, Any] = {
        "format": "mri-vqvae-evaluation",
        "format_version": 1,
        "inputs": _inputs(source, prior, manifest, manifest_path, s),
        "held_out_check": guard,
        "reconstruction": _reconstruction_block(held, s, source.data.spatial_size,
                                                source.codebook_size),
        "likelihood": None,
        "samples": None,
        "training": [training_summary(source.run_dir)]
        + ([] if prior is None else [training_summary(prior.paths.run_dir)]),
    }
    nearest = None
    failures = list(held.failures)
    sample_volumes_ = None
    if prior is not None:
        sample_volumes_, samples_block = np.zeros((0, *held.volumes[0].shape), np.float32), None
        if s.num_samples > 0:
            drawn = _samples_block(prior, model, held, s, out, dev) if main else None
            sample_volumes_, samples_block = distributed.broadcast_object(drawn)
        nearest = NearestScan(np.concatenate([sample_volumes_, np.stack(held.volumes)]))
        train_items = _train_items(manifest, source.data, s)
        train_bits, train_failures = _sharded_train_pass(model, prior.prior, source.data,
                                                         train_items, nearest, s, dev)
        failures += train_failures
        metrics["likelihood"] = _likelihood_block(held.bits, train_bits, source.codebook_size, s)
        if samples_block is not None:
            samples_block["memorisation"] = _memorisation_block(nearest, s.num_samples, held)
        metrics["samples"] = samples_block
    metrics["failures"] = [asdict(f) for f in failures]
    if main:
        metrics = json_ready(_with_provenance(metrics, dev))
        atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        write_per_case(out / "per_case.csv", held, nearest, s.num_samples)
        write_failures(out / "failures.csv", failures)
        write_report(out, metrics, held, source, prior)
        log.info("wrote metrics.json, per_case.csv and report.html to %s", out)
    metrics = distributed.broadcast_object(metrics)  # the other ranks wait for rank 0 here
    return EvaluationResult(out, metrics, failures)


def _sharded_held_out_pass(model: VQVAE, data: DataConfig, items: list[dict[str, Any]],
                           prior: GatedPixelCNN3D | None, s: EvaluateSettings,
                           device: torch.device) -> HeldOut:
    """`_held_out_pass` over this rank's share of `items`, gathered: every rank gets the whole.

    Shares are contiguous runs of the sorted items gathered in rank order, so the cases come
    back in the order one process keeps them; a strict stop on any rank stops every rank.
    """
    if not distributed.is_distributed():
        return _held_out_pass(model, data, items, prior, s, device)
    error: str | None = None
    try:
        mine = _held_out_pass(model, data, distributed.shard(items), prior, s, device)
    except EvaluationError as exc:
        mine, error = HeldOut(), str(exc)
    log.info("rank %d of %d: evaluated %d held-out case(s), %d failed", distributed.rank(),
             distributed.world_size(), len(mine.cases), len(mine.failures))
    parts = distributed.all_gather_object((mine, error))
    errors = [e for _, e in parts if e is not None]
    if errors:
        raise EvaluationError(errors[0])
    held = HeldOut()
    for part, _ in parts:
        held.cases += part.cases
        held.failures += part.failures
        held.paths.update(part.paths)
        held.volumes += part.volumes
        held.indices += part.indices
        held.features += part.features
        held.bits += part.bits
        held.views += part.views
    held.views = held.views[: s.report_cases]
    return held


def _sharded_train_pass(model: VQVAE, prior: GatedPixelCNN3D, data: DataConfig,
                        items: list[dict[str, Any]], nearest: NearestScan, s: EvaluateSettings,
                        device: torch.device) -> tuple[list[float], list[Failure]]:
    """`_train_pass` over this rank's share; bits, failures and `nearest` of the whole pass.

    Each rank streams its share into a copy of `nearest`; the copies merge in rank order with
    the same strict ``>`` as one stream, so ties keep the earliest training case as before.
    """
    if not distributed.is_distributed():
        return _train_pass(model, prior, data, items, nearest, s, device)
    bits, failures = _train_pass(model, prior, data, distributed.shard(items), nearest, s, device)
    parts = distributed.all_gather_object((bits, failures, nearest.best, nearest.best_id))
    all_bits: list[float] = []
    all_failures: list[Failure] = []
    nearest.best = np.full(len(nearest.queries), -np.inf)
    nearest.best_id = [None] * len(nearest.queries)
    for part_bits, part_failures, best, best_id in parts:
        all_bits += part_bits
        all_failures += part_failures
        for i in np.flatnonzero(best > nearest.best):
            nearest.best[i] = float(best[i])
            nearest.best_id[i] = best_id[i]
    return all_bits, all_failures


def _load_prior(prior_run: str | Path, source: VQVAESource, manifest: Manifest,
                device: torch.device) -> PriorRun:
    """The prior run, checked to model the codes of `source` on `manifest`'s training split."""
    from mri_vqvae.tasks.sample import load_prior_run

    try:
        prior = load_prior_run(prior_run, device, vqvae_checkpoint=source.checkpoint)
    except CheckpointError as exc:
        raise EvaluationError(
            f"the prior run {prior_run} cannot be used with the VQ-VAE {source.checkpoint}: {exc}"
        ) from None
    digest = str(prior.extra.get("manifest_digest"))
    if digest != manifest.digest:
        raise EvaluationError(
            f"the prior {prior.paths.prior_checkpoint} was trained on latents of a manifest with "
            f"digest {digest[:16]}..., not {manifest.name!r} ({manifest.digest[:16]}...); pass "
            "the manifest both runs were trained on"
        )
    if prior.data != source.data:
        raise EvaluationError(
            f"the prior {prior.paths.prior_checkpoint} records a different data config than the "
            f"VQ-VAE {source.checkpoint}; re-encode the latents and retrain the prior"
        )
    return prior


def _inputs(source: VQVAESource, prior: PriorRun | None, manifest: Manifest,
            manifest_path: str | Path | None, s: EvaluateSettings) -> dict[str, Any]:
    return {
        "vqvae_run": str(source.run_dir),
        "vqvae_checkpoint": str(source.checkpoint),
        "vqvae_sha256": source.weights_sha256,
        "prior_run": None if prior is None else str(prior.paths.run_dir),
        "prior_checkpoint": None if prior is None else str(prior.paths.prior_checkpoint),
        "prior_sha256": None if prior is None else prior.sha256s["prior"],
        "manifest_name": manifest.name,
        "manifest_path": None if manifest_path is None else str(Path(manifest_path).resolve()),
        "manifest_digest": manifest.digest,
        "data": source.data.model_dump(mode="json"),
        **{k: v for k, v in asdict(s).items() if k not in ("strict",)},
        "ci_level": CI_LEVEL,
        "data_citations": {"evaluated": citations(manifest),
                           "trained_on": run_citations(source.run_dir)},
    }


def _with_provenance(metrics: dict[str, Any], device: torch.device) -> dict[str, Any]:
    from mri_vqvae.artifacts.runs import describe_device, git_state, package_versions, utc_stamp

    return {**metrics, "created_utc": utc_stamp(), "device": describe_device(device),
            "git": git_state(), "versions": package_versions()}


def _likelihood_block(held_bits: list[float], train_bits: list[float], codebook_size: int,
                      s: EvaluateSettings) -> dict[str, Any]:
    held = summarise(held_bits, s.num_resamples, s.seed)
    train = summarise(train_bits, s.num_resamples, s.seed)
    return {
        "units": "bits per latent (mean -log2 p(code | earlier codes) over a grid), per case",
        "held_out": held.as_dict(),
        "train": train.as_dict(),
        "generalisation_gap": held.mean - train.mean,
        "uniform_bits": math.log2(codebook_size),
        "num_train_cases": len(train_bits),
    }


def _samples_block(prior: PriorRun, model: VQVAE, held: HeldOut, s: EvaluateSettings,
                   out: Path, device: torch.device) -> tuple[np.ndarray, dict[str, Any]]:
    """Draw samples into out/samples/; diversity and feature MMD against the held-out scans."""
    from mri_vqvae.tasks.sample import SampleSettings, decode_volumes, sample_volumes

    settings = SampleSettings(num_samples=s.num_samples, seed=s.seed,
                              batch_size=s.sample_batch_size)
    drawn = sample_volumes(prior, settings, out / "samples", threads=s.sample_threads)
    volumes = np.clip(decode_volumes(prior.vqvae, drawn.indices.to(device)), 0.0, 1.0)
    real = np.stack(held.volumes)
    pick = np.sort(np.random.default_rng(s.seed).permutation(len(real))[: s.num_samples])
    sample_features = pooled_features(model, torch.from_numpy(volumes)[:, None])
    mmd2, bandwidth = gaussian_mmd2(sample_features, np.stack(held.features))
    resolved = settings.resolved(prior)
    return volumes, {
        "num_samples": s.num_samples,
        "seed": s.seed,
        "temperature": resolved.temperature,
        "top_k": resolved.top_k,
        "folder": "samples",
        "diversity": {
            "measure": "mean pairwise MS-SSIM (lower = more diverse)",
            "samples": mean_pairwise_ms_ssim(volumes),
            "held_out": mean_pairwise_ms_ssim(real[pick]),
            "num_held_out_used": int(len(pick)),
        },
        "mmd": {"mmd2": mmd2, "bandwidth": bandwidth, "kernel": "gaussian, median heuristic",
                "estimator": "biased (V-statistic), >= 0",
                "features": f"VQ-VAE z_e average-pooled to {FEATURE_GRID}^3, flattened",
                "num_samples": len(sample_features), "num_held_out": len(held.features),
                "note": NOT_FID},
    }


def _memorisation_block(nearest: NearestScan, num_samples: int, held: HeldOut
                        ) -> dict[str, Any]:
    sample_r, held_r = nearest.best[:num_samples], nearest.best[num_samples:]
    threshold, flags = memorisation_flags(sample_r, held_r)
    return {
        "measure": "Pearson correlation with the nearest training scan (preprocessed grid)",
        "threshold": threshold,
        "rule": "a sample is flagged when it is nearer a training scan than the closest "
                "held-out scan comes (r > threshold)",
        "num_flagged": int(flags.sum()),
        "samples": [{"sample": i, "nearest_train_case": nearest.best_id[i], "r": float(r),
                     "flagged": bool(f)} for i, (r, f) in enumerate(zip(sample_r, flags,
                                                                          strict=True))],
        "held_out": [{"case_id": c.case_id, "nearest_train_case": nearest.best_id[num_samples + i],
                      "r": float(held_r[i])} for i, c in enumerate(held.cases)],
    }


# --- report.html ---------------------------------------------------------------------------------


def write_report(out: Path, metrics: Mapping[str, Any], held: HeldOut, source: VQVAESource,
                 prior: PriorRun | None) -> Path:
    """report.html in `out` (figures in out/figures/, each embedded as a base64 data URI).

    Turns what the evaluate command kept (`HeldOut`, the runs) into `report`'s plain views; the
    page itself is `report.evaluation_report`. Likelihood maps (`synthesis.likelihood_map`) are
    computed here for the cases shown.
    """
    from mri_vqvae.artifacts.runs import read_metrics
    from mri_vqvae.evaluation.report import CaseView, LikelihoodView, RunCurves, evaluation_report

    by_id = {c.case_id: c for c in held.cases}
    views = [CaseView(cid, image, recon, asdict(by_id[cid])) for cid, image, recon in held.views]
    likelihoods = []
    runs = [RunCurves("vqvae", source.run_dir.name, read_metrics(source.run_dir))]
    if prior is not None:
        from mri_vqvae.tasks.sample import likelihood_map

        for cid, _, _ in held.views:
            result = likelihood_map(prior, held.paths[cid])
            likelihoods.append(LikelihoodView(cid, result.image, result.bits_map,
                                              result.mean_bits))
        runs.append(RunCurves("prior", prior.paths.run_dir.name,
                              read_metrics(prior.paths.run_dir)))
    return evaluation_report(out, metrics, views, likelihoods, runs,
                             [asdict(c) for c in held.cases], source.data.spacing)

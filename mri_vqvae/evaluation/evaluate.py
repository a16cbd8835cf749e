"""`mri-vqvae evaluate`: a trained VQ-VAE (and optionally a prior of any kind) on a held-out split.

`evaluate_runs` refuses anything but a held-out split of the manifest the VQ-VAE was trained on
(`heldout.check_held_out`), then runs the per-case passes (`passes`): every held-out case is
preprocessed, reconstructed and measured once (`quality`), its grid scored under the prior; with a
prior it draws samples (`samples`), scores the training grids, finds each volume's nearest
training scan and checks the samples' anatomical plausibility against the held-out scans. The
numbers go to metrics.json (`blocks`; per-case summaries by `statistics`), per_case.csv,
failures.csv and (with samples) plausibility.csv, and report.html (`report.evaluation_report`)
shows them with the figures of what the held-out pass kept.

The held-out pass can be cut into jobs (``evaluate --part I/N``, e.g. a SLURM array):
`evaluate_part` records part I's share under ``OUT/parts/``; the same command without ``--part``
into that OUT reads the parts back instead of evaluating those cases, does the rest and writes
the files one process writes (`held_parts`).
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mri_vqvae.artifacts.checkpoint import load_checkpoint
from mri_vqvae.artifacts.run_summary import training_summary
from mri_vqvae.core import distributed
from mri_vqvae.core.atomic import atomic_write_text
from mri_vqvae.core.device import resolve_device
from mri_vqvae.core.errors import CheckpointError, EvaluationError
from mri_vqvae.core.jsonio import json_ready
from mri_vqvae.core.outputs import ensure_writable
from mri_vqvae.core.provenance import describe_device, git_state, package_versions, utc_stamp
from mri_vqvae.data.datasets import case_items
from mri_vqvae.data.manifest import Manifest
from mri_vqvae.evaluation.blocks import (
    inputs_block,
    likelihood_block,
    memorisation_block,
    reconstruction_block,
    unigram_case_bits,
)
from mri_vqvae.evaluation.healing import Healer
from mri_vqvae.evaluation.held_parts import (
    PartResult,
    finished_parts,
    part_header,
    record_part,
)
from mri_vqvae.evaluation.heldout import (
    check_held_out,
    recorded_manifest_digests,
    training_manifest_copy,
)
from mri_vqvae.evaluation.lesions import lesion_block
from mri_vqvae.evaluation.passes import (
    HeldOut,
    PassSettings,
    Scorer,
    TrainPass,
    held_out_pass,
    train_pass,
)
from mri_vqvae.evaluation.report.evaluation_report import RunCurves, evaluation_report
from mri_vqvae.evaluation.samples import (
    draw_and_measure,
    plausibility_block,
    write_plausibility_csv,
)
from mri_vqvae.metrics.image import CASE_METRICS
from mri_vqvae.metrics.plausibility import RegistrationSettings
from mri_vqvae.metrics.sets import NearestScan
from mri_vqvae.metrics.statistics import BOOTSTRAP_RESAMPLES
from mri_vqvae.tasks.cases import Failure, write_failures
from mri_vqvae.tasks.parts import Part, clear_parts, part_lock, refuse_distributed
from mri_vqvae.tasks.sample import SampleSettings, class_labels

if TYPE_CHECKING:
    from mri_vqvae.artifacts.loading import AutoencoderRun, PriorRun

log = logging.getLogger(__name__)


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
    temperature: float | None = None  # sampling options; None: the prior config's
    top_k: int | None = None
    preprocessed: str | None = None  # a `preprocess` folder read instead of the raw files
    viewer: bool = True  # report.html with the interactive 3D viewers (about 1 MB more)

    def passes(self) -> PassSettings:
        """How the per-case passes run."""
        return PassSettings(self.num_workers, self.preprocessed, self.strict, self.report_cases)


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


@dataclass(frozen=True)
class _Inputs:
    """The checked inputs of an evaluation: the VQ-VAE run, what `check_held_out` checked, and
    the prior run with its scorer (both None without a prior)."""

    source: AutoencoderRun
    guard: dict[str, Any]
    prior: PriorRun | None
    scorer: Scorer | None


def default_eval_dir(runs_root: str | Path, run_names: Sequence[str]) -> Path:
    """``runs_root/eval/<UTC>-<run>[_<run>]/``, created (``-2``... on a clash)."""
    from mri_vqvae.artifacts.runs import unique_dir

    return unique_dir(Path(runs_root) / "eval", f"{utc_stamp()}-{'_'.join(run_names)}")


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

    When `out_dir` holds ``parts/`` (`evaluate_part` runs), their records stand in for the
    held-out pass once every part has finished with this run's header (`PartError` otherwise,
    nothing written); ``parts/`` is removed after the files are written.
    """
    s = settings or EvaluateSettings()
    dev = resolve_device(device)
    inputs = _open_inputs(vqvae_run, manifest, prior_run, s.split, dev)
    out = _out_dir(out_dir, runs_root, inputs.source, inputs.prior)
    items = case_items(manifest, inputs.source.data, s.split)
    header = part_header(inputs.source, inputs.prior, manifest, s.split, s.report_cases)
    with finished_parts(out, header, [str(i["case_id"]) for i in items], s.report_cases,
                        s.strict) as stored:
        held = stored if stored is not None else held_out_pass(
            inputs.source.model.eval(), inputs.source.data, items, inputs.scorer, s.passes(), dev)
        result = _measure_and_write(out, held, inputs, manifest, manifest_path, s, dev)
        if stored is not None and distributed.is_main():
            clear_parts(out)  # their records are in the files now
    return result


def evaluate_part(
    vqvae_run: str | Path,
    manifest: Manifest,
    out_dir: str | Path,
    part: Part,
    prior_run: str | Path | None = None,
    settings: EvaluateSettings | None = None,
    device: str | torch.device = "cpu",
) -> PartResult:
    """Part `part` of the held-out pass, recorded under ``out_dir/parts/<I>-of-<N>/``.

    The same checks as `evaluate_runs`, then only the part's contiguous share of the held-out
    cases is evaluated; no metrics.json or report is written (see the module doc: the final
    `evaluate_runs` into `out_dir` reads the parts). A strict stop raises `EvaluationError` and
    leaves the part unfinished (no part.json); a rerun of the part starts it again.
    """
    refuse_distributed(part)
    s = settings or EvaluateSettings()
    dev = resolve_device(device)
    inputs = _open_inputs(vqvae_run, manifest, prior_run, s.split, dev)
    out = Path(out_dir)
    header = part_header(inputs.source, inputs.prior, manifest, s.split, s.report_cases)
    with part_lock(out, part) as folder:
        items = part.take(case_items(manifest, inputs.source.data, s.split))
        held = held_out_pass(inputs.source.model.eval(), inputs.source.data, items,
                             inputs.scorer, s.passes(), dev)
        done = record_part(out, folder, part, header, held)
    log.info("part %d/%d: evaluated %d held-out case(s), %d failed, recorded in %s",
             part.index, part.count, len(done.evaluated), len(done.failures), folder)
    return done


def _open_inputs(vqvae_run: str | Path, manifest: Manifest, prior_run: str | Path | None,
                 split: str, device: torch.device) -> _Inputs:
    """The VQ-VAE run (checked to be evaluated on a held-out `split` of `manifest`) and the
    prior run with its scorer; `EvaluationError` when they cannot be evaluated together."""
    from mri_vqvae.artifacts.loading import open_autoencoder_run

    source = open_autoencoder_run(vqvae_run, device)
    recorded = recorded_manifest_digests(source.run_dir, load_checkpoint(source.checkpoint).extra)
    guard = check_held_out(manifest, split, recorded, f"VQ-VAE run {source.run_dir}",
                           training_manifest_copy(source.run_dir))
    prior = None if prior_run is None else _open_prior(prior_run, source, manifest, device)
    scorer = None if prior is None else _scorer(prior, manifest)
    return _Inputs(source, guard, prior, scorer)


def _measure_and_write(out: Path, held: HeldOut, inputs: _Inputs, manifest: Manifest,
                       manifest_path: str | Path | None, s: EvaluateSettings,
                       dev: torch.device) -> EvaluationResult:
    """From the held-out pass on: the prior's passes, metrics.json, the tables and the report
    (rank 0 writes; every rank returns the same result)."""
    source, prior, scorer = inputs.source, inputs.prior, inputs.scorer
    model = source.model.eval()
    if not held.cases:
        raise EvaluationError(
            f"no case of split {s.split!r} could be evaluated ({len(held.failures)} failed: "
            f"{held.failures[0].reason if held.failures else 'none listed'})"
        )
    metrics: dict[str, Any] = {
        "format": "mri-vqvae-evaluation",
        "format_version": 1,
        "inputs": inputs_block(source, prior, manifest, manifest_path,
                               {k: v for k, v in asdict(s).items()
                                if k not in ("strict", "viewer")}),
        "held_out_check": inputs.guard,
        "reconstruction": reconstruction_block(held, s.num_resamples, s.seed,
                                               source.data.spatial_size, source.codebook_size),
        "likelihood": None,
        "samples": None,
        "training": [training_summary(source.run_dir)]
        + ([] if prior is None else [training_summary(prior.paths.run_dir, "prior")]),
    }
    nearest, train = None, TrainPass()
    if prior is not None and scorer is not None:
        nearest, train, metrics["likelihood"], metrics["samples"] = _prior_passes(
            prior, scorer, model, held, manifest, source, s, out, dev)
    failures = held.failures + train.failures
    metrics["failures"] = [asdict(f) for f in failures]
    if distributed.is_main():
        metrics = json_ready({**metrics, "created_utc": utc_stamp(),
                              "device": describe_device(dev), "git": git_state(),
                              "versions": package_versions()})
        atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        write_per_case(out / "per_case.csv", held, train, nearest, s.num_samples,
                       source.codebook_size)
        write_failures(out / "failures.csv", failures)
        if metrics["samples"] is not None:
            write_plausibility_csv(out / "plausibility.csv", metrics["samples"]["plausibility"])
        runs = [RunCurves.of("vqvae", source.run_dir)]
        runs += [] if prior is None else [RunCurves.of("prior", prior.paths.run_dir)]
        evaluation_report(out, metrics, held.cases, held.views, runs, source.data.spacing,
                          s.viewer)
        log.info("wrote metrics.json, per_case.csv and report.html to %s", out)
    metrics = distributed.broadcast_object(metrics)  # the other ranks wait for rank 0 here
    return EvaluationResult(out, metrics, failures)


def _out_dir(out_dir: str | Path | None, runs_root: str | Path, source: AutoencoderRun,
             prior: PriorRun | None) -> Path:
    """`out_dir`, or one new default folder made by rank 0; checked for writes by rank 0."""
    main = distributed.is_main()
    if out_dir is not None:
        out = Path(out_dir)
    else:
        names = [source.run_dir.name] + ([] if prior is None else [prior.paths.run_dir.name])
        out = distributed.broadcast_object(default_eval_dir(runs_root, names) if main else None)
    if main:
        ensure_writable(out)
    return out


def _prior_passes(prior: PriorRun, scorer: Scorer, model: Any, held: HeldOut,
                  manifest: Manifest, source: AutoencoderRun, s: EvaluateSettings, out: Path,
                  device: torch.device
                  ) -> tuple[NearestScan, TrainPass, dict[str, Any], dict[str, Any] | None]:
    """Samples (rank 0), training bits and nearest scans, the lesion block and the samples'
    plausibility checks (rank 0): (nearest, train pass, the likelihood block, the samples block
    or None without samples)."""
    drawn: tuple[np.ndarray, dict[str, Any] | None] = (
        np.zeros((0, *held.volumes[0].shape), np.float32), None)
    if s.num_samples > 0:
        draw = SampleSettings(num_samples=s.num_samples, seed=s.seed, temperature=s.temperature,
                              top_k=s.top_k, batch_size=s.sample_batch_size)
        mine = draw_and_measure(prior, model, held, draw, out, s.sample_threads) \
            if distributed.is_main() else None
        drawn = distributed.broadcast_object(mine)
    sample_volumes, samples_block = drawn
    nearest = NearestScan(np.concatenate([sample_volumes, np.stack(held.volumes)]))
    field = class_labels(prior).field  # the label field of a conditional prior, else None
    groups = None if field is None else {c.case_id: str(getattr(c, field)) for c in manifest.cases}
    train = train_pass(model, scorer, source.data, _train_items(manifest, source, s), nearest,
                       s.passes(), device, groups, _real_train_cases(manifest))
    likelihood = likelihood_block(held, train, prior.prior, source.codebook_size,
                                  s.num_resamples, s.seed)
    lesions = lesion_block(  # rank 0: the healing draws are the same on every rank
        held, train, source.codebook_size, model.factor, source.data.spacing, out / "figures",
        Healer(model, scorer, s.seed)) if distributed.is_main() else None
    likelihood["lesions"] = distributed.broadcast_object(lesions)
    if samples_block is not None:
        samples_block["memorisation"] = memorisation_block(nearest, s.num_samples, held)
        volume_groups = None if groups is None else \
            list(samples_block["labels"]) + [groups.get(c.case_id) for c in held.cases]
        plausible = plausibility_block(
            sample_volumes, np.stack(held.volumes), [c.case_id for c in held.cases],
            train.mean_volume(), train.num_volumes, source.data.spacing,
            RegistrationSettings(seed=s.seed), volume_groups,
            train.group_means()) if distributed.is_main() else None
        samples_block["plausibility"] = distributed.broadcast_object(plausible)
    return nearest, train, likelihood, samples_block


def _real_train_cases(manifest: Manifest) -> set[str] | None:
    """The training cases that are scans, not augmented copies (the plausibility references);
    None (all) when every training case is a copy."""
    real = {c.case_id for c in manifest.cases if c.split == "train" and c.origin != "augmented"}
    return real or None


def _train_items(manifest: Manifest, source: AutoencoderRun, s: EvaluateSettings
                 ) -> list[dict[str, Any]]:
    """The training cases read; with ``max_train_cases`` a seeded subset that takes real scans
    before augmented copies (so the references are real anatomy), in manifest order."""
    items = case_items(manifest, source.data, "train")
    if s.max_train_cases is not None and len(items) > s.max_train_cases:
        real = _real_train_cases(manifest) or set()
        order = np.random.default_rng(s.seed).permutation(len(items)).tolist()
        order.sort(key=lambda i: items[i]["case_id"] not in real)  # stable: real scans first
        items = [items[i] for i in sorted(order[:s.max_train_cases])]
    return items


def _open_prior(prior_run: str | Path, source: AutoencoderRun, manifest: Manifest,
                device: torch.device) -> PriorRun:
    """The prior run, checked to model the codes of `source` on `manifest`'s training split."""
    from mri_vqvae.artifacts.loading import open_prior_run

    try:
        prior = open_prior_run(prior_run, source.checkpoint, device=device)
    except CheckpointError as exc:
        raise EvaluationError(
            f"the prior run {prior_run} cannot be used with the VQ-VAE {source.checkpoint}: {exc}"
        ) from None
    digest = str(prior.extra.get("manifest_digest"))
    if not manifest.matches(digest):
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


def _scorer(prior: PriorRun, manifest: Manifest) -> Scorer:
    """The prior with each case's class (its manifest field ``label_field``) when conditional."""
    classes = class_labels(prior)
    if not classes.names:
        return Scorer(prior.prior)
    index = {name: i for i, name in enumerate(classes.names)}
    values = {c.case_id: str(getattr(c, str(classes.field))) for c in manifest.cases}
    return Scorer(prior.prior, {cid: index[v] for cid, v in values.items() if v in index})


def write_per_case(path: Path, held: HeldOut, train: TrainPass, nearest: NearestScan | None,
                   num_samples: int, codebook_size: int) -> None:
    """per_case.csv: one row per held-out case, in case order: `CASE_METRICS` and codes used;
    with a prior also its bits, the unigram baseline's and the nearest training scan."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    cols = ["case_id", "subject_id", "split", *CASE_METRICS, "codes_used"]
    extra = ["bits_per_latent", "unigram_bits_per_latent", "nearest_train_case",
             "nearest_train_r"] if held.bits else []
    writer.writerow(cols + extra)
    unigram = unigram_case_bits(train.grids, held.indices, codebook_size) if extra else []
    for i, case in enumerate(held.cases):
        row: list[Any] = [getattr(case, c) for c in cols]
        if extra:
            assert nearest is not None
            row += [held.bits[i], unigram[i], nearest.best_id[num_samples + i] or "",
                    nearest.best[num_samples + i]]
        writer.writerow(row)
    atomic_write_text(path, buf.getvalue())

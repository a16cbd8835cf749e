"""Run folders: where a training run writes, and the life cycle of what it records.

::

    runs/<stage>/<UTC YYYYmmddTHHMMSSZ>-<config>-s<seed>/
        config.yaml     the resolved ExperimentConfig (dump_config)
        manifest.json   a byte copy of the dataset manifest the run used
        run.json        argv, seed, git, versions, device, manifest digest, start/end, status,
                        resumed_from history
        metrics.jsonl   one JSON object per logged step: {"step", "epoch", "split", "time", ...}
        tb/             TensorBoard scalars ("<split>/<name>")
        previews/       images written during training
        checkpoints/    see mri_vqvae.artifacts.checkpoint

Only rank 0 writes: with ``rank != 0`` every method of `RunRecorder` is a no-op.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import torch

from mri_vqvae.config import ExperimentConfig, config_digest, dump_config
from mri_vqvae.core.atomic import atomic_path, atomic_write_text
from mri_vqvae.core.errors import MriVqvaeError
from mri_vqvae.core.jsonio import json_ready
from mri_vqvae.core.outputs import ensure_writable, output_error
from mri_vqvae.core.provenance import (
    describe_device,
    git_state,
    package_versions,
    utc_iso,
    utc_stamp,
)

log = logging.getLogger(__name__)

RUN_JSON = "run.json"
METRICS = "metrics.jsonl"
STATUSES = ("running", "completed", "failed", "interrupted")
_NAME_RE = re.compile(r"[^A-Za-z0-9._-]+")


class RunDirError(MriVqvaeError):
    """A run directory that is missing, already used, or not a run directory."""


# --- small helpers -------------------------------------------------------------------------------


def new_run_dir(
    root: str | Path, stage: str, config_name: str, seed: int, now: _dt.datetime | None = None
) -> Path:
    """Create and return ``root/<stage>/<UTC>-<config>-s<seed>/`` (``-2``, ``-3``... on a clash).

    Creation is atomic (mkdir), so two runs started in the same second get different folders;
    a root that cannot take writes raises `OutputError` before anything runs.
    """
    safe = _NAME_RE.sub("-", str(config_name)).strip("-.") or "config"
    return unique_dir(Path(root) / stage, f"{utc_stamp(now)}-{safe}-s{int(seed)}")


def unique_dir(parent: str | Path, base: str) -> Path:
    """Create and return ``parent/base`` (``base-2``, ``base-3``... if taken), atomically.

    `parent` is checked up front with `ensure_writable`: read-only, full or not a folder raises
    `mri_vqvae.core.outputs.OutputError` naming it.
    """
    parent = ensure_writable(parent)
    for n in range(1, 10_000):
        path = parent / (base if n == 1 else f"{base}-{n}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        except OSError as exc:
            raise output_error(parent, exc) from None
        return path
    raise RunDirError(f"could not create a new folder under {parent}: too many named {base}")


def _metrics_path(path: str | Path) -> Path:
    path = Path(path)
    return path / METRICS if path.is_dir() else path


def read_metrics(path: str | Path, split: str | None = None) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file (or a run folder), optionally of one split.

    A line cut short by a kill is skipped with a warning.
    """
    path = _metrics_path(path)
    if not path.is_file():
        return []
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s:%d is not a JSON line (cut short by a kill?); skipped", path, n)
            continue
        if split is None or record.get("split") == split:
            records.append(record)
    return records


def _step_of(line: str) -> int | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return int(record.get("step", 0)) if isinstance(record, dict) else None


def truncate_metrics(path: str | Path, step: int) -> int:
    """Drop records with ``step`` > `step` (and broken lines); returns how many were dropped."""
    path = _metrics_path(path)
    if not path.is_file():
        return 0
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    kept = [line for line in lines if (s := _step_of(line)) is not None and s <= step]
    dropped = len(lines) - len(kept)
    if dropped:
        atomic_write_text(path, "".join(f"{line}\n" for line in kept))
    return dropped


def manifest_digest(path: str | Path) -> str | None:
    """The ``digest`` a manifest file records, else the content digest of its JSON document;
    None when it is not a readable JSON object."""
    from mri_vqvae.data.manifest import content_digest

    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(doc, dict):
        return None
    return str(doc["digest"]) if doc.get("digest") else content_digest(doc)


# --- the recorder --------------------------------------------------------------------------------


class RunRecorder:
    """Writes a run folder's provenance, metrics and status; a context manager.

    ``with RunRecorder(run_dir, cfg, manifest=path) as rec: ... rec.log_metrics(...)`` marks
    run.json ``completed`` on a clean exit, ``interrupted`` on KeyboardInterrupt and ``failed``
    (with the error type and message) on any other exception. Pass `resume_step` (and the
    checkpoint in `resumed_from`) to continue a run: metrics past that step are dropped first.
    """

    def __init__(
        self,
        run_dir: str | Path,
        config: ExperimentConfig | None = None,
        *,
        seed: int | None = None,
        manifest: str | Path | None = None,
        argv: Sequence[str] | None = None,
        device: str | torch.device | None = None,
        rank: int = 0,
        tensorboard: bool = True,
        resume_step: int | None = None,
        resumed_from: str | Path | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.config = config
        self.seed = seed if seed is not None else (config.seed if config is not None else None)
        self.manifest = Path(manifest) if manifest is not None else None
        self.argv = list(sys.argv if argv is None else argv)
        self.device = device
        self.rank = rank
        self.enabled = rank == 0
        self.use_tensorboard = tensorboard
        self.resume_step = resume_step
        self.resumed_from = resumed_from
        self.info: dict[str, Any] = {}
        self._metrics_fh: IO[str] | None = None
        self._writer: Any = None

    # paths
    @property
    def run_json(self) -> Path:
        return self.run_dir / RUN_JSON

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / METRICS

    @property
    def previews_dir(self) -> Path:
        return self.run_dir / "previews"

    @property
    def checkpoints_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def preview_path(self, name: str) -> Path:
        """Where to write a preview image called `name` (the folder exists on rank 0)."""
        return self.previews_dir / name

    # lifecycle
    def start(self) -> RunRecorder:
        """Write config.yaml, manifest.json and run.json (status ``running``)."""
        if not self.enabled:
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.previews_dir.mkdir(exist_ok=True)
        if self.resume_step is not None:
            self._start_resumed()
        else:
            self._start_fresh()
        self._write_info()
        return self

    def _start_fresh(self) -> None:
        if self.run_json.exists():
            raise RunDirError(
                f"{self.run_json} exists: this folder already holds a run; make a new one with "
                "new_run_dir() or pass resume_step=... to continue it"
            )
        if self.config is not None:
            atomic_write_text(self.run_dir / "config.yaml", dump_config(self.config))
        data_digest = self._copy_manifest()
        self.info = {
            "stage": self.run_dir.parent.name,
            "run": self.run_dir.name,
            "argv": self.argv,
            "seed": self.seed,
            "config_name": None if self.config is None else self.config.name,
            "config_digest": None if self.config is None else config_digest(self.config),
            "git": git_state(),
            "versions": package_versions(),
            "device": describe_device(self.device),
            "manifest_path": None if self.manifest is None else str(Path(self.manifest).resolve()),
            "manifest_digest": data_digest,
            "started_utc": utc_iso(),
            "ended_utc": None,
            "status": "running",
            "error": None,
            "resumed_from": [],
        }

    def _start_resumed(self) -> None:
        try:
            self.info = json.loads(self.run_json.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise RunDirError(
                f"cannot resume {self.run_dir}: {RUN_JSON} is missing or unreadable ({exc}); "
                "start a new run instead"
            ) from None
        assert self.resume_step is not None
        dropped = truncate_metrics(self.metrics_path, self.resume_step)
        digest = None if self.config is None else config_digest(self.config)
        if digest is not None and digest != self.info.get("config_digest"):
            log.warning("resuming %s with a different config than it started with", self.run_dir)
        data_digest = None if self.manifest is None else manifest_digest(self.manifest)
        if data_digest is not None and data_digest != self.info.get("manifest_digest"):
            log.warning("resuming %s with a different manifest than it started with", self.run_dir)
        self.info.setdefault("resumed_from", []).append(
            {
                "checkpoint": None if self.resumed_from is None else str(self.resumed_from),
                "step": int(self.resume_step),
                "at_utc": utc_iso(),
                "previous_status": self.info.get("status"),
                "argv": self.argv,
                "git": git_state(),
                "device": describe_device(self.device),
                "config_digest": digest,
                "manifest_digest": data_digest,
                "dropped_metric_lines": dropped,
            }
        )
        self.info.update(status="running", ended_utc=None, error=None)

    def _copy_manifest(self) -> str | None:
        if self.manifest is None:
            return None
        if not self.manifest.is_file():
            raise RunDirError(f"manifest {self.manifest} does not exist; pass the manifest used")
        with atomic_path(self.run_dir / "manifest.json") as tmp:
            shutil.copyfile(self.manifest, tmp)
        return manifest_digest(self.manifest)

    def _write_info(self) -> None:
        atomic_write_text(self.run_json, json.dumps(self.info, indent=2, default=str) + "\n")

    def update(self, **fields: Any) -> None:
        """Add or change top-level run.json fields (e.g. ``best_checkpoint=...``)."""
        if self.enabled:
            self.info.update(fields)
            self._write_info()

    def finish(self, status: str, error: BaseException | None = None) -> None:
        """Close metric files and mark run.json with `status` (and the error, if any)."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        if not self.enabled:
            return
        self.close()
        self.info.update(status=status, ended_utc=utc_iso())
        if error is not None:
            self.info["error"] = {"type": type(error).__qualname__, "message": str(error)}
        self._write_info()

    def close(self) -> None:
        """Close the metrics file and the TensorBoard writer (reopened on the next log)."""
        if self._metrics_fh is not None:
            self._metrics_fh.close()
            self._metrics_fh = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> RunRecorder:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None or (isinstance(exc, SystemExit) and exc.code in (0, None)):
            self.finish("completed")
        elif isinstance(exc, KeyboardInterrupt):
            self.finish("interrupted", exc)
        else:
            self.finish("failed", exc)

    # metrics
    def log_metrics(self, step: int, epoch: int, split: str, **values: Any) -> None:
        """Append one record to metrics.jsonl (flushed and fsynced) and to TensorBoard."""
        if not self.enabled:
            return
        clean = json_ready(values)
        record = {"step": int(step), "epoch": int(epoch), "split": split, "time": utc_iso()}
        record.update(clean)
        if self._metrics_fh is None:
            self._metrics_fh = open(self.metrics_path, "a", encoding="utf-8")  # noqa: SIM115
        self._metrics_fh.write(json.dumps(record, allow_nan=False) + "\n")
        self._metrics_fh.flush()
        os.fsync(self._metrics_fh.fileno())
        writer = self._tensorboard()
        if writer is not None:
            for key, value in clean.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    writer.add_scalar(f"{split}/{key}", value, int(step))
            writer.flush()

    def _tensorboard(self) -> Any:
        if not self.use_tensorboard:
            return None
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if self.resume_step is None else self.resume_step + 1
            self._writer = SummaryWriter(log_dir=str(self.run_dir / "tb"), purge_step=purge)
        return self._writer

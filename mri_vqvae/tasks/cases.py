"""Work over many manifest cases: preparing them (optionally in worker processes), applying a
step to each, and recording a bad case instead of stopping unless `strict`.

Items are the dicts of `mri_vqvae.data.datasets.case_items`; a prepared case holds its volume
(D, H, W) float32 on the preprocessed grid and its (4, 4) RAS affine.
"""

from __future__ import annotations

import csv
import io
import logging
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from mri_vqvae.config import DataConfig
from mri_vqvae.core.atomic import atomic_write_text
from mri_vqvae.core.errors import MriVqvaeError, describe_error, innermost_error
from mri_vqvae.core.outputs import output_cause, output_error
from mri_vqvae.data.preprocessed import with_store
from mri_vqvae.data.transforms import build_transforms

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Failure:
    """A case that could not be processed."""

    case_id: str
    path: str
    reason: str


def progress(total: int, desc: str, enabled: bool = True) -> tqdm:
    """A tqdm bar over cases with ETA on a terminal (off otherwise)."""
    return tqdm(total=total, desc=desc, unit="case", disable=not enabled or not sys.stderr.isatty())


def run_batch(
    items: Iterable[dict[str, Any]],
    process: Callable[[dict[str, Any]], T],
    strict: bool = False,
    desc: str = "cases",
    out_dir: str | Path | None = None,
) -> tuple[list[T], list[Failure]]:
    """Apply `process` to each item; failures are collected (or re-raised when `strict`).

    Expected failures are the project's own errors and OS errors; a MONAI transform wraps an
    inner error in RuntimeError, so the innermost cause is reported. An output-side OSError
    (disk full, quota, read-only, or any error on a path inside `out_dir`; see
    `mri_vqvae.core.outputs.output_cause`) is no case's fault: it stops the batch with
    `OutputError`.
    """
    items = list(items)
    results: list[T] = []
    failures: list[Failure] = []
    for item in tqdm(items, desc=desc, unit="case", disable=not sys.stderr.isatty()):
        try:
            results.append(process(item))
        except (MriVqvaeError, OSError, RuntimeError, ValueError) as exc:
            cause = output_cause(exc, out_dir)
            if cause is not None:
                raise output_error(out_dir, cause) from exc
            if strict:
                raise innermost_error(exc) from None
            reason = describe_error(exc)
            log.warning("skipping %s: %s", item.get("case_id"), reason)
            failures.append(Failure(str(item.get("case_id")), str(item.get("image")), reason))
    return results, failures


# --- preparing cases (optionally in worker processes) --------------------------------------------


@dataclass(frozen=True)
class Prepared:
    """One case after the deterministic chain: volume (D, H, W) float32, affine (4, 4) RAS.

    ``error`` holds the reason (and volume/affine are None) when preprocessing failed.
    """

    item: dict[str, Any]
    volume: np.ndarray | None
    affine: np.ndarray | None
    error: str | None = None


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
        volume = np.asarray(image[0].detach().cpu(), dtype=np.float32)
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


# --- reporting failures --------------------------------------------------------------------------


def write_failures(path: str | Path, failures: list[Failure]) -> None:
    """`failures.csv` with columns case_id, path, reason (header only when nothing failed)."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["case_id", "path", "reason"])
    for f in failures:
        writer.writerow([f.case_id, f.path, f.reason])
    atomic_write_text(path, buf.getvalue())


def failures_table(failures: list[Failure]) -> str:
    """A plain-text table of failures for the terminal."""
    if not failures:
        return "no failures"
    width = max(len(f.path) for f in failures)
    lines = [f"{'file':<{width}}  reason", f"{'-' * width}  ------"]
    lines += [f"{f.path:<{width}}  {f.reason}" for f in failures]
    return "\n".join(lines)

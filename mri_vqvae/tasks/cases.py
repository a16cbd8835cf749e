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
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from mri_vqvae.config import DataConfig
from mri_vqvae.core.atomic import atomic_write_text
from mri_vqvae.core.clock import StepClock, format_duration
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


PROGRESS_EVERY_S = 30.0  # the progress log line's period where no bar is seen


def bar_visible() -> bool:
    """Whether a tqdm bar is seen: stderr is a terminal, or this runs in a Jupyter kernel."""
    if sys.stderr.isatty():
        return True
    get_ipython = getattr(sys.modules.get("IPython"), "get_ipython", None)
    return get_ipython is not None and getattr(get_ipython(), "kernel", None) is not None


class CaseProgress:
    """Progress over cases: a tqdm bar where one is seen (terminal, notebook: `tqdm.auto`), else
    a log line ``encode: 120/1000 cases  3.20 cases/s  ETA 4.6 min`` at the first case and every
    `every_s` seconds (cluster logs); rate and ETA are `mri_vqvae.core.clock.StepClock`'s.
    """

    def __init__(self, total: int, desc: str, enabled: bool = True,
                 every_s: float = PROGRESS_EVERY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        visible = enabled and bar_visible()
        self.desc, self.every_s, self.lines = desc, every_s, enabled and not visible
        self.bar = tqdm(total=total, desc=desc, unit="case", disable=not visible)
        self.clock = StepClock(0, total, clock)

    def skip(self, n: int) -> None:
        """Count `n` cases finished by an earlier run (untimed: they do not set the rate)."""
        self.bar.update(n)
        self.clock.step += n
        self.clock.restart()

    def update(self, n: int = 1) -> None:
        """`n` more cases done (computed or failed) since the last update."""
        self.bar.update(n)
        self.clock.tick(self.clock.step + n)
        if self.lines and self.clock.line_due(self.every_s):
            log.info("%s", self.line())

    def line(self) -> str:
        """``<desc>: done/total cases  rate cases/s  ETA``."""
        c = self.clock
        return (f"{self.desc}: {c.step}/{c.total} cases  {c.rate:.2f} cases/s  "
                f"ETA {format_duration(c.eta)}")

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> CaseProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(total: int, desc: str, enabled: bool = True) -> CaseProgress:
    """A `CaseProgress` over `total` cases."""
    return CaseProgress(total, desc, enabled)


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
    with progress(len(items), desc) as bar:
        for item in items:
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
            bar.update(1)
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

"""Batch processing over many cases: a bad case is recorded and skipped unless `strict`."""

from __future__ import annotations

import csv
import io
import logging
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from tqdm.auto import tqdm

from mri_vqvae.core.atomic import atomic_write_text
from mri_vqvae.core.errors import MriVqvaeError
from mri_vqvae.core.outputs import output_cause, output_error

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Failure:
    """A case that could not be processed."""

    case_id: str
    path: str
    reason: str


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
            reason = _describe(innermost_error(exc))
            log.warning("skipping %s: %s", item.get("case_id"), reason)
            failures.append(Failure(str(item.get("case_id")), str(item.get("image")), reason))
    return results, failures


def innermost_error(exc: BaseException) -> BaseException:
    """The project's own error inside a MONAI wrapper (or the deepest cause)."""
    while exc.__cause__ is not None and not isinstance(exc, MriVqvaeError):
        exc = exc.__cause__
    return exc


def _describe(exc: BaseException) -> str:
    text = str(exc) if isinstance(exc, MriVqvaeError) else f"{type(exc).__name__}: {exc}"
    return text.replace("\n", " ")


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

"""Per-case commands cut into parts without torchrun: ``--part I/N`` and the merge of the parts.

Part I of N (1-based) takes the contiguous run of the sorted cases that rank I-1 of a torchrun
world of N would take (`mri_vqvae.core.distributed.shard`), so N parts cover every case once and
their runs, in order, give back the case order. A part writes its per-case outputs where one
process would (images, sidecars, grids: one file per case, so parts never write the same file)
but never the folder's tables. Its own records go to ``DIR/parts/<I>-of-<N>/``::

    .lock           held (flock) while the part runs: the same part twice is refused, other
                    parts run beside it; `mri_vqvae.core.outputs.output_lock`
    records.jsonl   encode only: one JSON line per grid, appended and fsynced as it is written
                    (a rerun of the part reads it back; a line cut short by a kill is skipped)
    part.json       written once when the part ends (deleted when it starts again): the command,
                    the header every part must share, its cases' records and its failures

`merge_parts` (``mri-vqvae merge DIR``) holds the folder's lock and every part's lock (so no part
is running), checks that parts 1..N all ended with the same command and header, and returns
their records and failures in part order, i.e. case order; the command's own merge then writes
the tables exactly as one process would and `clear_parts` removes ``parts/``. ``evaluate``
parts are the exception: its final run (the same command without ``--part``, which has the
models the rest of the evaluation needs) merges them (`mri_vqvae.evaluation.evaluate`).
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from mri_vqvae.core import distributed
from mri_vqvae.core.atomic import atomic_write_text
from mri_vqvae.core.errors import MriVqvaeError
from mri_vqvae.core.journal import CaseJournal, read_case_journal
from mri_vqvae.core.outputs import output_lock
from mri_vqvae.tasks.cases import Failure

T = TypeVar("T")
PARTS = "parts"
PART_DOC = "part.json"
RECORDS = "records.jsonl"
_PATTERN = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")
_FOLDER = re.compile(r"^(\d+)-of-(\d+)$")


class PartError(MriVqvaeError):
    """A ``--part`` that cannot run, or parts that cannot be merged (says which and why)."""


@dataclass(frozen=True)
class Part:
    """Part `index` (1-based) of `count`."""

    index: int
    count: int

    @property
    def name(self) -> str:
        return f"{self.index}-of-{self.count}"

    def take(self, items: Sequence[T]) -> list[T]:
        """This part's contiguous share of `items` (what rank index-1 of count would take)."""
        return distributed.shard(items, self.index - 1, self.count)


def parse_part(text: str) -> Part:
    """``"I/N"`` -> `Part` (1 <= I <= N); `PartError` naming ``--part`` otherwise."""
    match = _PATTERN.match(text)
    if match is None or not 1 <= int(match[1]) <= int(match[2]):
        raise PartError(f"--part {text!r}: expected I/N with 1 <= I <= N, e.g. --part 3/8 "
                        "(in a SLURM array: --part $((SLURM_ARRAY_TASK_ID+1))/"
                        "$SLURM_ARRAY_TASK_COUNT)")
    return Part(int(match[1]), int(match[2]))


def part_folder(out: Path, part: Part) -> Path:
    return Path(out) / PARTS / part.name


def refuse_distributed(part: Part | None) -> None:
    """`PartError` when `part` is set under torchrun (two ways of sharing the cases at once)."""
    if part is not None and distributed.is_distributed():
        raise PartError(f"--part {part.index}/{part.count} under torchrun: use one way of sharing "
                        "the cases, either --part (separate jobs) or torchrun (one job)")


@contextlib.contextmanager
def part_lock(out: Path, part: Part) -> Iterator[Path]:
    """Hold this part's lock for the block and forget its earlier ending (part.json)."""
    with output_lock(part_folder(out, part)) as folder:
        (folder / PART_DOC).unlink(missing_ok=True)
        yield folder


class PartJournal:
    """Records of one part by case_id: read back from records.jsonl, appended to it (fsynced)."""

    def __init__(self, folder: Path, entries: dict[str, dict[str, Any]]) -> None:
        self.path = folder / RECORDS
        self.entries = {**entries, **read_case_journal(self.path)}
        self._journal = CaseJournal(self.path)

    def append(self, entry: dict[str, Any]) -> None:
        self.entries[entry["case_id"]] = entry
        self._journal.append(entry)

    def close(self) -> None:
        self._journal.close()


def finish_part(folder: Path, part: Part, command: str, header: dict[str, Any],
                records: list[dict[str, Any]], failures: list[Failure]) -> Path:
    """Write the part's part.json (its ending): `records` and `failures` in case order."""
    doc = {"command": command, "part": part.index, "parts": part.count, "header": header,
           "records": records, "failures": [asdict(f) for f in failures]}
    path = folder / PART_DOC
    atomic_write_text(path, json.dumps(doc, indent=2) + "\n")
    return path


@dataclass(frozen=True)
class Merged:
    """Every part's ending together: records and failures in case order."""

    command: str
    header: dict[str, Any]
    records: list[dict[str, Any]]
    failures: list[Failure]


def _part_folders(out: Path) -> dict[Part, Path]:
    root = out / PARTS
    if not root.is_dir():
        raise PartError(f"{out} has no {PARTS}/ folder: nothing to merge (run the command with "
                        "--part I/N into this --out first)")
    found = {}
    for folder in sorted(root.iterdir()):
        match = _FOLDER.match(folder.name)
        if folder.is_dir() and match:
            found[Part(int(match[1]), int(match[2]))] = folder
    return found


def _ending(folder: Path) -> dict[str, Any] | None:
    path = folder / PART_DOC
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise PartError(f"{path} is unreadable ({exc}); rerun that part") from None


def _differences(first: dict[str, Any], other: dict[str, Any]) -> list[str]:
    """The command and header keys two part endings disagree on (``command``, ``header.<key>``)."""
    found = ["command"] if first["command"] != other["command"] else []
    a, b = first["header"], other["header"]
    return found + [f"header.{k}" for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


def _gather(out: Path, folders: dict[Part, Path]) -> Merged:
    counts = sorted({p.count for p in folders})
    if not counts:
        raise PartError(f"{out / PARTS} holds no part folder (<I>-of-<N>): nothing to merge")
    if len(counts) != 1:
        raise PartError(f"{out / PARTS} holds parts of different counts N {counts}: keep one "
                        "split of the cases (delete the other parts' folders) and merge again")
    count = counts[0]
    docs = {p.index: _ending(f) for p, f in folders.items()}
    missing = [i for i in range(1, count + 1) if docs.get(i) is None]
    if missing:
        raise PartError(f"{out}: part(s) {missing} of {count} have not finished (no "
                        f"{PARTS}/<I>-of-{count}/{PART_DOC}): run them with --part I/{count} "
                        "into this --out (a rerun resumes), then merge (evaluate parts: "
                        "run the evaluate command again without --part)")
    first = docs[1]
    assert first is not None
    for i in range(2, count + 1):
        doc = docs[i]
        assert doc is not None
        differ = _differences(first, doc)
        if differ:
            raise PartError(f"{out}: part {i} of {count} was made by another run than part 1 "
                            f"({', '.join(differ)} differ): rerun it with the same arguments")
    ordered = [docs[i] for i in range(1, count + 1)]
    return Merged(str(first["command"]), dict(first["header"]),
                  [r for d in ordered for r in d["records"]],  # type: ignore[index]
                  [Failure(**f) for d in ordered for f in d["failures"]])  # type: ignore[index]


@contextlib.contextmanager
def merge_parts(out: str | Path) -> Iterator[Merged]:
    """The parts of `out` merged, while holding the folder's and every part's lock."""
    out = Path(out)
    if not out.is_dir():
        raise PartError(f"{out} is not a folder: give the --out the parts wrote into")
    with contextlib.ExitStack() as stack:
        stack.enter_context(output_lock(out))
        folders = _part_folders(out)
        for folder in folders.values():
            stack.enter_context(output_lock(folder))
        yield _gather(out, folders)


def clear_parts(out: Path) -> None:
    """Remove ``parts/`` once its records are merged into the folder's tables."""
    shutil.rmtree(Path(out) / PARTS, ignore_errors=True)


def part_command(out: Path, part: Part) -> str:
    """A hint for the log: where the part's records went and how to merge."""
    return (f"part {part.index}/{part.count} recorded in {part_folder(out, part)}; when every "
            f"part has run: mri-vqvae merge {out}")

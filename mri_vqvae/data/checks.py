"""Checks on manifest cases: ids, paths, subject leakage, catalog, files on disk, duplicates.

Each check returns every `Problem` it finds (never raises for a bad case), so
`mri_vqvae.data.manifest.verify_manifest` can list them all and `load_manifest` /
`write_manifest` can refuse with `raise_if`. Stdlib only.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from mri_vqvae.core.errors import ManifestError
from mri_vqvae.data import sources
from mri_vqvae.data.case import MASKS, Case, Problem, mask_fields

_MAX_LISTED = 10


def raise_if(problems: Sequence[Problem], where: str) -> None:
    """Raise `ManifestError` at `where` listing the first problems, if there are any."""
    if not problems:
        return
    listed = "; ".join(str(p) for p in problems[:_MAX_LISTED])
    more = f" (and {len(problems) - _MAX_LISTED} more)" if len(problems) > _MAX_LISTED else ""
    raise ManifestError(f"{where}: {listed}{more}")


def path_reason(rel: str) -> str | None:
    """Why `rel` is not a safe POSIX path relative to the data root (None when it is)."""
    if not rel or "\\" in rel or "\0" in rel:
        return "path must be a non-empty POSIX path without backslashes"
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        return "path is not valid Unicode"
    pure = PurePosixPath(rel)
    if pure.is_absolute() or re.match(r"[A-Za-z]:", rel):
        return "absolute path: paths must be relative to the data root"
    if ".." in pure.parts:
        return "path contains '..' and would leave the data root"
    if str(pure) != rel:
        return f"path is not in normal form (expected {str(pure)!r})"
    return None


def structure_problems(cases: Sequence[Case]) -> list[Problem]:
    """Duplicate case ids, unsafe paths and subject leakage between splits."""
    problems = [
        Problem(cid, next(c.path for c in cases if c.case_id == cid), f"duplicate case_id x{n}")
        for cid, n in Counter(c.case_id for c in cases).items() if n > 1
    ]
    problems += [Problem(c.case_id, c.path, r) for c in cases if (r := path_reason(c.path))]
    return problems + leak_problems(cases)


def leak_problems(cases: Sequence[Case]) -> list[Problem]:
    """A subject in two splits, or a derived case in another split than its source."""
    by_subject: dict[str, dict[str, list[Case]]] = defaultdict(lambda: defaultdict(list))
    for c in cases:
        if c.split is not None:
            by_subject[c.subject_id][c.split].append(c)
    problems = []
    for subject, splits in by_subject.items():
        if len(splits) > 1:
            parts = ", ".join(f"{s}: {[c.case_id for c in cs]}" for s, cs in sorted(splits.items()))
            first = sorted(splits.items())[-1][1][0]
            problems.append(Problem(first.case_id, first.path,
                                    f"subject {subject!r} is in more than one split ({parts})"))
    by_id = {c.case_id: c for c in cases}
    for c in cases:
        parent = by_id.get(c.derived_from or "")
        if parent and c.split and parent.split and parent.split != c.split:
            problems.append(Problem(c.case_id, c.path, f"in {c.split} but derived from "
                                    f"{parent.case_id!r} in {parent.split} (leakage)"))
    return problems


def catalog_problems(cases: Sequence[Case], catalog: Mapping[str, Any]) -> list[Problem]:
    """Cases whose source id the sources catalog does not list."""
    return [Problem(c.case_id, c.path, f"source_id {c.source_id!r} is not in the sources "
                    "catalog; add it to data_manifests/sources.json") for c in cases
            if c.source_id not in catalog]


def _file_reason(root: Path, case: Case, checksums: bool) -> str | None:
    if path_reason(case.path):
        return None  # already reported as a structure problem
    full, uid = root / case.path, case.series_uid
    try:
        sources.check_confined(full, root, uid)  # symlinks, also in folders and headers
        files = sources.source_files(full, uid)
        missing = next((f for f in files if not f.exists()), None)
        if not full.exists() or missing:
            return f"missing file {missing or full}"
        if not files:
            return f"no file of series {uid} in {full}: the series was removed or re-exported"
        odd = next(((f, k) for f in files if (k := sources.irregular_kind(f))), None)
        if odd:
            return f"{odd[0]} is not a regular file ({odd[1]})"
        size = sum(f.stat().st_size for f in files)
        if size != case.bytes:
            return f"size {size} bytes, expected {case.bytes}: the file was changed"
        if checksums and (got := sources.sha256_sources(full, uid)[0]) != case.sha256:
            return f"sha256 {got[:12]}... does not match the recorded {case.sha256[:12]}..."
    except ManifestError as exc:
        return str(exc)
    except (OSError, ValueError, RuntimeError) as exc:  # unreadable, symlink loop
        return f"cannot read {full}: {exc}"
    return None


def _mask_reason(root: Path, case: Case, checksums: bool, name: str) -> str | None:
    """Why the annotation mask `name` of `case` cannot be trusted (None when it can, or there
    is none)."""
    rel, recorded = (getattr(case, f) for f in mask_fields(name))
    if rel is None:
        return None
    what = name.replace("_", " ")
    if (why := path_reason(rel)) is not None:
        return f"{name}: {why}"
    full = root / rel
    try:
        sources.check_confined(full, root, None)
        if not full.is_file():
            return f"missing {what} {full}"
        if checksums and (got := sources.sha256_sources(full, None)[0]) != recorded:
            return (f"{what} sha256 {got[:12]}... does not match the recorded "
                    f"{str(recorded)[:12]}...")
    except ManifestError as exc:
        return str(exc)
    except (OSError, ValueError, RuntimeError) as exc:
        return f"cannot read {full}: {exc}"
    return None


def file_problems(root: Path, cases: Sequence[Case], checksums: bool) -> list[Problem]:
    """Cases whose files (image, lesion and brain masks) under `root` are missing, escape it,
    changed size (or sha256)."""
    problems = [Problem(c.case_id, c.path, r) for c in cases
                if (r := _file_reason(root, c, checksums))]
    return problems + [Problem(c.case_id, str(getattr(c, name)), r) for name in MASKS
                       for c in cases if (r := _mask_reason(root, c, checksums, name))]


def duplicate_content(cases: Sequence[Case]) -> list[Problem]:
    """Cases with the same sha256 as an earlier case."""
    first: dict[str, Case] = {}
    problems = []
    for c in cases:
        if c.sha256 in first:
            problems.append(Problem(c.case_id, c.path, "same image content (sha256 "
                                    f"{c.sha256[:12]}...) as case {first[c.sha256].case_id!r}"))
        else:
            first[c.sha256] = c
    return problems

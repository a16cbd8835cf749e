"""Dataset manifests: which files, from which source, in which split, with which checksums.

Stdlib only, so manifests can be built and checked without torch. A manifest lists `Case`s
(one image volume each) under one data root; its `digest` identifies the content and is what a
run records. Splits are made by subject (never by file) from sorted subject ids and a seeded
shuffle, and are frozen once every case has one. See ``data_manifests/README.md``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import logging
import math
import os
import random
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from mri_vqvae.core.atomic import atomic_write_text
from mri_vqvae.core.errors import ManifestError
from mri_vqvae.data import sources

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
SPLITS = ("train", "val", "test")
ORIGINS = ("real", "augmented")
ACCESS = ("open", "registration", "data-use agreement")
DEFAULT_FRACTIONS: Mapping[str, float] = {"train": 0.8, "val": 0.1, "test": 0.1}
# The sources catalog ships inside the package; data_manifests/sources.json links here.
CATALOG_PATH = Path(__file__).resolve().parent / "sources.json"
IMAGE_SUFFIXES = sources.IMAGE_SUFFIXES
DICOM_SUFFIXES = sources.DICOM_SUFFIXES
SKIP_DIRS = frozenset({"derivatives", "sourcedata", "code", "__pycache__"})
CATALOG_FIELDS = (
    "id", "name", "url", "licence", "access", "citation", "modalities", "subject_count", "format",
)
# Patterns are used with re.fullmatch (``$`` would accept a trailing newline).
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
_SHA_RE = re.compile(r"[0-9a-f]{64}")
_UID_RE = re.compile(r"[0-9]+(?:\.[0-9]+)*")
_IXI_RE = re.compile(r"(IXI\d{3})-([A-Za-z]+)-(\d+)-([A-Za-z0-9]+(?:-\d+)?)")
_BIDS_SUB_RE = re.compile(r"(sub-[A-Za-z0-9]+)(?:_|\Z)")  # a prefix: used with .match
_MODALITY_TOKENS = {
    t.lower(): t
    for t in ("T1", "T1w", "T2", "T2w", "FLAIR", "PD", "PDw", "T1ce", "T1Gd", "T2star", "T2starw")
}
_BIDS_OTHER_DATATYPES = frozenset(
    {"func", "dwi", "fmap", "perf", "pet", "meg", "eeg", "ieeg", "beh", "micr", "nirs", "motion"}
)
_MAX_LISTED = 10
_MAX_INT = 2**63 - 1  # larger sizes and shapes in a manifest are refused
_MAX_INT_DIGITS = 40  # longer JSON integer literals are not even converted
_OPTIONAL_CASE_FIELDS = ("series_uid", "session")  # Case fields written only when set


Describe = Callable[..., Any]  # describe(path[, series_uid=...]) -> shape and spacing


@dataclass(frozen=True)
class Case:
    """One image volume: a file (or DICOM series folder) relative to the data root.

    `series_uid` selects one series of a folder holding several (None: every file of the
    folder); `session` names the visit of a subject scanned more than once (``study1``). Both are
    written to JSON only when set, so older manifests keep their digests.
    """

    case_id: str
    subject_id: str
    source_id: str
    path: str
    sha256: str
    bytes: int
    modality: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    split: str | None = None
    origin: str = "real"
    derived_from: str | None = None
    series_uid: str | None = None
    session: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(v) for v in self.shape))
        object.__setattr__(self, "spacing", tuple(float(v) for v in self.spacing))

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (shape and spacing as lists; optional fields only when set)."""
        doc = dataclasses.asdict(self)
        doc["shape"], doc["spacing"] = list(self.shape), list(self.spacing)
        for key in _OPTIONAL_CASE_FIELDS:
            if doc[key] is None:
                del doc[key]
        return doc


@dataclass(frozen=True)
class Manifest:
    """A named collection of cases under one resolved data root."""

    name: str
    cases: tuple[Case, ...]
    split_seed: int | None = None
    split_fractions: Mapping[str, float] | None = None
    data_root: Path = Path(".")
    notes: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "cases", tuple(self.cases))
        object.__setattr__(self, "data_root", Path(self.data_root).resolve())
        if self.split_fractions is not None:
            fractions = {k: float(v) for k, v in self.split_fractions.items()}
            object.__setattr__(self, "split_fractions", fractions)

    @property
    def frozen(self) -> bool:
        """True once every case has a split: re-splitting then needs ``force=True``."""
        return bool(self.cases) and all(c.split is not None for c in self.cases)

    @property
    def digest(self) -> str:
        """sha256 of the canonical JSON content (everything but ``data_root`` and ``digest``)."""
        return content_digest(_content(self))

    def split_counts(self) -> dict[str, int]:
        """Number of cases per split ("none" for unassigned)."""
        return dict(Counter(c.split or "none" for c in self.cases))


@dataclass(frozen=True)
class Problem:
    """Something wrong with one case or file (``case_id`` is None for files not yet cases)."""

    case_id: str | None
    path: str
    reason: str

    def __str__(self) -> str:
        who = f"case {self.case_id!r}" if self.case_id else "file"
        return f"{who} ({self.path}): {self.reason}"


# --- checksums ------------------------------------------------------------------------------


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 hex digest of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_path(path: str | Path, series_uid: str | None = None) -> tuple[str, int]:
    """(sha256, bytes) of an image: a file, a header with its data files, or a series folder.

    See `mri_vqvae.data.sources`: a plain file's digest is its sha256; a folder's is the sha256 of
    the lines ``name NUL sha256(file) LF`` in name order (only `series_uid`'s files when set).
    """
    return sources.sha256_sources(Path(path), series_uid)


def content_digest(document: Mapping[str, Any]) -> str:
    """sha256 of canonical JSON (sorted keys, compact) of a manifest document.

    ``digest`` and ``data_root`` are left out: moving the data does not change the dataset.
    """
    content = {k: v for k, v in document.items() if k not in ("digest", "data_root")}
    canon = json.dumps(content, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


# --- JSON document --------------------------------------------------------------------------


def _content(m: Manifest) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "name": m.name,
        "notes": m.notes,
        "split": {
            "seed": m.split_seed,
            "fractions": None if m.split_fractions is None else dict(m.split_fractions),
            "frozen": m.frozen,
        },
        "cases": [c.to_dict() for c in m.cases],
    }


def to_document(manifest: Manifest, manifest_dir: str | Path | None = None) -> dict[str, Any]:
    """The on-disk JSON document; ``data_root`` is relative to `manifest_dir` when given."""
    root = manifest.data_root
    if manifest_dir is not None:
        try:
            root_text = Path(os.path.relpath(root, Path(manifest_dir).resolve())).as_posix()
        except ValueError:  # another drive
            root_text = root.as_posix()
    else:
        root_text = root.as_posix()
    doc = {"schema_version": SCHEMA_VERSION, "name": manifest.name, "data_root": root_text}
    doc.update({k: v for k, v in _content(manifest).items() if k not in doc})
    doc["digest"] = manifest.digest
    return doc


def _dumps(doc: Mapping[str, Any]) -> str:
    """Pretty JSON with one line per case (readable diffs)."""
    lines = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in doc.items() if k != "cases"]
    cases = ",\n".join(f"    {json.dumps(c)}" for c in doc["cases"])
    lines.insert(len(lines) - 1, f'  "cases": [\n{cases}\n  ]' if cases else '  "cases": []')
    return "{\n" + ",\n".join(lines) + "\n}\n"


def write_manifest(manifest: Manifest, path: str | Path) -> str:
    """Validate and write `manifest` atomically as JSON; returns its digest."""
    path = Path(path)
    _raise_if(_structure_problems(manifest.cases), f"refusing to write {path}")
    doc = to_document(manifest, path.parent)
    atomic_write_text(path, _dumps(doc))
    log.info("wrote manifest %s (%d cases, digest %s)", path, len(manifest.cases), doc["digest"])
    return str(doc["digest"])


# --- reading and schema checks --------------------------------------------------------------


def _err(where: str, what: str, got: Any, fix: str = "") -> ManifestError:
    shown = repr(got)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return ManifestError(f"{where}: {what} (received {shown}){'; ' + fix if fix else ''}")


def _check_keys(obj: Any, required: set[str], optional: set[str], where: str) -> None:
    if not isinstance(obj, dict):
        raise _err(where, "expected a JSON object", type(obj).__name__)
    for key in sorted(required - obj.keys()):
        raise _err(where, f"missing field {key!r}", sorted(obj), "rebuild the manifest")
    extra = sorted(obj.keys() - required - optional)
    if extra:
        raise _err(where, f"unknown field {extra[0]!r}", extra, f"allowed: {sorted(required)}")


def _str(value: Any, where: str, pattern: re.Pattern[str] | None = None) -> str:
    if not isinstance(value, str) or not value or (pattern and not pattern.fullmatch(value)):
        need = f"a string matching {pattern.pattern}" if pattern else "a non-empty string"
        raise _err(where, f"expected {need}", value)
    return value


def _opt_str(value: Any, where: str) -> str | None:
    return None if value is None else _str(value, where)


def _int(value: Any, where: str, minimum: int | None = None, limit: int | None = _MAX_INT) -> int:
    """An int (JSON literals over _MAX_INT_DIGITS digits never are); |value| <= `limit`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise _err(where, "expected an integer", value)
    if limit is not None and abs(value) > limit:
        raise _err(where, f"expected an integer of magnitude <= {limit} ({len(str(abs(value)))} "
                   "digits received)", value, "restore the manifest or rebuild it")
    if minimum is not None and value < minimum:
        raise _err(where, f"expected an integer >= {minimum}", value)
    return value


class _LongInteger:
    """A JSON integer literal too long to convert (Python limits int() to 4300 digits)."""

    def __init__(self, text: str) -> None:
        self.digits = len(text.lstrip("-"))

    def __repr__(self) -> str:
        return f"<integer of {self.digits} digits>"


def _json_int(text: str) -> int | _LongInteger:
    """`json` parse_int hook: long literals become `_LongInteger`, which no field accepts."""
    return int(text) if len(text) <= _MAX_INT_DIGITS else _LongInteger(text)


def _opt_id(value: Any, where: str) -> str | None:
    return None if value is None else _str(value, where, _ID_RE)


def _opt_uid(value: Any, where: str) -> str | None:
    if value is None:
        return None
    uid = _str(value, where, _UID_RE)
    if len(uid) > 64:
        raise _err(where, "expected a DICOM UID of at most 64 characters", value)
    return uid


def _float(value: Any, where: str, positive: bool = False) -> float:
    try:
        ok = not isinstance(value, bool) and isinstance(value, (int, float))
        number = float(value) if ok else math.nan
    except OverflowError:
        number = math.inf
    if not math.isfinite(number) or number < 0 or (positive and number == 0):
        kind = "positive" if positive else "non-negative"
        raise _err(where, f"expected a finite {kind} number", value)
    return number


def _triple(value: Any, where: str, item: Callable[[Any, str], Any]) -> tuple[Any, ...]:
    if not isinstance(value, list) or len(value) != 3:
        raise _err(where, "expected a list of 3 numbers", value)
    return tuple(item(v, f"{where}[{i}]") for i, v in enumerate(value))


def _choice(value: Any, where: str, allowed: Sequence[Any]) -> Any:
    if value not in allowed or isinstance(value, bool):
        raise _err(where, f"expected one of {list(allowed)}", value)
    return value


_CASE_FIELDS = {f.name for f in dataclasses.fields(Case)}


def _parse_case(obj: Any, where: str) -> Case:
    cid = obj.get("case_id") if isinstance(obj, dict) else None
    where = f"{where} (case {cid!r})" if isinstance(cid, str) else where
    optional = set(_OPTIONAL_CASE_FIELDS)
    _check_keys(obj, _CASE_FIELDS - optional, optional, where)
    return Case(
        case_id=_str(cid, f"{where}.case_id", _ID_RE),
        subject_id=_str(obj["subject_id"], f"{where}.subject_id"),
        source_id=_str(obj["source_id"], f"{where}.source_id", _ID_RE),
        path=_str(obj["path"], f"{where}.path"),
        sha256=_str(obj["sha256"], f"{where}.sha256", _SHA_RE),
        bytes=_int(obj["bytes"], f"{where}.bytes", 0),
        modality=_str(obj["modality"], f"{where}.modality"),
        shape=_triple(obj["shape"], f"{where}.shape", lambda v, w: _int(v, w, 1)),
        spacing=_triple(obj["spacing"], f"{where}.spacing", lambda v, w: _float(v, w, True)),
        split=_choice(obj["split"], f"{where}.split", (*SPLITS, None)),
        origin=_choice(obj["origin"], f"{where}.origin", ORIGINS),
        derived_from=_opt_str(obj["derived_from"], f"{where}.derived_from"),
        series_uid=_opt_uid(obj.get("series_uid"), f"{where}.series_uid"),
        session=_opt_id(obj.get("session"), f"{where}.session"),
    )


def _parse_split(obj: Any, where: str) -> tuple[int | None, dict[str, float] | None, bool]:
    _check_keys(obj, {"seed", "fractions", "frozen"}, set(), where)
    seed = None if obj["seed"] is None else _int(obj["seed"], f"{where}.seed", limit=None)
    fractions = obj["fractions"]
    if fractions is not None:
        _check_keys(fractions, set(), set(SPLITS), f"{where}.fractions")
        fractions = {k: _float(v, f"{where}.fractions.{k}") for k, v in fractions.items()}
    frozen = obj["frozen"]
    if not isinstance(frozen, bool):
        raise _err(f"{where}.frozen", "expected true or false", frozen)
    return seed, fractions, frozen


def _read_json(path: Path) -> Any:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        return json.loads(raw.decode("utf-8"), parse_int=_json_int)
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise ManifestError(
            f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); "
            "restore it from version control or rebuild it"
        ) from None
    except ValueError as exc:  # a number JSON accepts but Python cannot convert
        raise ManifestError(f"{path}: unusable JSON value ({exc}); restore it from version "
                            "control or rebuild it") from None
    except RecursionError:
        raise ManifestError(f"{path}: JSON nested too deeply to be a manifest") from None


def _parse_document(doc: Any, where: str, base: Path) -> tuple[Manifest, str, bool]:
    """(manifest, stored digest, stored frozen flag) from a decoded JSON document."""
    top = {"schema_version", "name", "data_root", "split", "cases", "digest"}
    _check_keys(doc, top, {"notes"}, where)
    version = doc["schema_version"]
    if version != SCHEMA_VERSION or isinstance(version, bool):
        raise _err(f"{where}.schema_version", f"expected {SCHEMA_VERSION}", version,
                   "this file was written by another version of mri-vqvae")
    name = _str(doc["name"], f"{where}.name")
    root_text = _str(doc["data_root"], f"{where}.data_root")
    if "\0" in root_text:
        raise _err(f"{where}.data_root", "NUL character in the path", root_text)
    notes = doc.get("notes", "")
    if not isinstance(notes, str):
        raise _err(f"{where}.notes", "expected a string", notes)
    seed, fractions, frozen = _parse_split(doc["split"], f"{where}.split")
    if not isinstance(doc["cases"], list):
        raise _err(f"{where}.cases", "expected a list", type(doc["cases"]).__name__)
    cases = [_parse_case(c, f"{where}.cases[{i}]") for i, c in enumerate(doc["cases"])]
    digest = _str(doc["digest"], f"{where}.digest", _SHA_RE)
    try:
        root_text.encode("utf-8")
        root = Path(root_text) if Path(root_text).is_absolute() else base / root_text
        manifest = Manifest(name, tuple(cases), seed, fractions, root, notes)
    except (OSError, ValueError, RuntimeError) as exc:
        raise _err(f"{where}.data_root", f"not a usable folder ({exc})", root_text) from None
    return manifest, digest, frozen


def load_manifest(
    path: str | Path,
    data_root: str | Path | None = None,
    check_files: bool = True,
    verify_checksums: bool = False,
    catalog: Mapping[str, Mapping[str, Any]] | None = None,
) -> Manifest:
    """Read and validate a manifest; raises `ManifestError` naming the offending case.

    Checks the schema, unique case ids, safe relative paths, subject-disjoint splits and the
    stored digest; with `check_files` each file exists (inside the data root) with the recorded
    size; with `verify_checksums` its sha256 too; with `catalog` each source id is listed.
    """
    path = Path(path)
    base = path.resolve().parent
    manifest, stored, frozen = _parse_document(_read_json(path), str(path), base)
    if data_root is not None:
        manifest = dataclasses.replace(manifest, data_root=Path(data_root))
    _raise_if(_structure_problems(manifest.cases), str(path))
    if stored != manifest.digest or frozen != manifest.frozen:
        raise ManifestError(
            f"{path}: stored digest {stored[:12]}... does not match the content "
            f"({manifest.digest[:12]}...): the file was edited by hand or corrupted; restore it "
            "from version control or rebuild it with `mri-vqvae manifest build`"
        )
    if catalog is not None:
        _raise_if(_catalog_problems(manifest.cases, catalog), str(path))
    if check_files:
        where = f"{path} (data root {manifest.data_root})"
        _raise_if(_file_problems(manifest, verify_checksums), where)
    return manifest


def _raise_if(problems: list[Problem], where: str) -> None:
    if not problems:
        return
    listed = "; ".join(str(p) for p in problems[:_MAX_LISTED])
    more = f" (and {len(problems) - _MAX_LISTED} more)" if len(problems) > _MAX_LISTED else ""
    raise ManifestError(f"{where}: {listed}{more}")


# --- checks shared by load and verify -------------------------------------------------------


def _path_reason(rel: str) -> str | None:
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


def _structure_problems(cases: Sequence[Case]) -> list[Problem]:
    """Duplicate case ids, unsafe paths and subject leakage between splits."""
    problems = [
        Problem(cid, next(c.path for c in cases if c.case_id == cid), f"duplicate case_id x{n}")
        for cid, n in Counter(c.case_id for c in cases).items() if n > 1
    ]
    problems += [Problem(c.case_id, c.path, r) for c in cases if (r := _path_reason(c.path))]
    return problems + _leak_problems(cases)


def _leak_problems(cases: Sequence[Case]) -> list[Problem]:
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


def _catalog_problems(cases: Sequence[Case], catalog: Mapping[str, Any]) -> list[Problem]:
    return [Problem(c.case_id, c.path, f"source_id {c.source_id!r} is not in the sources "
                    "catalog; add it to data_manifests/sources.json") for c in cases
            if c.source_id not in catalog]


def _file_reason(root: Path, case: Case, checksums: bool) -> str | None:
    if _path_reason(case.path):
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


def _file_problems(manifest: Manifest, checksums: bool) -> list[Problem]:
    root = manifest.data_root
    return [Problem(c.case_id, c.path, r) for c in manifest.cases
            if (r := _file_reason(root, c, checksums))]


def _duplicate_content(cases: Sequence[Case]) -> list[Problem]:
    first: dict[str, Case] = {}
    problems = []
    for c in cases:
        if c.sha256 in first:
            problems.append(Problem(c.case_id, c.path, "same image content (sha256 "
                                    f"{c.sha256[:12]}...) as case {first[c.sha256].case_id!r}"))
        else:
            first[c.sha256] = c
    return problems


def verify_manifest(
    manifest: Manifest,
    catalog: Mapping[str, Mapping[str, Any]] | None = None,
    checksums: bool = True,
) -> list[Problem]:
    """Every problem found: ids, paths, leakage, catalog, files, checksums, duplicate content."""
    problems = _structure_problems(manifest.cases)
    if catalog is not None:
        problems += _catalog_problems(manifest.cases, catalog)
    problems += _file_problems(manifest, checksums)
    return problems + _duplicate_content(manifest.cases)


# --- splits ---------------------------------------------------------------------------------


def _check_fractions(fractions: Mapping[str, float]) -> dict[str, float]:
    bad = sorted(set(fractions) - set(SPLITS))
    if bad:
        raise ManifestError(f"split fractions: unknown split {bad[0]!r}; use {list(SPLITS)}")
    out = {s: float(fractions.get(s, 0.0)) for s in SPLITS}
    total = sum(out.values())
    if any(not math.isfinite(v) or v < 0 for v in out.values()) or abs(total - 1) > 1e-6:
        raise ManifestError(f"split fractions must be >= 0 and sum to 1, got {dict(fractions)}")
    return {s: v / total for s, v in out.items()}


def _split_counts(n: int, fractions: Mapping[str, float]) -> dict[str, int]:
    """Largest-remainder counts; with >= 3 subjects each split with a fraction > 0 gets one."""
    raw = {s: n * fractions[s] for s in SPLITS}
    counts = {s: int(raw[s]) for s in SPLITS}
    for s in sorted(SPLITS, key=lambda s: counts[s] - raw[s])[: n - sum(counts.values())]:
        counts[s] += 1
    if n >= 3:
        for s in ("val", "test"):
            if fractions[s] > 0 and counts[s] == 0:
                donor = max(SPLITS, key=lambda d: counts[d])
                counts[donor] -= 1
                counts[s] += 1
    return counts


def _split_unit(case: Case, by_id: Mapping[str, Case]) -> str:
    """The subject of the case's oldest ancestor: derived cases follow their source."""
    seen = {case.case_id}
    while case.derived_from in by_id and case.derived_from not in seen:
        case = by_id[case.derived_from]
        seen.add(case.case_id)
    return case.subject_id


def assign_splits(
    cases: Iterable[Case],
    fractions: Mapping[str, float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    fixed: Mapping[str, str] | None = None,
) -> list[Case]:
    """Assign train/val/test by subject: sorted subject ids, then ``random.Random(seed)`` shuffle.

    `fixed` maps subject_id -> split and wins. Derived cases land with their source case. Counts
    use the fractions over all subjects (largest remainder); with >= 3 subjects, val and test
    get at least one subject each when their fraction is > 0.
    """
    cases = list(cases)
    fractions = _check_fractions(fractions)
    fixed = dict(fixed or {})
    for subject, split in fixed.items():
        _choice(split, f"fixed split of subject {subject!r}", SPLITS)
    by_id = {c.case_id: c for c in cases}
    units = {c.case_id: _split_unit(c, by_id) for c in cases}
    subjects = sorted(set(units.values()))
    free = [s for s in subjects if s not in fixed]
    random.Random(seed).shuffle(free)
    targets = _split_counts(len(subjects), fractions)
    fixed_counts = Counter(fixed[s] for s in subjects if s in fixed)
    need = {s: max(0, targets[s] - fixed_counts[s]) for s in SPLITS}
    _balance(need, len(free))
    order = [s for s in SPLITS for _ in range(need[s])]
    chosen = dict(zip(free, order, strict=True)) | {s: fixed[s] for s in subjects if s in fixed}
    return [dataclasses.replace(c, split=chosen[units[c.case_id]]) for c in cases]


def _balance(need: dict[str, int], total: int) -> None:
    """Make the counts add up to `total`: train absorbs the difference first."""
    diff = total - sum(need.values())
    for s in SPLITS:
        step = diff if diff > 0 else max(diff, -need[s])
        need[s] += step
        diff -= step
        if diff == 0:
            return


def split_manifest(
    manifest: Manifest,
    fractions: Mapping[str, float] | None = None,
    seed: int | None = None,
    fixed: Mapping[str, str] | None = None,
    force: bool = False,
) -> Manifest:
    """(Re)assign splits. A frozen manifest (every case split) raises unless `force`.

    Without `force`, subjects that already have a split keep it; only new subjects are assigned.
    """
    if manifest.frozen and not force:
        raise ManifestError(
            f"manifest {manifest.name!r}: splits are frozen (every case has one); re-splitting "
            "changes which subjects are held out: pass force=True (CLI: --force) to do it anyway"
        )
    fractions = fractions or manifest.split_fractions or DEFAULT_FRACTIONS
    seed = (manifest.split_seed or 0) if seed is None else seed
    keep = {} if force else {c.subject_id: c.split for c in manifest.cases if c.split}
    cases = assign_splits(manifest.cases, fractions, seed, {**keep, **(fixed or {})})
    return dataclasses.replace(manifest, cases=tuple(cases), split_seed=seed,
                               split_fractions=_check_fractions(fractions))


# --- merging --------------------------------------------------------------------------------


def _common_root(roots: Sequence[Path]) -> Path:
    try:
        common = Path(os.path.commonpath([str(r) for r in roots]))
    except ValueError as exc:
        raise ManifestError(
            f"data roots {[str(r) for r in roots]} share no common folder ({exc}); move the "
            "data under one folder and rebuild the manifests"
        ) from None
    if common == Path(common.anchor):
        log.warning("merged data roots only share the filesystem root %s", common)
    return common


def merge_manifests(manifests: Sequence[Manifest], name: str, notes: str = "") -> Manifest:
    """Collate manifests into one (paths rewritten under the common data root).

    Provenance (source_id, origin, derived_from) is kept. Refuses a case_id in two inputs and a
    subject_id whose cases would sit in two splits.
    """
    if not manifests:
        raise ManifestError("merge: give at least one manifest")
    root = _common_root([m.data_root for m in manifests])
    owner: dict[str, str] = {}
    cases: list[Case] = []
    for m in manifests:
        prefix = PurePosixPath(m.data_root.relative_to(root).as_posix())
        for c in m.cases:
            if c.case_id in owner:
                raise ManifestError(
                    f"merge: case_id {c.case_id!r} is in both {owner[c.case_id]!r} and "
                    f"{m.name!r}; rename the case in one source (case ids must be unique)"
                )
            owner[c.case_id] = m.name
            cases.append(dataclasses.replace(c, path=str(prefix / c.path)))
    leaks = _leak_problems(cases)
    if leaks:
        raise ManifestError(f"merge {name!r}: {leaks[0]}; re-split one input so the subject's "
                            "cases share a split, or merge unsplit manifests and split after")
    for p in _duplicate_content(cases):
        log.warning("merge %s: %s", name, p)
    seeds = {m.split_seed for m in manifests}
    fracs = [m.split_fractions for m in manifests]
    same = all(f == fracs[0] for f in fracs)
    joined = notes or " | ".join(f"{m.name}: {m.notes}" for m in manifests if m.notes)
    return Manifest(name, tuple(cases), seeds.pop() if len(seeds) == 1 else None,
                    fracs[0] if same else None, root, joined)


# --- scanning folders -----------------------------------------------------------------------


def _image_suffix(name: str) -> str | None:
    return sources.image_suffix(name)


@dataclass(frozen=True)
class _Found:
    """An image found by a scan: a file, or a DICOM series folder (`series`).

    series_uid: the one series of the folder the case holds (None: every file of the folder).
    tag: tells several series of one folder apart in their case ids ("" when alone).
    """

    rel: PurePosixPath
    series: bool
    series_uid: str | None = None
    tag: str = ""

    @property
    def label(self) -> str:
        return f"{self.rel} (series {self.series_uid})" if self.series_uid else str(self.rel)


def _no_uid_reason(name: str, tags: sources.DicomTags | None) -> str:
    if name.upper() == "DICOMDIR":
        return "DICOMDIR index file, not an image; left out (no series needs it)"
    what = "unreadable DICOM header" if tags is None else "DICOM file without SeriesInstanceUID"
    return (f"{what}: it cannot be assigned to a series; re-export the series, or remove the "
            "file if it is not an image")


def _series_tags(groups: Mapping[str, list[str]], tags: Mapping[str, Any]) -> dict[str, str]:
    """uid -> id tag: ``s<SeriesNumber>`` when those tell the series apart, else a uid hash."""
    if len(groups) == 1:
        return dict.fromkeys(groups, "")
    numbers = {uid: tags[names[0]].series_number for uid, names in groups.items()}
    if all(numbers.values()) and len(set(numbers.values())) == len(numbers):
        return {uid: "s" + re.sub(r"[^A-Za-z0-9]+", "-", n) for uid, n in numbers.items()}
    return {uid: "u" + hashlib.sha1(uid.encode()).hexdigest()[:8] for uid in groups}


def _dicom_found(here: Path, rel: PurePosixPath, names: list[str]
                 ) -> tuple[list[_Found], list[Problem], set[str]]:
    """Cases for the DICOM files `names` of folder `here`: one per series (SeriesInstanceUID),
    one per whole-volume file (enhanced multi-frame, mosaic); files of no series are problems.

    Returns (found, problems, names of the files a whole-folder case holds). A folder that is
    exactly one series (a DICOMDIR aside), or whose headers name no series, stays one case
    without ``series_uid``, hashed as before.
    """
    index = [n for n in names if n.upper() == "DICOMDIR"]
    tags = {n: sources.dicom_tags(here / n) for n in names if n not in index}
    volumes = [n for n, t in tags.items() if t is not None and t.volume]
    slices = [n for n in tags if n not in volumes]
    found = [_Found(rel / n, False) for n in volumes]
    groups: dict[str, list[str]] = defaultdict(list)
    for n in slices:
        if (t := tags[n]) is not None and t.series_uid:
            groups[t.series_uid].append(n)
    whole = [f.name for f in sources.source_files(here)]
    alone = len(groups) == 1 and sorted(*groups.values()) == [n for n in whole if n not in index]
    if slices and (alone or not groups):
        return [*found, _Found(rel, True)], [], set(whole)
    problems = [Problem(None, str(rel / n), _no_uid_reason(n, tags.get(n)))
                for n in [*index, *slices] if not any(n in g for g in groups.values())]
    id_tags = _series_tags(groups, tags)
    for uid, members in sorted(groups.items()):
        if sources.valid_uid(uid):
            found.append(_Found(rel, True, uid, id_tags[uid]))
        else:
            problems += [Problem(None, str(rel / n), f"SeriesInstanceUID {uid!r} is not a valid "
                                 "DICOM UID (digits and dots, at most 64 characters), so the "
                                 "series cannot be told apart from the others in its folder; "
                                 "move it to a folder of its own") for n in members]
    return found, problems, set()


def _scan_dir(root: Path, here: Path, names: list[str]) -> tuple[list[_Found], list[Problem]]:
    """Images in one folder (not recursive). Non-regular files are problems and never opened;
    in a folder holding DICOM every file ends in a case or a problem."""
    rel = PurePosixPath(here.relative_to(root).as_posix())
    problems, regular = [], []
    for n in names:
        kind = sources.irregular_kind(here / n)
        if kind is None:
            regular.append(n)
        else:
            reason = f"not a regular file ({kind}); only regular files (or links to them) are read"
            problems.append(Problem(None, str(rel / n), reason))
    images = [n for n in regular if _image_suffix(n)]
    found = [_Found(rel / n, False) for n in images]
    rest = [n for n in regular if not _image_suffix(n)]
    dicom = [n for n in rest if sources.is_dicom(here / n)]
    if not dicom:
        return found, problems
    more, dicom_problems, covered = _dicom_found(here, rel, dicom)
    data = sources.referenced_data(here / n for n in images)
    problems += dicom_problems + [
        Problem(None, str(rel / n), "not an image: no image extension (.nii.gz, .nrrd, .mha, "
                ".mhd ...) and not DICOM; left out (move it out of the image folder)")
        for n in rest if n not in dicom and n not in covered
        and Path(os.path.normpath(here / n)) not in data]
    return found + more, problems


def _find_images(root: Path) -> tuple[list[_Found], list[Problem]]:
    """Every image under `root` (sorted) and the files that could not be taken as images."""
    found: list[_Found] = []
    problems: list[Problem] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
        more, bad = _scan_dir(root, Path(folder), sorted(f for f in files if not f.startswith(".")))
        found += more
        problems += bad
    return sorted(found, key=lambda f: (f.rel, f.series, f.tag)), problems


def _strip_suffix(name: str) -> str:
    suffix = _image_suffix(name)
    return name[: -len(suffix)] if suffix else name


def _modality_token(stem: str, default: str) -> str:
    last = re.split(r"[_-]", stem)[-1]
    return _MODALITY_TOKENS.get(last.lower(), default) if last != stem else default


def modality_from_name(name: str, default: str | None = None) -> str | None:
    """The contrast a file name ends in, case-insensitive, in canonical spelling, else `default`.

    ``study1_T1W.nii.gz`` -> ``T1w``, ``study2_T2W.nii.gz`` -> ``T2w``, ``study1_FLAIR.nii.gz``
    -> ``FLAIR``, ``sub-01_T1w.nii`` -> ``T1w``; ``gt.nii.gz`` -> `default`.
    """
    token = _modality_token(_strip_suffix(PurePosixPath(name).name), "")
    return token or default


def identify(rel: PurePosixPath, series: bool, modality_default: str = "T1w",
             root_name: str = "root") -> tuple[str, str] | None:
    """(subject_id, modality) of an image path relative to the data root; None to skip it.

    Rules, first match wins: a DICOM series folder -> subject is the top folder under the root
    (the folder itself when it sits at the root); under a BIDS ``sub-*`` folder the subject is
    ``sub-XX`` and the modality the file's suffix (``_T1w``), and files in non-anatomical
    datatype folders (func, dwi, fmap, ...) are skipped; an IXI name
    ``IXI002-Guys-0828-T1`` -> (``IXI002``, ``T1``); a file name starting ``sub-XX_`` ->
    ``sub-XX``; a file in a subfolder -> the top folder under the root; a file at the root ->
    its name up to the first ``_`` or ``-``. Modality: the last ``_``/``-`` token when it is a
    known contrast (T1, T1w, T2w, FLAIR, PD ...), else `modality_default`.
    """
    if series:
        return (rel.parts[0] if rel.parts else root_name), modality_default
    stem = _strip_suffix(rel.name)
    top = rel.parts[0] if len(rel.parts) > 1 else None
    if top and top.startswith("sub-"):
        if _BIDS_OTHER_DATATYPES & set(rel.parts[1:-1]):
            return None
        return top, stem.rsplit("_", 1)[-1] if "_" in stem else modality_default
    if m := _IXI_RE.match(stem):
        return m.group(1), m.group(4)
    if m := _BIDS_SUB_RE.match(stem):
        return m.group(1), stem.rsplit("_", 1)[-1] if "_" in stem else modality_default
    subject = top or re.split(r"[_-]", stem, maxsplit=1)[0] or stem
    return subject, _modality_token(stem, modality_default)


def _case_ids(source_id: str, found: Sequence[tuple[PurePosixPath, str]],
              root_name: str) -> list[str]:
    """Stable, unique, filesystem-safe ids from the source id, the relative paths and the
    series tags (several series of one folder get ``_<tag>``)."""
    ids, keys = [], []
    for rel, tag in found:
        raw = "_".join([*rel.parts[:-1], _strip_suffix(rel.name)]) if rel.parts else root_name
        raw = f"{raw}_{tag}" if tag else raw
        key = hashlib.sha1((f"{rel}#{tag}" if tag else str(rel)).encode()).hexdigest()[:8]
        safe = re.sub(r"[^A-Za-z0-9._-]+", "-", raw)
        cid = f"{source_id}_{safe}"
        if safe != raw or len(cid) > 150:
            cid = f"{cid[:140]}-{key}"
        ids.append(cid)
        keys.append(key)
    counts = Counter(ids)
    return [f"{cid}-{key}" if counts[cid] > 1 else cid
            for cid, key in zip(ids, keys, strict=True)]


def _shape_spacing(info: Any) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Shape and spacing from a describe() result (a mapping or an object), checked as 3D."""
    get = info.get if isinstance(info, Mapping) else lambda k: getattr(info, k)
    shape, spacing = [int(v) for v in get("shape")], [float(v) for v in get("spacing")]
    while len(shape) > 3 and shape[-1] == 1:
        shape.pop()
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"expected a 3D volume, got shape {tuple(shape)}")
    spacing = spacing[:3]
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"expected 3 positive voxel spacings, got {tuple(spacing)}")
    return tuple(shape), tuple(spacing)


def scan_folder(
    root: str | Path,
    describe: Describe,
    source_id: str,
    modality_default: str = "T1w",
    subject_of: Callable[[str], str] | None = None,
) -> tuple[list[Case], list[Problem]]:
    """Find the images under `root` and make one unsplit `Case` each (see `identify`).

    Recognised: NIfTI (.nii, .nii.gz), NRRD, MHA files and DICOM series folders (``.dcm``/
    ``.ima`` files, extension-less or UID-named files with the DICM preamble or a raw DICOM
    image header). ``derivatives``, ``sourcedata``, ``code`` and hidden folders are skipped.
    A folder's DICOM files are grouped by SeriesInstanceUID: each series is a case (its
    ``series_uid`` set when the folder holds more than that series), an enhanced multi-frame or
    mosaic file is a case of its own, and in such a folder any other file is a `Problem`.
    FIFOs, sockets and devices are problems and never opened. `describe(path)` returns shape and
    spacing (mapping or object), and must accept ``series_uid=`` for one series of a folder;
    any exception it raises becomes a `Problem`. `subject_of` (relative path -> subject id)
    overrides the naming rules.
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise ManifestError(f"{root}: not a folder; give the folder that holds the images")
    _str(source_id, "source_id", _ID_RE)
    found, problems = _find_images(root)
    for p in problems:
        log.warning("scan: skipping %s: %s", p.path, p.reason)
    ids = _case_ids(source_id, [(f.rel, f.tag) for f in found], root.name)
    cases: list[Case] = []
    for f, cid in zip(found, ids, strict=True):
        named = identify(f.rel, f.series, modality_default, root.name)
        if named is None:
            log.debug("scan %s: skipping non-anatomical %s", root, f.rel)
            continue
        subject = subject_of(str(f.rel)) if subject_of else named[0]
        result = _scan_one(root, f, cid, subject, named[1], describe, source_id)
        (cases if isinstance(result, Case) else problems).append(result)
    log.info("scanned %s: %d case(s), %d problem(s)", root, len(cases), len(problems))
    return cases, problems


def _takes_series_uid(describe: Describe) -> bool:
    try:
        params = inspect.signature(describe).parameters
    except (TypeError, ValueError):
        return False
    return "series_uid" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _scan_one(root: Path, found: _Found, case_id: str, subject: str, modality: str,
              describe: Describe, source_id: str) -> Case | Problem:
    full, uid = root / found.rel, found.series_uid
    try:
        sources.check_confined(full, root, uid)
    except ManifestError as exc:
        return Problem(None, found.label, str(exc))
    if uid is not None and not _takes_series_uid(describe):
        return Problem(None, found.label, "the folder holds several DICOM series and the image "
                       "reader cannot read one of them (describe() takes no series_uid); put "
                       "each series in its own folder")
    try:
        info = describe(full, series_uid=uid) if uid is not None else describe(full)
        shape, spacing = _shape_spacing(info)
        digest, size = sha256_path(full, uid)
    except Exception as exc:  # any unreadable file is reported, not fatal
        reason = f"{type(exc).__name__}: {exc}".replace("\n", " ")
        log.warning("scan: skipping %s: %s", found.label, reason)
        return Problem(None, found.label, reason)
    return Case(case_id, subject, source_id, str(found.rel), digest, size, modality, shape,
                spacing, series_uid=uid)


# --- sources catalog ------------------------------------------------------------------------


def load_catalog(path: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """The sources catalog as {source id: record}; default ``data_manifests/sources.json``."""
    path = Path(path) if path is not None else CATALOG_PATH
    doc = _read_json(path)
    _check_keys(doc, {"schema_version", "sources"}, {"notes"}, str(path))
    if not isinstance(doc["sources"], list):
        raise _err(f"{path}.sources", "expected a list", type(doc["sources"]).__name__)
    catalog: dict[str, dict[str, Any]] = {}
    for i, rec in enumerate(doc["sources"]):
        where = f"{path}.sources[{i}]"
        _check_keys(rec, set(CATALOG_FIELDS), {"notes", "files"}, where)
        sid = _str(rec["id"], f"{where}.id", _ID_RE)
        if sid in catalog:
            raise _err(where, "duplicate source id", sid)
        _choice(rec["access"], f"{where}.access", ACCESS)
        catalog[sid] = rec
    return catalog

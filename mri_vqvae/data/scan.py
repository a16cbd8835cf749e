"""Building manifest cases by scanning a folder of images (``mri-vqvae manifest build``).

Which names are images comes from `mri_vqvae.data.formats` (the reader's own list); which bytes
make each image, and their digest, from `mri_vqvae.data.sources`. A DICOM folder is grouped by
SeriesInstanceUID. Subject and modality come from the path (`identify`), case ids from the path
and the source id. Every file that cannot become a case is a `Problem`, never an exception.
Stdlib only (pydicom lazily for DICOM headers).
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import math
import os
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from mri_vqvae.core.errors import ManifestError
from mri_vqvae.data import formats, schema, sources
from mri_vqvae.data.case import Case, Problem

log = logging.getLogger(__name__)

SKIP_DIRS = frozenset({"derivatives", "sourcedata", "code", "__pycache__"})
_IXI_RE = re.compile(r"(IXI\d{3})-([A-Za-z]+)-(\d+)-([A-Za-z0-9]+(?:-\d+)?)")
_BIDS_SUB_RE = re.compile(r"(sub-[A-Za-z0-9]+)(?:_|\Z)")  # a prefix: used with .match
_MODALITY_TOKENS = {
    t.lower(): t
    for t in ("T1", "T1w", "T2", "T2w", "FLAIR", "PD", "PDw", "T1ce", "T1Gd", "T2star", "T2starw")
}
_BIDS_OTHER_DATATYPES = frozenset(
    {"func", "dwi", "fmap", "perf", "pet", "meg", "eeg", "ieeg", "beh", "micr", "nirs", "motion"}
)

Describe = Callable[..., Any]  # describe(path[, series_uid=...]) -> shape and spacing


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
    images = [n for n in regular if formats.image_suffix(n)]
    found = [_Found(rel / n, False) for n in images]
    rest = [n for n in regular if not formats.image_suffix(n)]
    dicom = [n for n in rest if sources.is_dicom(here / n)]
    if not dicom:
        return found, problems
    more, dicom_problems, covered = _dicom_found(here, rel, dicom)
    data = sources.referenced_data(here / n for n in images)
    problems += dicom_problems + [
        Problem(None, str(rel / n), "not an image: no image extension "
                f"({', '.join(formats.IMAGE_SUFFIXES)}) and not DICOM; left out (move it out of "
                "the image folder)")
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
    suffix = formats.image_suffix(name)
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

    Recognised: NIfTI, NRRD and MetaImage files (`mri_vqvae.data.formats`; a detached header
    .nhdr/.mhd is the image, its data files belong to it) and DICOM series folders (``.dcm``/
    ``.dicom``/``.ima`` files, extension-less or UID-named files with the DICM preamble or a
    raw DICOM image header). ``derivatives``, ``sourcedata``, ``code`` and hidden folders are
    skipped. A folder's DICOM files are grouped by SeriesInstanceUID: each series is a case (its
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
    schema.text(source_id, "source_id", schema.ID_RE)
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
        digest, size = sources.sha256_sources(full, uid)
    except Exception as exc:  # any unreadable file is reported, not fatal
        reason = f"{type(exc).__name__}: {exc}".replace("\n", " ")
        log.warning("scan: skipping %s: %s", found.label, reason)
        return Problem(None, found.label, reason)
    return Case(case_id, subject, source_id, str(found.rel), digest, size, modality, shape,
                spacing, series_uid=uid)

"""The BIDS-Derivatives view of an output folder: names, labels, dataset_description.json.

A folder a command writes with ``--bids`` is also a BIDS 1.9 derivative dataset::

    dataset_description.json       Name, BIDSVersion, DatasetType "derivative", GeneratedBy
                                   (config and manifest digests), SourceDatasets (the manifest)
    participants.tsv / .json       participant_id and the manifest's subject_id it came from
    .bidsignore                    the tool's own files (images, cases, index.json, ...)
    sub-<label>/[ses-<label>/]anat/sub-<label>[_ses-<label>][_ce-<label>][_run-<n>]
        _desc-<preproc|recon|bitsmap|synthetic>_<suffix>.nii.gz   + a .json sidecar (same stem)

The BIDS NIfTI is a hard link to the file the command writes anyway (``images/<case>.nii.gz``,
``maps/<case>.nii.gz``, ``sample_0000.nii.gz``): no extra disk, and both paths stay where tools
and users expect them. Where the filesystem refuses a link, the bytes are copied (the cost: the
volume twice on disk, and each rerun copies again). Links are made with `atomic_path` and
remade whenever the image is rewritten (a rerun checks the inode), so the BIDS file always holds
the image's bytes. A folder with dataset_description.json is a BIDS view and is kept in
step: a later run into it updates the view even without ``--bids`` (`start_view`).

Labels (`case_names`), computed over every case of the manifest so that parts and splits agree:
a subject label is the manifest's subject_id without a leading ``sub-`` and without any
non-alphanumeric character (session: without ``ses-``, the same way). When two different ids
reduce to the same label (ignoring case: case-insensitive filesystems), each of them gets the
first 8 hex digits of the sha256 of its original id appended (an id with no alphanumeric
character gets those digits alone). Several cases of one subject, session and contrast get
``run-1``, ``run-2``... in case_id order. Suffix: the case's modality when it names a BIDS
anatomical contrast (T1w, T2w, FLAIR, PDw, T2starw, ..., case-insensitive; T1 -> T1w, T2 -> T2w,
PD -> PDw, T2star -> T2starw, T1ce/T1Gd -> T1w with ``ce-gadolinium``); anything else falls back
to T1w (the project's default contrast) and the sidecar records ``"SuffixFallback": true`` with
the original ``Modality``. Every sidecar holds ``"SkullStripped": false``, which BIDS requires of
anatomical derivatives: mri-vqvae never strips the skull (a source that arrived stripped, like the
kit's MNI template, is not detected). Checked in the tests with the official validator
(``bids-validator-deno``, a dev dependency). Stdlib only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any

from mri_vqvae import __version__
from mri_vqvae.core.atomic import atomic_path, atomic_write_text
from mri_vqvae.core.errors import MriVqvaeError
from mri_vqvae.data.case import Case
from mri_vqvae.data.scan import identify

log = logging.getLogger(__name__)

BIDS_VERSION = "1.9.0"
DESCRIPTION = "dataset_description.json"
PARTICIPANTS = "participants.tsv"
FALLBACK_SUFFIX = "T1w"
LABEL_RE = re.compile(r"[A-Za-z0-9]+")
_SUFFIXES = {s.lower(): (s, None) for s in ("T1w", "T2w", "PDw", "T2starw", "FLAIR", "inplaneT1",
                                              "inplaneT2", "PDT2", "angio", "FLASH")}
_SUFFIXES |= {"t1": ("T1w", None), "t2": ("T2w", None), "pd": ("PDw", None),
              "t2star": ("T2starw", None), "t1ce": ("T1w", "gadolinium"),
              "t1gd": ("T1w", "gadolinium")}
# Folder names without a trailing slash: the official validator (bids-validator 3) does not
# apply a "name/" pattern to the folder itself and reports it as NOT_INCLUDED.
_IGNORED = ("images", "montages", "cases", "maps", "parts", "*.csv", "index.json",
            "reconstruct.json", "sample_*", "*.png")


class BidsError(MriVqvaeError, ValueError):
    """A BIDS name that cannot be given (says which ids or files and what to do)."""


@dataclass(frozen=True)
class BidsName:
    """One derivative file's entities; `path` gives it relative to the dataset root."""

    subject: str
    desc: str
    suffix: str
    session: str | None = None
    ceagent: str | None = None
    run: int | None = None

    @property
    def stem(self) -> str:
        parts = [f"sub-{self.subject}"]
        parts += [f"ses-{self.session}"] if self.session else []
        parts += [f"ce-{self.ceagent}"] if self.ceagent else []
        parts += [f"run-{self.run}"] if self.run is not None else []
        return "_".join([*parts, f"desc-{self.desc}", self.suffix])

    def path(self, extension: str) -> PurePosixPath:
        folder = PurePosixPath(f"sub-{self.subject}")
        if self.session:
            folder /= f"ses-{self.session}"
        return folder / "anat" / f"{self.stem}{extension}"


def suffix_of(modality: str | None) -> tuple[str, str | None, bool]:
    """(BIDS suffix, ce label or None, whether the fallback was taken) of a modality."""
    found = _SUFFIXES.get((modality or "").lower())
    return (FALLBACK_SUFFIX, None, True) if found is None else (*found, False)


def _base(text: str, prefix: str) -> str:
    if text.lower().startswith(prefix):
        text = text[len(prefix):]
    return re.sub(r"[^A-Za-z0-9]", "", text)


def labels(ids: Iterable[str], prefix: str = "sub-") -> dict[str, str]:
    """Alphanumeric BIDS labels of distinct `ids` (module doc); `BidsError` if two still meet."""
    ids = sorted(set(ids))
    groups: dict[str, list[str]] = defaultdict(list)
    for i in ids:
        groups[_base(i, prefix).lower()].append(i)
    out = {}
    for key, members in groups.items():
        for i in members:
            tag = hashlib.sha256(i.encode("utf-8")).hexdigest()[:8]
            out[i] = _base(i, prefix) + (tag if len(members) > 1 or not key else "")
    seen: dict[str, str] = {}
    for i in ids:
        other = seen.setdefault(out[i].lower(), i)
        if other != i:
            raise BidsError(f"ids {other!r} and {i!r} both give the BIDS label {out[i]!r}: "
                            "rename one in the manifest, or write without --bids")
    return out


def case_names(cases: Sequence[Case], desc: str) -> dict[str, BidsName]:
    """The BIDS name of every case (by case_id), labels drawn over all `cases` (module doc)."""
    subjects = labels(c.subject_id for c in cases)
    sessions: dict[str, dict[str, str]] = {
        s: labels((c.session for c in cases if c.subject_id == s and c.session), "ses-")
        for s in subjects}
    names = {}
    for c in sorted(cases, key=lambda c: c.case_id):
        suffix, ce, _ = suffix_of(c.modality)
        session = sessions[c.subject_id].get(c.session) if c.session else None
        names[c.case_id] = BidsName(subjects[c.subject_id], desc, suffix, session, ce)
    return _number_runs(names)


def _number_runs(names: dict[str, BidsName]) -> dict[str, BidsName]:
    groups: dict[BidsName, list[str]] = defaultdict(list)
    for cid in sorted(names):
        groups[names[cid]].append(cid)
    out = dict(names)
    for name, cids in groups.items():
        if len(cids) > 1:
            for k, cid in enumerate(cids, start=1):
                out[cid] = BidsName(name.subject, name.desc, name.suffix, name.session,
                                    name.ceagent, k)
    return out


def synthetic_name(index: int, modality: str | None) -> BidsName:
    """``sub-synth<index:04d>``, ``desc-synthetic``, the suffix of `modality`."""
    suffix, ce, _ = suffix_of(modality)
    return BidsName(f"synth{index:04d}", "synthetic", suffix, None, ce)


def scan_name(path: str | Path, desc: str) -> tuple[BidsName, dict[str, Any]]:
    """(name, `id_fields`) of one scan file or DICOM folder, from its name alone.

    The subject and modality follow the manifest scanner's rules (`identify`); a ``ses-<label>``
    in the name gives the session.
    """
    path = Path(path)
    found = identify(PurePosixPath(path.name), path.is_dir())
    subject, modality = found if found is not None else (path.name, None)
    match = re.search(r"(?:^|_)ses-([A-Za-z0-9]+)", path.name)
    session = match[1] if match else None
    suffix, ce, _ = suffix_of(modality)
    name = BidsName(labels([subject])[subject], desc, suffix, session, ce)
    return name, id_fields(subject, session, modality)


def id_fields(subject: str | None, session: str | None, modality: str | None
              ) -> dict[str, Any]:
    """The sidecar's id mapping: the original subject and session ids, the modality."""
    return {"SubjectID": subject, "SessionID": session, "Modality": modality,
            "SuffixFallback": suffix_of(modality)[2]}


def case_fields(case: Case) -> dict[str, Any]:
    """`id_fields` of a manifest case."""
    return id_fields(case.subject_id, case.session, case.modality)


def _code_url() -> str | None:
    with contextlib.suppress(metadata.PackageNotFoundError):
        for entry in metadata.metadata("mri-vqvae").get_all("Project-URL") or []:
            label, _, url = entry.partition(",")
            if label.strip().lower() in ("source", "repository", "code", "homepage"):
                return url.strip()
    return None


def dataset_description(command: str, config_digest: str, manifest_name: str | None,
                        manifest_digest: str | None, models: Mapping[str, str] | None = None
                        ) -> dict[str, Any]:
    """dataset_description.json of a `command`'s folder (no time stamp: every part writes the
    same bytes)."""
    facts = [f"config digest {config_digest}",
             f"manifest {manifest_name or 'unnamed'} digest {manifest_digest or 'unknown'}",
             *(f"{k} sha256 {v}" for k, v in (models or {}).items())]
    generated: dict[str, Any] = {"Name": "mri-vqvae", "Version": __version__,
                                 "Description": f"mri-vqvae {command}: " + "; ".join(facts)}
    url = _code_url()
    if url:
        generated["CodeURL"] = url
    doc: dict[str, Any] = {"Name": f"mri-vqvae {command}" + (f" of {manifest_name}"
                                                           if manifest_name else ""),
                           "BIDSVersion": BIDS_VERSION, "DatasetType": "derivative",
                           "GeneratedBy": [generated]}
    if manifest_digest:
        doc["SourceDatasets"] = [{"Name": manifest_name, "Version": manifest_digest}
                                 if manifest_name else {"Version": manifest_digest}]
    return doc


def _write_if_changed(path: Path, text: str) -> None:
    with contextlib.suppress(OSError):
        if path.read_text(encoding="utf-8") == text:
            return
    atomic_write_text(path, text)


def has_view(out: str | Path) -> bool:
    """Whether `out` holds a BIDS view (its dataset_description.json)."""
    return (Path(out) / DESCRIPTION).is_file()


def start_view(out: str | Path, enabled: bool, description: Mapping[str, Any],
               ignored: Sequence[str] = ()) -> bool:
    """Whether this run keeps a BIDS view in `out`: when `enabled`, or when `out` holds one
    already (a view left behind would go stale). Then dataset_description.json and .bidsignore
    are written (idempotent: parts may all do it)."""
    out = Path(out)
    if not (enabled or has_view(out)):
        return False
    if not enabled:
        log.info("%s holds a BIDS view: it is kept in step (--no-bids only keeps a folder "
                 "without one)", out)
    _write_if_changed(out / DESCRIPTION, json.dumps(description, indent=2) + "\n")
    old = set()
    with contextlib.suppress(OSError):
        old = set((out / ".bidsignore").read_text(encoding="utf-8").split())
    lines = sorted(old | set(_IGNORED) | set(ignored))
    _write_if_changed(out / ".bidsignore", "\n".join(lines) + "\n")
    return True


def view_folders(out: str | Path) -> list[Path]:
    """The anat folders of a BIDS view (where a killed run may leave temp files)."""
    return sorted(p for p in Path(out).glob("sub-*/**/anat") if p.is_dir())


def _link_or_copy(image: Path, target: Path) -> None:
    """`target` becomes `image`'s inode (atomically), or a copy of its bytes without links."""
    if target.is_file() and os.path.samefile(image, target):
        return
    with atomic_path(target) as tmp:
        tmp.unlink()
        try:
            os.link(image, tmp)
        except OSError:  # no hard links here (FAT, some network shares): copy the bytes
            shutil.copyfile(image, tmp)


def check_owner(out: str | Path, name: BidsName, case_id: str) -> None:
    """`BidsError` when `name` in `out` already holds another case's file (its sidecar's
    ``CaseID``): a BIDS file is only ever replaced by the same case."""
    meta = Path(out) / name.path(".json")
    owner = None
    with contextlib.suppress(OSError, ValueError, AttributeError):
        owner = json.loads(meta.read_text(encoding="utf-8")).get("CaseID")
    if meta.is_file() and owner != case_id:
        raise BidsError(f"{meta.with_suffix('').relative_to(out)}.nii.gz already holds "
                        f"{owner!r}, not {case_id!r}: write into another folder (the labels "
                        "there come from another manifest or scan)")


def publish(out: str | Path, name: BidsName, image: Path, sidecar: Mapping[str, Any]) -> Path:
    """Give `image` (inside `out`) its BIDS name: a hard link (a copy where links fail) and a
    JSON sidecar; idempotent. `sidecar["CaseID"]` says whose file it is: a BIDS file of another
    case is never replaced (`check_owner`)."""
    out = Path(out)
    target = out / name.path(".nii.gz" if image.name.endswith(".gz") else ".nii")
    meta = out / name.path(".json")
    check_owner(out, name, sidecar["CaseID"])
    _link_or_copy(image, target)
    sidecar = {"SkullStripped": False, **sidecar}  # required for anat derivatives
    _write_if_changed(meta, json.dumps(sidecar, indent=2, sort_keys=True) + "\n")
    return target


def write_participants(out: str | Path) -> Path | None:
    """participants.tsv (and .json) from the sidecars of every subject in `out`'s BIDS view;
    None (nothing written) when `out` holds no view."""
    out = Path(out)
    if not has_view(out):
        return None
    rows = {}
    for folder in sorted(p for p in out.glob("sub-*") if p.is_dir()):
        original = "n/a"
        for meta in sorted(folder.glob("**/anat/*.json")):
            with contextlib.suppress(OSError, json.JSONDecodeError):
                original = json.loads(meta.read_text(encoding="utf-8")).get("SubjectID") or "n/a"
                break
        rows[folder.name] = re.sub(r"\s", " ", str(original))
    text = "participant_id\tsubject_id\n" + "".join(f"{k}\t{v}\n" for k, v in rows.items())
    _write_if_changed(out / PARTICIPANTS, text)
    columns = {"participant_id": {"Description": "the BIDS subject label (sub-<label>)"},
               "subject_id": {"Description": "the manifest's subject_id this label was derived "
                                             "from (n/a: a synthetic volume or unknown)"}}
    _write_if_changed(out / "participants.json", json.dumps(columns, indent=2) + "\n")
    return out / PARTICIPANTS

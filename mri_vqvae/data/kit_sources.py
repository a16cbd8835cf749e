"""URL sources of the offline kit: real volumes pinned by URL and sha256, or read from a mirror.

One source so far, ``open-ms-longitudinal``: the raw (original scanner space, defaced) T1w, T2w
and FLAIR scans of 7 multiple-sclerosis patients, each scanned in two studies, from the public
Longitudinal MR image database of MS patients (Laboratory of Imaging Technologies, University of
Ljubljana; CC-BY; Lesjak et al., Neuroinformatics 2016) as redistributed in the GitHub
repository muschellij2/open_ms_data at commit `OPEN_MS_COMMIT`. Each file comes from
``<base URL>/<path>`` through `mri_vqvae.data.download.fetch` (resumable, sha256-checked), or is
copied from a local mirror that holds the same relative paths. The sha256 values recorded here
are the source of truth: a file that differs is never used.

Settings: ``--mirror DIR`` or ``MRI_VQVAE_KIT_MIRROR=DIR`` (the mirror, used instead of the
network) and ``MRI_VQVAE_OPEN_MS_BASE_URL`` (another base URL: a proxy or a local server).

A source enters the kit whole or not at all, so its subjects and splits are always the ones
designed here. The lesion-change masks (``gt.nii.gz``) are left out: they live in the upstream
co-registered space, not in the raw space of these files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mri_vqvae.config import COHORT_MODALITIES
from mri_vqvae.core.atomic import atomic_path
from mri_vqvae.core.errors import DownloadError
from mri_vqvae.core.provenance import sha256_file
from mri_vqvae.data.catalog import load_catalog
from mri_vqvae.data.download import fetch
from mri_vqvae.data.manifest import Manifest
from mri_vqvae.data.scan import modality_from_name

log = logging.getLogger(__name__)

MIRROR_ENV = "MRI_VQVAE_KIT_MIRROR"
OPEN_MS_BASE_URL_ENV = "MRI_VQVAE_OPEN_MS_BASE_URL"
OPEN_MS_ID = "open-ms-longitudinal"
OPEN_MS_COMMIT = "65704901f60650824565aa5a4818611aa89716f4"
OPEN_MS_BASE_URL = (
    f"https://raw.githubusercontent.com/muschellij2/open_ms_data/{OPEN_MS_COMMIT}/longitudinal"
)

# sha256 of every raw image the kit uses (upstream SHA256SUMS, lesion masks left out).
OPEN_MS_SHA256: Mapping[str, str] = {
    "raw/patient01/study1_FLAIR.nii.gz":
        "3a2ab438704776ad75b67cd8609740a14782cc590b26fc695dff4216ad67d231",
    "raw/patient01/study1_T1W.nii.gz":
        "e5c495fa0bc6f61f7eb23cd985177f1338748a84e1be295e0639a9b97975ad4b",
    "raw/patient01/study1_T2W.nii.gz":
        "9ca59a8473619fa20f9bf80f4d7a470f53e4d0ae64ba20acdc49297ce89ad164",
    "raw/patient01/study2_FLAIR.nii.gz":
        "d3bb8754526f291e787f522520af7011d5bcfadd121f7d1e8cad16e4daf70f27",
    "raw/patient01/study2_T1W.nii.gz":
        "3481e8e65ae7e920a24a04054e1019e5662aa7f09f485b8a5d9a01a72cf125cb",
    "raw/patient01/study2_T2W.nii.gz":
        "f271a30ae512c69acb1f028b0681222e95032d44eb95c919b123ac2ad1b1f6a8",
    "raw/patient03/study1_FLAIR.nii.gz":
        "bed2dc7a40f812ef89434d6aaf0cf83116a0eef3c903422e3732a74b3e1bfbd8",
    "raw/patient03/study1_T2W.nii.gz":
        "dfeb4d8fcf0a2fb4bb9794ee143cf9696ae9bf881f8b713658912e28affdc159",
    "raw/patient03/study2_FLAIR.nii.gz":
        "e0ec8ec77763a5fb7177325bb6c6372cb6e744242b9700bc9fc0ba00a27aeff0",
    "raw/patient03/study2_T1W.nii.gz":
        "a514a804939724ceb1e232b8ef179d4c2f39d9b7b481deed1b7f6368b3d87029",
    "raw/patient03/study2_T2W.nii.gz":
        "c037a753bf4bef5cfe9ddedc10f855b58ceb06a9888550cc5cb18cede8f820d5",
    "raw/patient04/study1_FLAIR.nii.gz":
        "78a3a0136b5c0e0ecda98bdc105d49ef08b17ec607400a72989313b8e501b53d",
    "raw/patient04/study1_T1W.nii.gz":
        "d14d6dd3ecebe0b362afcbe88291360c0f9bad0847aace908acb11e87de1a597",
    "raw/patient04/study1_T2W.nii.gz":
        "de5f799bccb145fddb9cef72f6676c95c4cf1178bcc16916ab8bd1381aa65532",
    "raw/patient09/study2_FLAIR.nii.gz":
        "da4aa2cb2111cd6ecdef4c3fe6062573277ee5bd01a9a394e003ecf74aac5213",
    "raw/patient12/study1_FLAIR.nii.gz":
        "c0c030d766062305d4f6215d2fe7706f995f98bb8234de246dd506cdcbda2734",
    "raw/patient12/study1_T1W.nii.gz":
        "3decf392b656b41af1ff107fe34aeba8e66fdf23eefc8656dc8804ff62f4e388",
    "raw/patient12/study1_T2W.nii.gz":
        "da2b3cedef895be66657fa2fb54867d7c67ef9ce05ba2233a540bd0b4aa7a6c8",
    "raw/patient12/study2_FLAIR.nii.gz":
        "38a68c69ed8a58db14055d0a39cb901dedb0d2cac9f1aa059136ada212b2f805",
    "raw/patient12/study2_T1W.nii.gz":
        "9322cf08eb03624ff6aec781c74bdcf54a77d414e0695f5de9fd52aaa94f0fac",
    "raw/patient12/study2_T2W.nii.gz":
        "7528946d765ccae631edbf2cafd375de99a5249b5afb0aa049842c456b857bd3",
    "raw/patient19/study1_FLAIR.nii.gz":
        "7810456d4881173d8c0f5ee1fc3eb1a14e84d6cf7418f0b95fbebd5bb0a4eb5b",
    "raw/patient19/study2_FLAIR.nii.gz":
        "524371988486b5cbd758d82d873a883a9ea3c87177fb209c82babd4309d3f76f",
    "raw/patient19/study2_T1W.nii.gz":
        "e5a1e44bbf880f74640eda6c03abe6af096e6cf0409be3b5859c1429186afe9c",
    "raw/patient20/study2_FLAIR.nii.gz":
        "2f011e01366182593c0d8bca7b13cd5829b8e52826d323164881ef8fd0906d7e",
    "raw/patient20/study2_T1W.nii.gz":
        "547488ee9918e90cda99052671e5c59c14e149acddefd72f73ded41797d91a73",
}

# Frozen split per patient (4 / 1 / 2), chosen so that every split holds T1w, T2w and FLAIR:
# T2w exists for patients 01, 03, 04 and 12 only, so two of them train, one validates, one tests.
OPEN_MS_SPLITS: Mapping[str, str] = {
    "patient01": "train", "patient09": "train", "patient12": "train", "patient19": "train",
    "patient04": "val",
    "patient03": "test", "patient20": "test",
}

_OPEN_MS_PATH_RE = re.compile(r"raw/(patient\d+)/(study\d+)_[A-Za-z0-9]+\.nii\.gz")
_MISMATCH = "does not match the expected"  # how download.fetch words a sha256 mismatch


class MirrorError(DownloadError):
    """A kit mirror that is not a folder, or holds a file whose sha256 is not the recorded one."""


@dataclass(frozen=True)
class UrlFile:
    """One real volume of a URL source: `path` under the source's base URL and under a mirror."""

    source_id: str  # id in data_manifests/sources.json
    path: str
    sha256: str
    subject_id: str
    session: str
    modality: str
    split: str

    @property
    def case_id(self) -> str:
        """``<subject>-<session>-<modality>``, e.g. ``open-ms-patient01-study1-T1w``."""
        return f"{self.subject_id}-{self.session}-{self.modality}"

    @property
    def kit_path(self) -> str:
        """Where the kit keeps the file, relative to the kit root."""
        return f"real/{self.source_id}/{self.path}"

    @property
    def url(self) -> str:
        """The file's URL under the current base URL (see `open_ms_base_url`)."""
        return f"{open_ms_base_url()}/{self.path}"


def open_ms_base_url() -> str:
    """``$MRI_VQVAE_OPEN_MS_BASE_URL`` when set, else the pinned GitHub raw URL."""
    return (os.environ.get(OPEN_MS_BASE_URL_ENV, "").strip() or OPEN_MS_BASE_URL).rstrip("/")


def open_ms_files(modalities: Iterable[str] = COHORT_MODALITIES) -> tuple[UrlFile, ...]:
    """The pinned open_ms files of `modalities`, by path; subject, session and contrast parsed
    from ``raw/patientNN/studyK_{T1W,T2W,FLAIR}.nii.gz``."""
    wanted = set(modalities)
    files = []
    for path, sha in sorted(OPEN_MS_SHA256.items()):
        match = _OPEN_MS_PATH_RE.fullmatch(path)
        modality = modality_from_name(path)
        if match is None or modality is None:
            raise ValueError(f"OPEN_MS_SHA256: {path} is not raw/patientNN/studyK_<contrast>")
        patient, study = match.groups()
        if modality in wanted:
            files.append(UrlFile(OPEN_MS_ID, path, sha, f"open-ms-{patient}", study, modality,
                                 OPEN_MS_SPLITS[patient]))
    return tuple(files)


def resolve_mirror(mirror: str | Path | None = None) -> Path | None:
    """The mirror folder: `mirror`, else ``$MRI_VQVAE_KIT_MIRROR``, else None (use the URLs).

    There is no implicit default location: a build reads a mirror only when told to.
    """
    origin = "--mirror"
    if mirror is None or str(mirror) == "":
        mirror, origin = os.environ.get(MIRROR_ENV, "").strip(), MIRROR_ENV
        if not mirror:
            return None
    path = Path(mirror).expanduser()
    if not path.is_dir():
        drop = f"unset {MIRROR_ENV}" if origin == MIRROR_ENV else "leave out --mirror"
        raise MirrorError(
            f"kit mirror {path} (from {origin}) is not a folder: give the folder that holds "
            f"raw/patientNN/... as under {OPEN_MS_BASE_URL}/, or {drop} to download"
        )
    return path.resolve()


def fetch_url_files(root: Path, files: Sequence[UrlFile], mirror: Path | None = None
                    ) -> tuple[list[UrlFile], str | None]:
    """Place every file under `root` (verified cached files are kept): from `mirror` when given,
    else from its URL. All or nothing: returns (files, None), or ([], why they were skipped).

    A file whose sha256 is not the recorded one raises: `MirrorError` naming the mirror file,
    or `DownloadError` naming the URL (`fetch` has deleted the download).
    """
    for f in files:
        out = root / f.kit_path
        if out.is_file() and sha256_file(out) == f.sha256:
            continue
        why = _copy_from_mirror(f, mirror, out) if mirror else _download(f, out)
        if why:
            log.warning("kit: skipping the %s source (%d files): %s", f.source_id, len(files), why)
            return [], why
    return list(files), None


def _copy_from_mirror(f: UrlFile, mirror: Path, out: Path) -> str | None:
    """Copy one file, hashing the bytes written; the reason when the mirror lacks it."""
    src = mirror / f.path
    if not src.is_file():
        return (f"{src} is not in the mirror {mirror} (it must hold the same relative paths as "
                f"{OPEN_MS_BASE_URL}/); copy the file there, or leave its contrast out "
                "(kit.cohort_modalities)")
    try:
        with atomic_path(out) as tmp:
            got = _copy_hashing(src, tmp)
            if got != f.sha256:
                raise MirrorError(
                    f"{src}: sha256 {got} does not match the recorded {f.sha256} of {f.path} "
                    f"({f.source_id}); the mirror file is damaged or another version: replace "
                    f"it with {OPEN_MS_BASE_URL}/{f.path} and run again"
                )
    except OSError as exc:
        return f"{src}: copy to {out} failed ({exc.strerror or exc})"
    return None


def _copy_hashing(src: Path, dst: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while block := fin.read(chunk):
            h.update(block)
            fout.write(block)
    return h.hexdigest()


def _download(f: UrlFile, out: Path) -> str | None:
    """Fetch one file; the reason when it cannot be had now (a checksum mismatch raises)."""
    try:
        fetch(f.url, out, sha256=f.sha256)
    except DownloadError as exc:
        if _MISMATCH in str(exc):
            raise DownloadError(
                f"{exc}. The kit refuses {f.path} of {f.source_id}: check "
                f"{OPEN_MS_BASE_URL_ENV} (now {open_ms_base_url()}) or use a verified copy "
                f"with --mirror DIR / {MIRROR_ENV}"
            ) from None
        return (f"{exc}. Without network, give a local copy of the files with --mirror DIR or "
                f"{MIRROR_ENV}=DIR (same relative paths as {OPEN_MS_BASE_URL}/)")
    return None


# --- licences and citations ----------------------------------------------------------------


def citations(manifest: Manifest, catalog: Mapping[str, Mapping[str, Any]] | None = None
              ) -> list[str]:
    """One line per source of `manifest` (in order of first use): name, licence, what to cite.

    For reports and sample sidecars; `catalog` defaults to ``data_manifests/sources.json``.
    """
    return source_citations([c.source_id for c in manifest.cases], catalog)


def run_citations(run_dir: str | Path) -> list[str]:
    """`source_citations` of the train cases in a VQ-VAE run's manifest copy (manifest.json).

    What a synthetic volume or a report must credit: the sources its models learnt from.
    """
    path = Path(run_dir) / "manifest.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        cases = doc["cases"] if isinstance(doc, dict) else []
    except (OSError, ValueError, KeyError):
        return [f"training sources unknown: {path} is missing or unreadable"]
    ids = [c.get("source_id") for c in cases if isinstance(c, dict) and c.get("split") == "train"]
    return source_citations(i for i in ids if isinstance(i, str))


def source_citations(source_ids: Iterable[str],
                     catalog: Mapping[str, Mapping[str, Any]] | None = None) -> list[str]:
    """`citations` for a list of source ids (duplicates collapse, first-use order kept)."""
    catalog = load_catalog() if catalog is None else catalog
    lines = []
    for sid in dict.fromkeys(source_ids):
        rec = catalog.get(sid)
        if rec is None:
            lines.append(f"{sid}: not in the sources catalog; licence and citation unknown")
            continue
        licence = rec.get("licence") or f"not recorded (check {rec.get('url')})"
        lines.append(f"{sid}: {rec.get('name')}. Licence: {licence}. "
                     f"Cite: {rec.get('citation')}")
    return lines

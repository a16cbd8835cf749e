"""Preprocess once: stages read a verified `preprocess` folder, else fall back to the chain."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mri_vqvae.config import load_config
from mri_vqvae.core.provenance import sha256_file
from mri_vqvae.data.case import Case
from mri_vqvae.data.datasets import case_items, make_dataset, plain_volume
from mri_vqvae.data.manifest import Manifest
from mri_vqvae.data.preprocessed import (
    PreprocessedCase,
    PreprocessedStore,
    case_files,
    finished_case,
    read_finished,
    with_store,
    write_sidecar,
)
from mri_vqvae.data.transforms import IMAGE, build_transforms
from mri_vqvae.tasks.preprocess import preprocess_manifest
from tests.support.volumes import make_head, write_nifti


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Manifest, Path]:
    root = tmp_path / "data"
    root.mkdir()
    cases = []
    for i, name in enumerate(("a", "b")):
        path = root / f"{name}.nii.gz"
        write_nifti(path, make_head(seed=i))
        cases.append(Case(case_id=name, subject_id=name, source_id="s", path=path.name,
                          sha256=sha256_file(path), bytes=path.stat().st_size, modality="T1w",
                          shape=(24, 28, 20), spacing=(1.5, 1.5, 1.5), split="train"))
    manifest = Manifest(name="t", cases=tuple(cases), data_root=root)
    done, failures = preprocess_manifest(manifest, load_config("smoke"), tmp_path / "prep")
    assert len(done) == 2 and not failures
    return manifest, tmp_path / "prep"


def _volumes(manifest: Manifest, chain) -> list[torch.Tensor]:
    data = load_config("smoke").data
    ds = make_dataset(case_items(manifest, data), chain)
    return [plain_volume(ds[i][IMAGE]) for i in range(len(ds))]


def test_stored_volumes_equal_the_chain_bit_for_bit(setup: tuple[Manifest, Path]) -> None:
    manifest, prep = setup
    data = load_config("smoke").data
    chain = build_transforms(data)
    store_chain = with_store(chain, prep, data)
    store: PreprocessedStore = store_chain.transforms[0].store
    direct, stored = _volumes(manifest, chain), _volumes(manifest, store_chain)
    assert (store.hits, store.misses) == (2, 0)  # read once each: cached by CacheDataset
    assert all(torch.equal(a, b) for a, b in zip(direct, stored, strict=True))


def test_a_changed_stored_file_or_another_config_falls_back_to_the_chain(
    setup: tuple[Manifest, Path],
) -> None:
    manifest, prep = setup
    data = load_config("smoke").data
    (prep / "images" / "a.nii.gz").write_bytes(b"tampered")
    store_chain = with_store(build_transforms(data), prep, data)
    volumes = _volumes(manifest, store_chain)
    store = store_chain.transforms[0].store
    assert (store.hits, store.misses) == (1, 1)
    assert torch.equal(volumes[0], _volumes(manifest, build_transforms(data))[0])

    other = load_config("smoke", ["data.percentiles=[1,99]"]).data
    store_chain = with_store(build_transforms(other), prep, other)
    make_dataset(case_items(manifest, other), store_chain)
    assert store_chain.transforms[0].store.hits == 0


def test_a_missing_folder_means_the_plain_chain(tmp_path: Path) -> None:
    data = load_config("smoke").data
    chain = build_transforms(data)
    assert with_store(chain, tmp_path / "absent", data) is chain
    assert with_store(chain, None, data) is chain


def test_a_sidecar_round_trips_and_marks_only_its_own_case_finished(tmp_path: Path) -> None:
    image, montage = case_files("a")
    case = PreprocessedCase("a", "s1", "train", image, montage, (2, 3, 4), (1.0, 1.5, 2.0),
                            np.eye(4).tolist(), "f" * 64)
    for rel, content in ((image, b"nifti bytes"), (montage, b"png bytes")):
        (tmp_path / rel).parent.mkdir(parents=True)
        (tmp_path / rel).write_bytes(content)
    write_sidecar(tmp_path, case, "d" * 64, "session")
    item = {"case_id": "a", "subject_id": "s1", "split": "train", "sha256": "f" * 64}
    assert finished_case(tmp_path, item, "d" * 64) == case
    assert read_finished(tmp_path, item, "d" * 64) == (case, b"nifti bytes")
    for change in ({"split": "val"}, {"subject_id": "s2"}, {"sha256": "e" * 64}):
        assert finished_case(tmp_path, {**item, **change}, "d" * 64) is None
    assert finished_case(tmp_path, item, "c" * 64) is None  # another data config
    (tmp_path / montage).write_bytes(b"another montage")
    assert finished_case(tmp_path, item, "d" * 64) is None

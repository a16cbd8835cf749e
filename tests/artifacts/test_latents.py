"""The latents store: `load_latents` validation, `LatentIndex`, `LatentDataset`, labels.

Folders are written by hand (`tests.support.runs.write_latents`) in the format encode writes;
encoding itself is tested in tests/tasks/test_encode.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mri_vqvae.artifacts.latents import (
    JOURNAL,
    LatentCase,
    LatentDataset,
    LatentsError,
    load_latents,
    npy_bytes,
    read_grid,
)
from tests.support.runs import write_latents

SPLITS = {"a": "train", "b": "train", "c": "train", "v": "val", "t": "test"}


def _grids(seed: int = 0) -> dict[str, tuple[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {cid: (split, rng.integers(0, 32, (4, 4, 4)).astype(np.uint16))
            for cid, split in SPLITS.items()}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_latents(tmp_path_factory.mktemp("latents") / "lat", _grids())


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / folder.name))


def _replace_grid(folder: Path, case_id: str, grid: np.ndarray) -> None:
    """Write `grid` as the case's file and record its sha256, as a careless edit would."""
    content = npy_bytes(grid)
    (folder / f"{case_id}.npy").write_bytes(content)
    doc = json.loads((folder / "index.json").read_text())
    for c in doc["cases"]:
        if c["case_id"] == case_id:
            c["sha256"] = hashlib.sha256(content).hexdigest()
    (folder / "index.json").write_text(json.dumps(doc))


def test_load_latents_reads_every_grid_exactly(folder: Path) -> None:
    index = load_latents(folder)
    expected = _grids()
    assert (index.latent_shape, index.codebook_size) == ((4, 4, 4), 32)
    assert all(np.array_equal(index.grids[cid], grid) for cid, (_, grid) in expected.items())
    assert [c.case_id for c in index.split_cases("train")] == ["a", "b", "c"]
    ds = LatentDataset(index, "train")
    assert len(ds) == 3 and ds[0].dtype == torch.int64
    assert torch.equal(ds.grids, torch.from_numpy(np.stack(
        [expected[c][1] for c in ("a", "b", "c")]).astype(np.int64)))
    assert len(LatentDataset(index, "nope")) == 0 and index.stack("nope").shape == (0, 4, 4, 4)
    prov = index.provenance()
    assert set(prov) == {"latents_dir", "vqvae_checkpoint", "vqvae_sha256", "manifest_digest",
                         "latent_shape", "codebook_size", "data"}
    assert prov["latents_dir"] == str(folder.resolve()) and prov["vqvae_sha256"] == "1" * 64


def test_cases_carry_their_labels_and_old_folders_load_without(tmp_path: Path) -> None:
    labelled = load_latents(write_latents(tmp_path / "new", _grids()))
    assert labelled.cases[0] == LatentCase(
        "a", "sub-a", "train", "a.npy", labelled.cases[0].sha256, "0" * 64, "T1w", "src-a")
    old = load_latents(write_latents(tmp_path / "old", _grids(), labels=False))
    assert [(c.modality, c.source_id) for c in old.cases] == [(None, None)] * len(SPLITS)
    assert all(np.array_equal(old.grids[c], labelled.grids[c]) for c in SPLITS)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("tamper", r"v\.npy: sha256 .* does not match"),
        ("dtype", r"v\.npy: dtype int32, expected uint16"),
        ("range", r"v\.npy: holds code 32, outside \[0, 32\)"),
        ("shape", r"v\.npy: shape \(4, 4\), expected latent_shape"),
        ("missing", r"v\.npy cannot be read"),
    ],
)
def test_load_latents_refuses_bad_grids_naming_the_file(
    folder: Path, tmp_path: Path, edit: str, message: str
) -> None:
    out = _copy(folder, tmp_path)
    grid = np.load(out / "v.npy")
    if edit == "tamper":
        (out / "v.npy").write_bytes(npy_bytes(np.zeros_like(grid) + 1 - grid.clip(0, 1)))
    elif edit == "dtype":
        _replace_grid(out, "v", grid.astype(np.int32))
    elif edit == "range":
        _replace_grid(out, "v", np.full_like(grid, 32))
    elif edit == "shape":
        _replace_grid(out, "v", grid[0])
    else:
        (out / "v.npy").unlink()
    with pytest.raises(LatentsError, match=message):
        load_latents(out)


def test_verify_false_skips_only_the_checksum(folder: Path, tmp_path: Path) -> None:
    out = _copy(folder, tmp_path)
    (out / "v.npy").write_bytes(npy_bytes(np.full((4, 4, 4), 31, np.uint16)))  # not as recorded
    assert (load_latents(out, verify=False).grids["v"] == 31).all()
    with pytest.raises(LatentsError, match="sha256"):
        load_latents(out)
    with pytest.raises(LatentsError, match=r"holds code 31, outside \[0, 31\)"):
        read_grid(out / "v.npy", None, (4, 4, 4), 31)


def test_load_latents_refuses_a_folder_without_index(tmp_path: Path) -> None:
    with pytest.raises(LatentsError, match="not a latents folder.*mri-vqvae encode"):
        load_latents(tmp_path)


def test_an_interrupted_encode_is_reported(
    folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = _copy(folder, tmp_path)
    (out / JOURNAL).write_text("")
    with caplog.at_level(logging.WARNING):
        assert len(load_latents(out).cases) == len(SPLITS)
    assert "interrupted" in caplog.text


def _add_view(folder: Path, source: str, k: int, **fields: object) -> np.ndarray:
    """Write view `k` of case `source` and its index entry (`fields` override the entry)."""
    grid = (np.load(folder / f"{source}.npy") + k) % 32
    content = npy_bytes(grid.astype(np.uint16))
    (folder / f"{source}~aug{k}.npy").write_bytes(content)
    doc = json.loads((folder / "index.json").read_text())
    doc["cases"].append({"case_id": f"{source}~aug{k}", "subject_id": f"sub-{source}",
                         "split": "train", "file": f"{source}~aug{k}.npy",
                         "sha256": hashlib.sha256(content).hexdigest(), "source_sha256": "0" * 64,
                         "modality": "T1w", "source_id": f"src-{source}", "view": k,
                         "source_case": source, **fields})
    (folder / "index.json").write_text(json.dumps(doc))
    return grid


def test_views_load_with_their_source_and_cases_without_view_fields_are_view_0(
    folder: Path, tmp_path: Path
) -> None:
    out = _copy(folder, tmp_path)
    grid = _add_view(out, "a", 2)
    index = load_latents(out)
    by_id = {c.case_id: c for c in index.cases}
    assert (by_id["a~aug2"].view, by_id["a~aug2"].source_case) == (2, "a")
    assert all((by_id[c].view, by_id[c].source_case) == (0, None) for c in SPLITS)
    assert np.array_equal(index.grids["a~aug2"], grid)
    train = LatentDataset(index, "train")
    assert [c.case_id for c in train.cases] == ["a", "b", "c", "a~aug2"]  # index.json's order
    assert torch.equal(train[3], torch.from_numpy(grid.astype(np.int64)))
    assert [c.case_id for c in index.split_cases("val")] == ["v"]


@pytest.mark.parametrize("fields", [{"source_case": None}, {"view": 0}, {"view": "2"},
                                    {"view": True}, {"view": -1, "source_case": None}])
def test_a_view_entry_must_name_its_source_case(
    folder: Path, tmp_path: Path, fields: dict[str, object]
) -> None:
    out = _copy(folder, tmp_path)
    _add_view(out, "a", 2, **fields)
    with pytest.raises(LatentsError, match=r"cases\[5\] has view .* source_case"):
        load_latents(out)

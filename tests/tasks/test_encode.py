"""`mri-vqvae encode` (tasks/encode.py): values, provenance, labels, resume, failures.

An untrained tiny VQ-VAE (the smoke config: 16^3 volumes -> 4x4x4 grids over 32 codes) is saved
once per module as ``<run>/checkpoints/best``; five synthetic heads (3 train, 1 val, 1 test) are
encoded once into a shared folder, and tests that change a folder work on a copy.
"""

from __future__ import annotations

import copy
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mri_vqvae.artifacts import latents as latents_mod
from mri_vqvae.artifacts.checkpoint import load_checkpoint
from mri_vqvae.artifacts.latents import LatentsError, load_latents
from mri_vqvae.config import AugmentConfig, config_digest, load_config
from mri_vqvae.core.errors import CheckpointError, ConfigError
from mri_vqvae.core.outputs import OutputError
from mri_vqvae.core.provenance import sha256_file
from mri_vqvae.data.manifest import load_manifest
from mri_vqvae.data.transforms import augment_only, build_transforms
from mri_vqvae.models.autoencoders.vqvae.config import VQVAEConfig
from mri_vqvae.models.autoencoders.vqvae.model import VQVAE
from mri_vqvae.tasks import encode as encode_mod
from mri_vqvae.tasks.encode import encode_manifest
from mri_vqvae.tasks.views import view_seed
from mri_vqvae.training.prior_data import load_prior_data
from pipelines.cli import cli, main
from tests.support.runs import HEAD_SPLITS as SPLITS
from tests.support.runs import save_vqvae_run, write_cases


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_cases(tmp_path_factory.mktemp("heads"), SPLITS)


@pytest.fixture(scope="module")
def vqvae_run(manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_vqvae_run(tmp_path_factory.mktemp("vqvae") / "run", manifest=manifest)


@pytest.fixture(scope="module")
def encoded(manifest: Path, vqvae_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every case encoded once through the CLI; returns the latents folder."""
    out = tmp_path_factory.mktemp("latents") / "lat"
    result = CliRunner().invoke(cli, ["encode", "--vqvae", str(vqvae_run), "--manifest",
                                      str(manifest), "--out", str(out), "--device", "cpu"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "encoded 5 case(s)" in result.output
    return out


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / folder.name))


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.npy")}


# --- what encode writes --------------------------------------------------------------------------


def test_grids_equal_encode_indices_of_the_preprocessed_volume(
    manifest: Path, vqvae_run: Path, encoded: Path
) -> None:
    model = load_checkpoint(vqvae_run / "checkpoints" / "best").model
    cfg = load_config("smoke")
    chain = build_transforms(cfg.data)
    m = load_manifest(manifest)
    codes = set()
    for case in m.cases:
        grid = np.load(encoded / f"{case.case_id}.npy", allow_pickle=False)
        assert grid.dtype == np.uint16 and grid.shape == (4, 4, 4)
        volume = chain({"image": str(m.data_root / case.path)})["image"].as_tensor()
        expected = model.encode_indices(volume[None].float())[0]
        assert torch.equal(torch.from_numpy(grid.astype(np.int64)), expected), case.case_id
        codes |= set(grid.ravel().tolist())
    assert len(codes) > 1  # the grids carry information, not one constant code


def test_index_records_provenance_and_checksums(
    manifest: Path, vqvae_run: Path, encoded: Path
) -> None:
    doc = json.loads((encoded / "index.json").read_text())
    best = vqvae_run / "checkpoints" / "best"
    assert doc["vqvae_run"] == str(vqvae_run.resolve())
    assert doc["vqvae_checkpoint"] == str(best.resolve())
    assert doc["vqvae_sha256"] == sha256_file(best / "model.safetensors")
    assert doc["manifest_digest"] == load_manifest(manifest).digest
    assert (doc["latent_shape"], doc["codebook_size"], doc["dtype"]) == ([4, 4, 4], 32, "uint16")
    assert doc["data"]["spacing"] == [3.0, 3.0, 3.0] and doc["data"]["spatial_size"] == [16] * 3
    assert [c["case_id"] for c in doc["cases"]] == sorted(SPLITS)
    for c in doc["cases"]:
        assert c["file"] == f"{c['case_id']}.npy" and c["split"] == SPLITS[c["case_id"]]
        assert c["subject_id"] == f"sub-{c['case_id']}"
        assert (c["modality"], c["source_id"]) == ("T1w", "synthetic")
        assert c["sha256"] == sha256_file(encoded / c["file"])
    assert not (encoded / "index.journal").exists()
    assert (encoded / "failures.csv").read_text().splitlines() == ["case_id,path,reason"]


def test_encoding_never_moves_the_codebook(
    manifest: Path, vqvae_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[VQVAE, bool, dict[str, torch.Tensor]]] = []
    real = encode_mod.encode_item

    def spy(model: VQVAE, *args: object) -> dict[int, np.ndarray]:
        if not seen:
            state = {k: v.clone() for k, v in model.state_dict().items()}
            seen.append((model, model.training, state))
        return real(model, *args)

    monkeypatch.setattr(encode_mod, "encode_item", spy)
    encode_manifest(vqvae_run, load_manifest(manifest), tmp_path / "lat", device="cpu")
    model, training, before = seen[0]
    assert training is False
    after = model.state_dict()
    assert torch.equal(after["quantizer.codebook"], before["quantizer.codebook"])
    assert all(torch.equal(after[k], before[k]) for k in before)  # EMA buffers too


def test_index_json_is_written_twice_per_encode_not_once_per_case(
    manifest: Path, vqvae_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes: list[str] = []
    real = latents_mod.atomic_write_text

    def counting(path: Path, text: str) -> None:
        writes.append(Path(path).name)
        real(path, text)

    monkeypatch.setattr(latents_mod, "atomic_write_text", counting)
    encode_manifest(vqvae_run, load_manifest(manifest), tmp_path / "lat", device="cpu")
    assert writes.count("index.json") == 2  # at the start and at the end, for 5 cases
    assert [c.case_id for c in load_latents(tmp_path / "lat").cases] == sorted(SPLITS)


# --- resume --------------------------------------------------------------------------------------


def test_rerun_recomputes_only_missing_and_corrupted_grids(
    manifest: Path, vqvae_run: Path, encoded: Path, tmp_path: Path
) -> None:
    out = _copy(encoded, tmp_path)
    original = {p.name: p.read_bytes() for p in out.glob("*.npy")}
    (out / "a.npy").unlink()
    corrupted = bytearray((out / "b.npy").read_bytes())
    corrupted[-1] ^= 0xFF
    (out / "b.npy").write_bytes(bytes(corrupted))
    before = _mtimes(out)

    result = encode_manifest(vqvae_run, load_manifest(manifest), out, device="cpu")
    assert sorted(result.encoded) == ["a", "b"]
    assert sorted(result.reused) == ["c", "t", "v"]
    after = _mtimes(out)
    assert all(after[n] == before[n] for n in ("c.npy", "t.npy", "v.npy"))
    assert {p.name: p.read_bytes() for p in out.glob("*.npy")} == original
    index = load_latents(out)
    assert sorted(index.grids) == sorted(SPLITS)


def test_a_kill_mid_encode_loses_no_finished_case(
    manifest: Path, vqvae_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real = encode_mod.encode_item

    def dies_on_third(model: VQVAE, chain: object, item: dict, *rest: object) -> dict:
        calls.append(item["case_id"])
        if len(calls) == 3:
            raise KeyboardInterrupt  # like a kill: nothing after this runs
        return real(model, chain, item, *rest)

    monkeypatch.setattr(encode_mod, "encode_item", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        encode_manifest(vqvae_run, load_manifest(manifest), tmp_path / "lat", device="cpu")
    index = json.loads((tmp_path / "lat" / "index.json").read_text())
    journal = (tmp_path / "lat" / "index.journal").read_text().splitlines()
    done = [c["case_id"] for c in index["cases"]] + [json.loads(j)["case_id"] for j in journal]
    assert done == calls[:2]
    with (tmp_path / "lat" / "index.journal").open("a") as fh:
        fh.write('{"case_id": "c", "cut short')  # a kill in the middle of a line

    calls.clear()
    monkeypatch.setattr(encode_mod, "encode_item", real)
    result = encode_manifest(vqvae_run, load_manifest(manifest), tmp_path / "lat", device="cpu")
    assert sorted(result.reused) == sorted(done) and len(result.encoded) == 3
    assert not (tmp_path / "lat" / "index.journal").exists()  # folded into index.json
    assert sorted(load_latents(tmp_path / "lat").grids) == sorted(SPLITS)


def test_a_folder_of_another_vqvae_is_refused(
    manifest: Path, encoded: Path, tmp_path: Path
) -> None:
    other = save_vqvae_run(tmp_path / "other", seed=1)
    out = _copy(encoded, tmp_path)
    with pytest.raises(LatentsError, match="another --out"):
        encode_manifest(other, load_manifest(manifest), out, device="cpu")


# --- bad inputs ----------------------------------------------------------------------------------


def test_an_out_folder_that_cannot_be_written_is_refused_before_any_case(
    manifest: Path, vqvae_run: Path, tmp_path: Path
) -> None:
    (tmp_path / "file").write_text("x")  # a path through a file: ENOTDIR, even as root
    with pytest.raises(OutputError, match="not a folder") as info:
        encode_manifest(vqvae_run, load_manifest(manifest), tmp_path / "file" / "out",
                        device="cpu")
    assert str(tmp_path / "file" / "out") in str(info.value)



def test_a_malformed_case_is_listed_and_the_others_complete(
    manifest: Path, vqvae_run: Path, tmp_path: Path
) -> None:
    root = tmp_path / "heads"
    shutil.copytree(manifest.parent, root)
    bad_manifest = write_cases(root, {**SPLITS, "broken": "train"}, name="bad.json",
                               bad=("broken",))
    out = tmp_path / "lat"
    result = CliRunner().invoke(cli, ["encode", "--vqvae", str(vqvae_run), "--manifest",
                                      str(bad_manifest), "--out", str(out), "--device", "cpu"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "broken.nii.gz" in result.output  # the failures table
    rows = (out / "failures.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith("broken,") and "broken.nii.gz" in rows[1]
    assert sorted(load_latents(out).grids) == sorted(SPLITS)


def test_strict_stops_at_the_first_bad_case_and_exits_non_zero(
    manifest: Path, vqvae_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root = tmp_path / "heads"
    shutil.copytree(manifest.parent, root)
    bad_manifest = write_cases(root, {"0bad": "train", **SPLITS}, name="bad.json", bad=("0bad",))
    argv = ["mri-vqvae", "encode", "--vqvae", str(vqvae_run), "--manifest", str(bad_manifest),
            "--out", str(tmp_path / "lat"), "--device", "cpu", "--strict"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "0bad.nii.gz" in err and "Traceback" not in err
    assert not list((tmp_path / "lat").glob("*.npy"))  # stopped at the first (sorted) case


def test_a_codebook_too_large_for_uint16_is_refused(manifest: Path, tmp_path: Path) -> None:
    big = VQVAEConfig(levels=2, channels=(4, 4), num_res_layers=0, num_res_channels=(4, 4),
                      codebook_size=2**16 + 1, embedding_dim=1, channels_last=False)
    run = save_vqvae_run(tmp_path / "big", vqvae=big)
    with pytest.raises(LatentsError, match="uint16"):
        encode_manifest(run, load_manifest(manifest), tmp_path / "lat", device="cpu")
    assert not (tmp_path / "lat").exists()


def test_a_run_without_checkpoints_is_refused(manifest: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no complete checkpoints/best or checkpoints/last"):
        encode_manifest(tmp_path, load_manifest(manifest), tmp_path / "lat", device="cpu")


# --- augmented views (--augment N) ---------------------------------------------------------------


def _with_augment(run: Path, out: Path, **edits: dict[str, object]) -> Path:
    """A copy of `run` whose checkpoint records the augment sections updated by `edits`."""
    copy = Path(shutil.copytree(run, out))
    path = copy / "checkpoints" / "best" / "config.json"
    meta = json.loads(path.read_text())
    augment = meta["extra"]["experiment"]["augment"]
    for name, values in edits.items():
        augment[name] = {**augment[name], **values} if isinstance(augment[name], dict) else values
    path.write_text(json.dumps(meta))
    return copy


@pytest.fixture(scope="module")
def affine_run(vqvae_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The module's VQ-VAE recording an affine step drawn every time: on these untrained 4^3
    grids the smoke intensity steps alone seldom move a code, so each view here differs."""
    return _with_augment(vqvae_run, tmp_path_factory.mktemp("affine") / "run",
                         affine={"prob": 1.0})


@pytest.fixture(scope="module")
def augmented(manifest: Path, affine_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every case encoded with --augment 2 through the CLI; returns the latents folder."""
    out = tmp_path_factory.mktemp("augmented") / "lat"
    result = CliRunner().invoke(cli, ["encode", "--vqvae", str(affine_run), "--manifest",
                                      str(manifest), "--out", str(out), "--device", "cpu",
                                      "--augment", "2"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "encoded 11 grid(s) (cases and 2 view(s) of each train case)" in result.output
    return out


def _doc(folder: Path) -> dict:
    doc = json.loads((folder / "index.json").read_text())
    doc.pop("updated_utc")
    return doc


def _bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.glob("*.npy")}


def test_augment_0_writes_exactly_what_an_encode_without_views_writes(
    manifest: Path, vqvae_run: Path, encoded: Path, tmp_path: Path
) -> None:
    encode_manifest(vqvae_run, load_manifest(manifest), tmp_path / "lat", device="cpu",
                    manifest_path=manifest, augment=0)
    doc = _doc(tmp_path / "lat")
    assert doc == _doc(encoded) and _bytes(tmp_path / "lat") == _bytes(encoded)
    assert not [k for k in doc if k.startswith("augment")]
    assert all(set(c) == {"case_id", "subject_id", "split", "file", "sha256", "source_sha256",
                          "modality", "source_id"} for c in doc["cases"])


def test_views_are_the_seeded_training_augmentation_of_each_train_case(
    manifest: Path, affine_run: Path, augmented: Path
) -> None:
    doc = json.loads((augmented / "index.json").read_text())
    recorded = load_checkpoint(affine_run / "checkpoints" / "best").extra["experiment"]
    augment = AugmentConfig.model_validate(recorded["augment"])
    assert (doc["augment_views"], doc["augment_seed"]) == (2, recorded["seed"])
    assert doc["augment_digest"] == config_digest(augment)
    views = {c: [c, f"{c}~aug1", f"{c}~aug2"] if s == "train" else [c] for c, s in SPLITS.items()}
    assert [c["case_id"] for c in doc["cases"]] == sorted(sum(views.values(), []))
    model = load_checkpoint(affine_run / "checkpoints" / "best").model
    chain, steps = build_transforms(load_config("smoke").data), augment_only(augment, 0)
    m = load_manifest(manifest)
    index = load_latents(augmented)
    for case in m.cases:
        prepped = chain({"image": str(m.data_root / case.path)})
        for k, gid in enumerate(views[case.case_id]):
            entry = next(c for c in index.cases if c.case_id == gid)
            assert (entry.view, entry.source_case) == (k, case.case_id if k else None)
            assert (entry.subject_id, entry.split, entry.modality, entry.source_id,
                    entry.source_sha256) == (case.subject_id, case.split, "T1w", "synthetic",
                                             case.sha256)
            if k:
                steps.set_random_state(seed=view_seed(recorded["seed"], case.case_id, k))
            volume = steps(copy.deepcopy(prepped)) if k else prepped
            expected = model.encode_indices(volume["image"].as_tensor()[None].float())[0]
            assert torch.equal(torch.from_numpy(index.grids[gid].astype(np.int64)), expected)
        grids = [index.grids[g].tobytes() for g in views[case.case_id]]
        assert len(set(grids)) == len(grids), case.case_id  # views differ from it and each other


def test_a_second_encode_replays_the_same_views(
    manifest: Path, affine_run: Path, augmented: Path, tmp_path: Path
) -> None:
    result = encode_manifest(affine_run, load_manifest(manifest), tmp_path / "again",
                             device="cpu", manifest_path=manifest, augment=2)
    assert len(result.encoded) == 11 and not result.reused
    assert _doc(tmp_path / "again") == _doc(augmented)
    assert _bytes(tmp_path / "again") == _bytes(augmented)


def test_a_rerun_recomputes_only_a_deleted_view(
    manifest: Path, affine_run: Path, augmented: Path, tmp_path: Path
) -> None:
    out = _copy(augmented, tmp_path)
    original = _bytes(out)
    (out / "a~aug2.npy").unlink()
    before = _mtimes(out)
    result = encode_manifest(affine_run, load_manifest(manifest), out, device="cpu",
                             manifest_path=manifest, augment=2)
    assert result.encoded == ["a~aug2"] and len(result.reused) == 10
    assert all(_mtimes(out)[n] == t for n, t in before.items())
    assert _bytes(out) == original and _doc(out) == _doc(augmented)


@pytest.mark.parametrize(("views", "edit", "message"), [
    (3, {}, r"\['augment_views'\]: augment_views 2 there vs 3 now"),
    (0, {}, r"augment_views 2 there vs absent now"),
    (2, {"noise": {"std": 0.05}}, r"\['augment_digest'\]"),
])
def test_a_folder_of_other_views_is_refused_naming_the_difference(
    manifest: Path, affine_run: Path, augmented: Path, tmp_path: Path,
    views: int, edit: dict, message: str,
) -> None:
    out = _copy(augmented, tmp_path)
    run = _with_augment(affine_run, tmp_path / "run", **edit)
    with pytest.raises(LatentsError, match=message):
        encode_manifest(run, load_manifest(manifest), out, device="cpu", augment=views)
    assert _bytes(out) == _bytes(augmented)


def test_a_bad_train_case_skips_its_views(
    manifest: Path, affine_run: Path, tmp_path: Path
) -> None:
    root = tmp_path / "heads"
    shutil.copytree(manifest.parent, root)
    bad = write_cases(root, {**SPLITS, "broken": "train"}, name="bad.json", bad=("broken",))
    result = encode_manifest(affine_run, load_manifest(bad), tmp_path / "lat", device="cpu",
                             augment=2)
    assert [f.case_id for f in result.failures] == ["broken"]
    assert not list((tmp_path / "lat").glob("broken*"))
    assert not [c for c in load_latents(tmp_path / "lat").cases if "broken" in c.case_id]
    assert len(result.encoded) == 11


def test_augment_needs_a_run_whose_augmentation_draws(
    manifest: Path, vqvae_run: Path, tmp_path: Path
) -> None:
    off = _with_augment(vqvae_run, tmp_path / "off", enabled=False)
    with pytest.raises(LatentsError, match="augmentation is switched off"):
        encode_manifest(off, load_manifest(manifest), tmp_path / "lat", device="cpu", augment=1)
    encode_manifest(off, load_manifest(manifest), tmp_path / "lat", device="cpu")  # N=0: fine


def test_view_settings_draw_what_a_run_recording_them_draws(
    manifest: Path, affine_run: Path, augmented: Path, tmp_path: Path
) -> None:
    """`--view-set elastic.prob=1.0` writes the bytes an encode of a run whose checkpoint records
    that probability writes; the header's digest changes, so the plain views' folder refuses it."""
    out = tmp_path / "elastic"
    result = CliRunner().invoke(cli, ["encode", "--vqvae", str(affine_run), "--manifest",
                                      str(manifest), "--out", str(out), "--device", "cpu",
                                      "--augment", "2", "--view-set", "elastic.prob=1.0"])
    assert result.exit_code == 0, result.output
    recorded = _with_augment(affine_run, tmp_path / "run", elastic={"prob": 1.0})
    encode_manifest(recorded, load_manifest(manifest), tmp_path / "recorded", device="cpu",
                    manifest_path=manifest, augment=2)
    assert _bytes(out) == _bytes(tmp_path / "recorded")
    doc = _doc(out)
    assert doc["augment_digest"] == _doc(tmp_path / "recorded")["augment_digest"]
    assert doc["augment_digest"] != _doc(augmented)["augment_digest"]
    plain = _copy(augmented, tmp_path)
    with pytest.raises(LatentsError, match="augment_digest"):
        encode_manifest(affine_run, load_manifest(manifest), plain, device="cpu", augment=2,
                        view_overrides=["elastic.prob=1.0"])
    assert _bytes(plain) == _bytes(augmented)


@pytest.mark.parametrize(("views", "overrides", "error", "message"), [
    (2, ["elastic.prob=2"], ConfigError, r"elastic\.prob"),
    (2, ["elastic.prb=1.0"], ConfigError, r"unknown key 'elastic\.prb' \(did you mean "
                                          r"'elastic\.prob'\?\)"),
    (2, ["elastic.prob"], ConfigError, "must look like key.sub=value"),
    (0, ["elastic.prob=1.0"], LatentsError, "need --augment N with N > 0"),
])
def test_bad_view_settings_are_refused_before_anything_is_written(
    manifest: Path, affine_run: Path, tmp_path: Path, views: int, overrides: list[str],
    error: type[Exception], message: str,
) -> None:
    with pytest.raises(error, match=message):
        encode_manifest(affine_run, load_manifest(manifest), tmp_path / "lat", device="cpu",
                        augment=views, view_overrides=overrides)
    assert not (tmp_path / "lat").exists()


def test_train_prior_data_holds_every_view(augmented: Path) -> None:
    """`train-prior` reads `load_prior_data`, whose train split is every train grid."""
    data = load_prior_data(load_latents(augmented), "modality")
    assert sorted(data.train.case_ids) == sorted(
        f"{c}{v}" for c in ("a", "b", "c") for v in ("", "~aug1", "~aug2"))
    assert data.train.grids.shape == (9, 4, 4, 4) and data.label_names == ("T1w",)
    assert torch.equal(data.train.labels, torch.zeros(9, dtype=torch.long))
    assert (data.val.case_ids, data.splits["test"].case_ids) == (("v",), ("t",))

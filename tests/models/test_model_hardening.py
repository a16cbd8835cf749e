"""Model hardening: non-finite weights and outputs, malformed checkpoint configs, absurd sizes.

Every bad input ends in a project error (`CheckpointError`, `NonFiniteError`, `PriorInputError`)
whose message names the file or field; nothing untrustworthy is written or returned.
"""

from __future__ import annotations

import json
import os
import resource
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mri_vqvae.artifacts.checkpoint as ckpt
from mri_vqvae.artifacts.checkpoint import LoadedCheckpoint, load_checkpoint, save_checkpoint
from mri_vqvae.artifacts.checkpoint_folder import MAX_PARAMETERS_ENV, max_parameters
from mri_vqvae.artifacts.loading import PriorRun, PriorRunPaths
from mri_vqvae.config import DataConfig, ExperimentConfig, load_config
from mri_vqvae.core.errors import CheckpointError, MriVqvaeError
from mri_vqvae.core.finite import NonFiniteError, describe_nonfinite
from mri_vqvae.core.provenance import sha256_file
from mri_vqvae.data.writers import write_nifti
from mri_vqvae.models.autoencoders.vqvae.config import VQVAEConfig
from mri_vqvae.models.autoencoders.vqvae.model import VQVAE
from mri_vqvae.models.autoencoders.vqvae.model import state_numel as vqvae_numel
from mri_vqvae.models.priors.base import PriorInputError
from mri_vqvae.models.priors.pixelcnn.config import PixelCNNConfig
from mri_vqvae.models.priors.pixelcnn.draw import sample_categorical
from mri_vqvae.models.priors.pixelcnn.model import GatedPixelCNN3D
from mri_vqvae.models.priors.pixelcnn.model import state_numel as prior_numel
from mri_vqvae.tasks.sample import SampleSettings, sample_volumes

SMOKE: ExperimentConfig = load_config("smoke")


def _model(kind: str, seed: int = 0) -> tuple[torch.nn.Module, Any]:
    torch.manual_seed(seed)
    if kind == "vqvae":
        return VQVAE(SMOKE.autoencoder).eval(), SMOKE.autoencoder
    return GatedPixelCNN3D(SMOKE.prior).eval(), SMOKE.prior


def _saved(folder: Path, kind: str = "prior") -> Path:
    model, cfg = _model(kind)
    return save_checkpoint(folder, model, kind, cfg)


def _meta(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "config.json").read_text())


def _write_meta(folder: Path, doc: Any) -> None:
    (folder / "config.json").write_text(json.dumps(doc))


def _poison(folder: Path, name: str, value: float) -> None:
    """Put `value` into one entry of tensor `name` and record the new sha256 (consistent)."""
    tensors = safetensors.torch.load_file(str(folder / "model.safetensors"))
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = value
    safetensors.torch.save_file(tensors, str(folder / "model.safetensors"))
    meta = _meta(folder)
    meta["files"]["model.safetensors"] = sha256_file(folder / "model.safetensors")
    _write_meta(folder, meta)


# --- 1. non-finite weights -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind,name,value",
    [
        ("vqvae", "encoder.pre_quant.weight", float("nan")),
        ("vqvae", "quantizer.codebook", float("inf")),
        ("vqvae", "quantizer.ema_sum", float("nan")),
        ("vqvae", "quantizer.ema_count", float("-inf")),
        ("prior", "head_out.bias", float("nan")),
    ],
)
def test_load_refuses_nonfinite_weights_or_buffers(
    tmp_path: Path, kind: str, name: str, value: float
) -> None:
    folder = _saved(tmp_path / "ck", kind)
    _poison(folder, name, value)  # sha256 consistent: only the finiteness check can catch it
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(folder)
    msg = str(err.value)
    assert str(folder) in msg and repr(name) in msg and "1 " in msg
    assert "checkpoints/best" in msg and "learning rate" in msg and "bf16" in msg


def test_nan_model_saved_through_save_checkpoint_is_refused_at_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, cfg = _model("vqvae")
    with torch.no_grad():
        model.decoder.post_quant.bias[:3] = float("nan")
    with monkeypatch.context() as m:  # an older version that saved diverged weights
        m.setattr(ckpt, "_first_nonfinite", lambda tensors: None)
        folder = save_checkpoint(tmp_path / "last", model, "vqvae", cfg)
    with pytest.raises(CheckpointError, match=r"decoder\.post_quant\.bias.*3 NaN"):
        load_checkpoint(folder)


def test_save_refuses_nonfinite_and_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    model, cfg = _model("prior")
    folder = save_checkpoint(tmp_path / "last", model, "prior", cfg, step=1)
    before = sha256_file(folder / "model.safetensors")
    with torch.no_grad():
        model.embedding.weight[0, 0] = float("inf")
    with pytest.raises(CheckpointError, match=r"refusing to save .*'embedding\.weight'.*\+Inf"):
        save_checkpoint(folder, model, "prior", cfg, step=2)
    assert sha256_file(folder / "model.safetensors") == before
    assert load_checkpoint(folder).step == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]  # no temp leftovers


# --- 5. folder permissions -----------------------------------------------------------------------


@pytest.mark.parametrize("umask,dir_mode,file_mode", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)])
def test_checkpoint_folder_mode_honours_the_umask(
    tmp_path: Path, umask: int, dir_mode: int, file_mode: int
) -> None:
    old = os.umask(umask)
    try:
        folder = _saved(tmp_path / "best")
    finally:
        os.umask(old)
    assert stat.S_IMODE(folder.stat().st_mode) == dir_mode
    assert {stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()} == {file_mode}


# --- 3. malformed config.json --------------------------------------------------------------------


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], Any]:
    def edit(doc: dict[str, Any]) -> Any:
        doc[key] = value
        return doc

    return edit


def _drop(key: str) -> Callable[[dict[str, Any]], Any]:
    def edit(doc: dict[str, Any]) -> Any:
        del doc[key]
        return doc

    return edit


MALFORMED: dict[str, tuple[Callable[[dict[str, Any]], Any], str]] = {
    "format_version_string": (_set("format_version", "2"), "'format_version' must be an integer"),
    "format_version_bool": (_set("format_version", True), "'format_version' must be an integer"),
    "format_version_zero": (_set("format_version", 0), "'format_version' must be an integer"),
    "format_version_newer": (_set("format_version", 99), "newer than this mri-vqvae"),
    "format_wrong": (_set("format", "other"), "'format'"),
    "config_list": (_set("config", [1, 2]), "'config' must be an object"),
    "files_list": (_set("files", ["model.safetensors"]), "'files' must be an object"),
    "files_without_weights": (_set("files", {}), "'files' must be an object mapping"),
    "files_digest_number": (_set("files", {"model.safetensors": 5}), "'files'['model.safetens"),
    "extra_list": (_set("extra", []), "'extra' must be an object or null"),
    "versions_list": (_set("versions", ["2.0"]), "'versions' must be an object"),
    "step_string": (_set("step", "3"), "'step' must be an integer"),
    "step_negative": (_set("step", -1), "'step' must be an integer"),
    "kind_number": (_set("kind", 5), "'kind' must be a short lowercase"),
    "num_parameters_float": (_set("num_parameters", 1.5), "'num_parameters' must be an integer"),
    "missing_kind": (_drop("kind"), "lacks the field 'kind'"),
    "missing_config": (_drop("config"), "lacks the field 'config'"),
    "missing_files": (_drop("files"), "lacks the field 'files'"),
    "missing_format_version": (_drop("format_version"), "lacks the field 'format_version'"),
    "top_level_list": (lambda doc: [doc], "top level is a list"),
    "config_field_wrong_type": (
        lambda doc: {**doc, "config": {**doc["config"], "hidden_channels": [8]}},
        "hidden_channels",
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_config_json_is_refused_naming_the_field(tmp_path: Path, case: str) -> None:
    folder = _saved(tmp_path / "ck")
    edit, expected = MALFORMED[case]
    _write_meta(folder, edit(_meta(folder)))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(folder)
    assert str(folder / "config.json") in str(err.value)
    assert expected in str(err.value)


@pytest.mark.parametrize(
    "text,expected",
    [
        ('{"format": "mri-vqvae-checkpoint", "step": NaN}', "NaN is not valid JSON"),
        ("[" * 100_000, "not readable JSON"),
        ('{"format": ', "not readable JSON"),
    ],
)
def test_config_json_that_is_not_plain_json_is_refused(
    tmp_path: Path, text: str, expected: str
) -> None:
    folder = _saved(tmp_path / "ck")
    (folder / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=expected):
        load_checkpoint(folder)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=3),
    max_leaves=6,
)
FIELDS = ["format", "format_version", "kind", "config", "extra", "step", "versions", "files",
          "num_tensors", "created_utc"]
CONFIG_FIELDS = sorted(PixelCNNConfig.model_fields)


_FUZZ: dict[str, Any] = {}  # one saved checkpoint, reused by every example


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_fuzzed_config_json_loads_or_raises_checkpoint_error(
    tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
) -> None:
    folder = _FUZZ.get("folder")
    if folder is None:
        folder = _FUZZ["folder"] = _saved(tmp_path_factory.mktemp("fuzz") / "ck")
        _FUZZ["doc"] = _meta(folder)
    doc = json.loads(json.dumps(_FUZZ["doc"]))
    if data.draw(st.booleans(), label="edit a config field"):
        key = data.draw(st.sampled_from(CONFIG_FIELDS), label="config field")
        value = data.draw(JSON | st.integers(0, 10**12), label="value")
        doc["config"][key] = value
    else:
        key = data.draw(st.sampled_from(FIELDS), label="field")
        doc[key] = data.draw(JSON, label="value")
    _write_meta(folder, doc)
    try:
        loaded = load_checkpoint(folder)
    except CheckpointError:
        return
    assert isinstance(loaded, LoadedCheckpoint)


# --- 4. absurd sizes -----------------------------------------------------------------------------


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_huge_prior_config_is_refused_before_allocation(tmp_path: Path) -> None:
    folder = _saved(tmp_path / "ck")
    doc = _meta(folder)
    doc["config"]["hidden_channels"] = 200_000
    _write_meta(folder, doc)
    rss, start = _peak_rss_mib(), time.perf_counter()
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(folder)
    assert time.perf_counter() - start < 1.0
    assert _peak_rss_mib() - rss < 200  # building it would need ~700 GB
    msg = str(err.value)
    assert "hidden_channels=200000" in msg and MAX_PARAMETERS_ENV in msg
    assert str(folder / "config.json") in msg


@pytest.mark.parametrize(
    "field,value,named",
    [
        ("codebook_size", 10**9, "codebook_size=1000000000"),
        ("channels", [8, 10**6], "channels=(8, 1000000)"),
        ("embedding_dim", 10**8, "embedding_dim=100000000"),
    ],
)
def test_huge_vqvae_config_is_refused_naming_the_field(
    tmp_path: Path, field: str, value: Any, named: str
) -> None:
    folder = _saved(tmp_path / "ck", "vqvae")
    doc = _meta(folder)
    doc["config"][field] = value
    _write_meta(folder, doc)
    with pytest.raises(CheckpointError, match="above the limit") as err:
        load_checkpoint(folder)
    assert named in str(err.value)


def test_config_larger_than_its_weights_is_refused_before_building(tmp_path: Path) -> None:
    folder = _saved(tmp_path / "ck")
    doc = _meta(folder)
    doc["config"]["num_layers"] = 400  # under the cap, but far more than the file holds
    _write_meta(folder, doc)
    with pytest.raises(CheckpointError, match=r"holds only .*num_layers=400"):
        load_checkpoint(folder)


def test_parameter_cap_is_overridable_by_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _saved(tmp_path / "ck")
    monkeypatch.setenv(MAX_PARAMETERS_ENV, "1e3")
    assert max_parameters() == 1000
    with pytest.raises(CheckpointError, match=f"above the limit of 1,000 \\({MAX_PARAMETERS_ENV}"):
        load_checkpoint(folder)
    monkeypatch.setenv(MAX_PARAMETERS_ENV, "lots")
    with pytest.raises(CheckpointError, match=f"{MAX_PARAMETERS_ENV}='lots' must be a number"):
        load_checkpoint(folder)
    monkeypatch.delenv(MAX_PARAMETERS_ENV)
    assert isinstance(load_checkpoint(folder).model, GatedPixelCNN3D)


@settings(max_examples=15, deadline=None)
@given(
    levels=st.sampled_from([2, 3]),
    width=st.integers(1, 3),
    res_layers=st.integers(0, 2),
    kernels=st.sampled_from([(3, 1), (3, 3), (1, 5)]),
    norm=st.sampled_from(["none", "group"]),
    upsample=st.sampled_from(["transpose", "nearest"]),
    codes=st.integers(2, 20),
    dim=st.integers(1, 6),
)
def test_vqvae_size_formula_is_exact(
    levels: int, width: int, res_layers: int, kernels: tuple[int, int], norm: str,
    upsample: str, codes: int, dim: int,
) -> None:
    chans = tuple(8 * (width + i) for i in range(levels))
    cfg = VQVAEConfig(levels=levels, channels=chans, num_res_channels=chans,
                      num_res_layers=res_layers, residual_kernels=kernels, norm=norm,
                      upsample=upsample, codebook_size=codes, embedding_dim=dim)
    assert vqvae_numel(cfg) == sum(t.numel() for t in VQVAE(cfg).state_dict().values())


@settings(max_examples=15, deadline=None)
@given(
    codes=st.integers(2, 20), emb=st.integers(1, 6), hidden=st.integers(1, 6),
    layers=st.integers(1, 3), kernel=st.sampled_from([3, 5]), head=st.integers(1, 6),
    classes=st.integers(0, 3),
)
def test_prior_size_formula_is_exact(
    codes: int, emb: int, hidden: int, layers: int, kernel: int, head: int, classes: int
) -> None:
    cfg = PixelCNNConfig(codebook_size=codes, embedding_dim=emb, hidden_channels=hidden,
                      num_layers=layers, kernel_size=kernel, head_channels=head,
                      num_classes=classes)
    model = GatedPixelCNN3D(cfg)
    assert prior_numel(cfg) == sum(t.numel() for t in model.state_dict().values())


# --- 2. non-finite outputs -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda v: v.__setitem__((1, 2, 3), np.nan) or v,
        lambda v: v.__setitem__((0, 0, 0), np.inf) or v,
        lambda v: np.full_like(v, np.nan),
        lambda v: v.astype(np.float64) * 1e300,  # finite float64, +Inf once cast to float32
    ],
    ids=["one_nan", "one_inf", "all_nan", "float32_overflow"],
)
def test_write_nifti_refuses_nonfinite_volumes(tmp_path: Path, make: Callable) -> None:
    out = tmp_path / "out.nii.gz"
    volume = make(np.ones((4, 5, 6), dtype=np.float32))
    with pytest.raises(NonFiniteError, match=f"refusing to write {out}"):
        write_nifti(out, volume, np.eye(4))
    assert list(tmp_path.iterdir()) == []


def test_write_nifti_accepts_a_constant_volume(tmp_path: Path) -> None:
    out = write_nifti(tmp_path / "c.nii.gz", np.zeros((4, 5, 6), np.float32), np.eye(4))
    assert out.is_file()


def test_encode_indices_refuses_a_nan_input() -> None:
    model, _ = _model("vqvae")
    x = torch.rand(1, 1, 16, 16, 16)
    x[0, 0, 3, 4, 5] = float("nan")
    with pytest.raises(NonFiniteError, match="input volume holds 1 NaN"):
        model.encode_indices(x)


def test_encode_indices_refuses_a_nonfinite_encoder_output() -> None:
    model, _ = _model("vqvae")
    with torch.no_grad():
        model.encoder.pre_quant.bias[0] = float("inf")
    with pytest.raises(NonFiniteError, match="encoder output holds"):
        model.encode_indices(torch.rand(1, 1, 16, 16, 16))
    with pytest.raises(NonFiniteError, match="encoder output holds"):
        model(torch.rand(1, 1, 16, 16, 16))  # eval-mode forward too


def test_quantizer_refuses_a_nan_codebook() -> None:
    model, _ = _model("vqvae")
    model.quantizer.codebook[2, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="codebook holds 1 NaN"):
        model.encode_indices(torch.rand(1, 1, 16, 16, 16))


def _nan_prior() -> GatedPixelCNN3D:
    model, _ = _model("prior")
    with torch.no_grad():
        model.head_out.bias[1] = float("nan")
    return model


@pytest.mark.parametrize(
    "kwargs", [{"method": "fast"}, {"method": "naive"}, {"greedy": True}, {"top_k": 3}]
)
def test_prior_sampling_refuses_nonfinite_logits(kwargs: dict[str, Any]) -> None:
    with pytest.raises(NonFiniteError, match="logits hold NaN or Inf in latent slice 0"):
        _nan_prior().sample((2, 2, 3, 3), torch.Generator().manual_seed(0), **kwargs)


def test_sample_categorical_refuses_nonfinite_logits_and_overflowing_temperature() -> None:
    logits = torch.zeros(3, 5)
    logits[1, 2] = float("nan")
    with pytest.raises(NonFiniteError, match="1 NaN of 15 values"):
        sample_categorical(logits, torch.Generator().manual_seed(0))
    with pytest.raises(PriorInputError, match="temperature 1e-310 is too small"):
        sample_categorical(torch.randn(3, 5) * 10, torch.Generator(), temperature=1e-310)
    huge = torch.full((2, 4), 1e300, dtype=torch.float64)  # finite, overflows once divided
    with pytest.raises(NonFiniteError, match="overflow once divided by temperature"):
        sample_categorical(huge, torch.Generator(), temperature=1e-10)


def _run(tmp_path: Path, prior: GatedPixelCNN3D, vqvae: VQVAE) -> PriorRun:
    data = DataConfig(spacing=SMOKE.data.spacing, spatial_size=SMOKE.data.spatial_size)
    paths = PriorRunPaths(tmp_path / "run", tmp_path / "run/checkpoints/best", tmp_path / "vq")
    extra = {"manifest_digest": "0" * 64, "codebook_size": SMOKE.autoencoder.codebook_size}
    return PriorRun(prior, vqvae, extra, paths, {"prior": "p", "vqvae": "v"}, data, (4, 4, 4))


@pytest.mark.parametrize("broken", ["prior", "decoder"])
def test_sample_volumes_writes_nothing_for_nonfinite_models(tmp_path: Path, broken: str) -> None:
    prior, _ = _model("prior")
    vqvae, _ = _model("vqvae")
    if broken == "prior":
        prior = _nan_prior()
    else:
        with torch.no_grad():
            vqvae.decoder.post_quant.bias[0] = float("nan")
    run = _run(tmp_path, prior, vqvae)
    settings_ = SampleSettings(num_samples=2, seed=0, temperature=1.0, batch_size=2)
    where = "run/checkpoints/best" if broken == "prior" else "VQ-VAE"
    with pytest.raises(NonFiniteError, match=where):
        sample_volumes(run, settings_, tmp_path / "out", progress=False)
    assert list((tmp_path / "out").glob("sample_*")) == []


def test_nonfinite_errors_are_user_errors() -> None:
    assert issubclass(NonFiniteError, MriVqvaeError)
    assert describe_nonfinite(torch.arange(3)) is None
    assert describe_nonfinite(np.array([1.0, np.nan, -np.inf])) == "1 NaN and 1 -Inf of 3 values"


def test_likelihood_map_refuses_nonfinite_prior_bits(tmp_path: Path) -> None:
    from mri_vqvae.tasks.likelihood import likelihood_map
    from tests.support.volumes import make_head
    from tests.support.volumes import write_nifti as write_raw

    scan = write_raw(tmp_path / "scan.nii.gz", make_head(seed=1))
    vqvae, _ = _model("vqvae")
    run = _run(tmp_path, _nan_prior(), vqvae)
    with pytest.raises(NonFiniteError, match=f"{scan}: the prior .*non-finite bits"):
        likelihood_map(run, scan)

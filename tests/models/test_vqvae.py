"""Properties of the 3D VQ-VAE (tiny widths and volumes; CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mri_vqvae.config import load_config
from mri_vqvae.core.errors import ConfigError, MriVqvaeError
from mri_vqvae.models.autoencoders.vqvae.config import VQVAEConfig
from mri_vqvae.models.autoencoders.vqvae.model import VQVAE, CodeIndexError, SpatialShapeError


def _config(levels: int = 2, **kw: object) -> VQVAEConfig:
    widths = (4, 8, 8)[:levels]
    opts: dict = dict(
        levels=levels,
        channels=widths,
        num_res_channels=widths,
        num_res_layers=1,
        codebook_size=16,
        embedding_dim=4,
    )
    opts.update(kw)
    return VQVAEConfig(**opts)


def _model(levels: int = 2, seed: int = 0, **kw: object) -> VQVAE:
    torch.manual_seed(seed)
    return VQVAE(_config(levels, **kw))


def _volume(shape: tuple[int, int, int] = (16, 16, 8), batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, 1, *shape, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(("levels", "latent"), [(1, (8, 8, 4)), (2, (4, 4, 2)), (3, (2, 2, 1))])
def test_output_shapes_per_level_count(levels: int, latent: tuple[int, int, int]) -> None:
    model = _model(levels).train()
    x = _volume()
    assert model.latent_shape(x.shape[2:]) == latent
    out = model(x)
    assert out.reconstruction.shape == x.shape
    assert out.quantized.shape == (2, 4, *latent)
    assert out.indices.shape == (2, *latent) and out.indices.dtype == torch.int64
    assert out.commitment_loss.ndim == 0 and out.perplexity.ndim == 0
    assert model.encode(x).shape == (2, 4, *latent)
    indices = model.encode_indices(x)
    assert indices.shape == (2, *latent) and indices.dtype == torch.int64
    assert model.decode_indices(indices).shape == x.shape


def test_non_divisible_input_raises_clear_error() -> None:
    model = _model(3)
    with pytest.raises(SpatialShapeError) as info:
        model(torch.rand(1, 1, 16, 12, 8))
    err = info.value
    assert isinstance(err, ValueError) and isinstance(err, MriVqvaeError)
    message = str(err)
    assert "(16, 12, 8)" in message and "multiple of 8" in message and "H=12" in message
    assert "data.spatial_size" in message
    with pytest.raises(SpatialShapeError, match="multiple of 4"):
        _model(2).latent_shape((16, 18, 8))
    with pytest.raises(SpatialShapeError, match=r"\(B, 1, D, H, W\)"):
        model(torch.rand(1, 2, 16, 16, 8))


def test_straight_through_gradient_reaches_encoder() -> None:
    model = _model().train()
    x = _volume()
    out = model(x)
    F.mse_loss(out.reconstruction, x).backward()  # reconstruction only: no commitment path
    for name, param in model.encoder.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("channels_last", [True, False])
def test_eval_round_trip_equals_forward_reconstruction(channels_last: bool) -> None:
    model = _model(channels_last=channels_last).train()
    x = _volume()
    model(x)  # initialises the codebook from data
    model.eval()
    with torch.no_grad():
        expected = model(x).reconstruction
        indices = model.encode_indices(x)
        assert torch.equal(model.decode_indices(indices), expected)
    assert torch.equal(model(x).reconstruction.detach(), expected)  # also with autograd on


def test_bf16_autocast_training_and_round_trip() -> None:
    model = _model().train()
    x = _volume()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.reconstruction.dtype == torch.bfloat16
    assert out.quantized.dtype == torch.float32
    (F.mse_loss(out.reconstruction.float(), x) + out.commitment_loss).backward()
    assert all(b.dtype in (torch.float32, torch.bool, torch.int64) for b in model.buffers())
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(x).reconstruction
        assert torch.equal(model.decode_indices(model.encode_indices(x)), expected)


def test_eval_forward_never_moves_codebook() -> None:
    model = _model().train()
    model(_volume())
    before = {k: v.clone() for k, v in model.quantizer.state_dict().items()}
    model.eval()
    model(_volume(batch=3) * 2)
    model.encode_indices(_volume())
    after = model.quantizer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_gradient_checkpointing_gives_same_gradients() -> None:
    x = _volume()
    grads = []
    for flag in (False, True):
        model = _model(gradient_checkpointing=flag).train()
        out = model(x)
        (F.mse_loss(out.reconstruction, x) + out.commitment_loss).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for plain, ckpt in zip(*grads, strict=True):
        torch.testing.assert_close(plain, ckpt)


def test_decode_indices_rejects_bad_codes() -> None:
    model = _model().eval()
    with pytest.raises(CodeIndexError, match=r"\[0, 16\)"):
        model.decode_indices(torch.full((1, 4, 4, 2), 16))
    with pytest.raises(CodeIndexError, match="integer"):
        model.decode_indices(torch.zeros(1, 4, 4, 2))


def test_state_dict_is_packed_and_reloads_exactly() -> None:
    model = _model().train()
    x = _volume()
    model(x)
    state = model.state_dict()
    assert all(v.is_contiguous() for v in state.values())  # safetensors-ready
    assert "quantizer.codebook" in state and "quantizer.initialised" in state
    clone = VQVAE(model.config)
    clone.load_state_dict(state)
    model.eval()
    clone.eval()
    with torch.no_grad():
        assert torch.equal(model(x).reconstruction, clone(x).reconstruction)


def test_config_levels_must_match_channels() -> None:
    with pytest.raises(ConfigError, match="one entry per level"):
        load_config(None, ["vqvae.levels=2"])
    cfg = load_config(
        None, ["vqvae.levels=2", "vqvae.channels=[8,16]"] + ["vqvae.num_res_channels=[8,16]"]
    ).autoencoder
    assert cfg.levels == 2 and cfg.channels == (8, 16)


def test_the_shipped_levels1_config_is_brain64_with_one_level() -> None:
    one, base = load_config("brain64_levels1"), load_config("brain64")
    assert (one.autoencoder.levels, one.autoencoder.channels) == (1, (32,))
    assert one.autoencoder.num_res_channels == (32,)
    same = one.model_copy(update={"name": "brain64", "autoencoder": base.autoencoder})
    assert same == base
    assert VQVAE(one.autoencoder).latent_shape(one.data.spatial_size) == (32, 40, 32)

"""Properties of the EMA vector quantizer (tiny tensors, CPU, well under a second each)."""

from __future__ import annotations

import copy

import pytest
import torch

from mri_vqvae.models.autoencoders.vqvae.quantizer import EMAQuantizer, kmeans, nearest_code


def _quantizer(k: int = 16, d: int = 4, **kw: object) -> EMAQuantizer:
    opts: dict = dict(kmeans_init=False, dead_code_threshold=0.0, ema_decay=0.9)
    opts.update(kw)
    return EMAQuantizer(k, d, **opts)


def _grid(flat: torch.Tensor, b: int = 2) -> torch.Tensor:
    """(N, D) vectors -> (b, D, N // b, 1, 1) encoder-output-like tensor."""
    n, d = flat.shape
    return flat.view(b, n // b, d).permute(0, 2, 1)[..., None, None]


def _buffers(q: EMAQuantizer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in q.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_nearest_code_equals_bruteforce_cdist_argmin() -> None:
    gen = torch.Generator().manual_seed(0)
    flat = torch.randn(3000, 8, generator=gen) * 2
    codebook = torch.randn(100, 8, generator=gen)
    brute = torch.cdist(flat, codebook, compute_mode="donot_use_mm_for_euclid_dist").argmin(1)
    assert torch.equal(nearest_code(flat, codebook), brute)

    q = _quantizer(k=100, d=8).eval()
    q.codebook.copy_(codebook)
    z = _grid(flat)
    expected = brute.view(2, 1500, 1, 1)
    assert torch.equal(q.indices(z), expected)
    assert torch.equal(q.indices(z.contiguous(memory_format=torch.channels_last_3d)), expected)
    assert torch.equal(q(z).indices, expected)


@pytest.mark.parametrize("training", [True, False])
def test_quantized_value_is_code_and_gradient_is_identity(training: bool) -> None:
    q = _quantizer().train(training)
    z = torch.randn(2, 4, 3, 2, 2, requires_grad=True)
    codebook = q.codebook.clone()  # training moves the codes after the lookup
    out = q(z)
    assert torch.equal(out.quantized, codebook[out.indices].movedim(-1, 1))
    weights = torch.randn_like(z)
    (out.quantized * weights).sum().backward()
    assert torch.equal(z.grad, weights)


def test_ema_decay_zero_moves_only_used_codes() -> None:
    torch.manual_seed(0)
    q = _quantizer(k=16, d=4, ema_decay=0.0).train()
    q.codebook.copy_(torch.randn(16, 4) * 5)
    used = torch.tensor([0, 3, 7])
    near = q.codebook[used].repeat_interleave(20, 0) + 0.1 * torch.randn(60, 4)
    assigned = nearest_code(near, q.codebook)
    before = q.codebook.clone()
    q(_grid(near))
    moved = torch.zeros(16, dtype=torch.bool)
    moved[assigned.unique()] = True
    assert torch.equal(q.codebook[~moved], before[~moved])  # bit-identical
    assert not torch.equal(q.codebook[moved], before[moved])
    for code in assigned.unique():
        mean = near[assigned == code].mean(0)
        torch.testing.assert_close(q.codebook[code], mean, rtol=1e-4, atol=1e-4)


def test_dead_code_is_revived_near_encoder_outputs() -> None:
    torch.manual_seed(0)
    q = _quantizer(k=8, d=4, dead_code_threshold=0.5, revival_interval=3).train()
    q.codebook.copy_(torch.randn(8, 4))
    q.codebook[7] = 100.0  # never the nearest code of any input
    z = _grid(torch.randn(64, 4))
    for _ in range(2):  # within the usage window: not yet judged
        first = q(z)
        assert 7 not in first.indices
        assert torch.equal(q.codebook[7], torch.full((4,), 100.0))
    q(z)  # third step closes the window: code 7 was never used
    data = z.permute(0, 2, 3, 4, 1).reshape(-1, 4)
    assert torch.cdist(q.codebook[7:8], data).min() < 1e-5  # re-seeded on an encoder output
    assert q.ema_count[7] > 0
    later = q(z)
    assert 7 in later.indices
    assert later.codes_used > first.codes_used


def test_eval_never_moves_codebook() -> None:
    q = _quantizer(kmeans_init=True, dead_code_threshold=0.5, revival_interval=1).train()
    z = torch.randn(2, 4, 4, 4, 2)
    q(z)
    before = _buffers(q)
    q.eval()
    for _ in range(3):
        q(torch.randn(2, 4, 4, 4, 2) * 3)
    q.train()
    q.indices(torch.randn(2, 4, 4, 4, 2))  # index lookup never moves codes, even in train mode
    assert _same(before, _buffers(q))


def test_first_eval_call_does_not_initialise() -> None:
    q = _quantizer(kmeans_init=True).eval()
    before = _buffers(q)
    q(torch.randn(2, 4, 4, 4, 2))
    assert _same(before, _buffers(q))
    assert not bool(q.initialised)


@pytest.mark.parametrize("input_bf16", [False, True])
def test_bf16_autocast_keeps_ema_float32_and_equal_to_fp32(input_bf16: bool) -> None:
    torch.manual_seed(0)
    base = _quantizer(k=64, d=16, kmeans_init=True, dead_code_threshold=0.3, revival_interval=1)
    base.train()(torch.randn(2, 16, 8, 8, 8))  # initialise
    fp32, amp = base, copy.deepcopy(base)
    z = torch.randn(2, 16, 8, 8, 8)  # enough near-ties that bf16 scores would flip some codes
    if input_bf16:  # what a bf16 encoder hands over under autocast
        z = z.bfloat16()
    torch.manual_seed(1)
    ref = fp32(z.float())
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = amp(z)
    for name, buf in _buffers(amp).items():
        assert buf.dtype == _buffers(fp32)[name].dtype
        if buf.is_floating_point():
            assert buf.dtype == torch.float32
    assert _same(_buffers(amp), _buffers(fp32))
    assert torch.equal(out.indices, ref.indices)
    assert out.quantized.dtype == torch.float32
    assert out.commitment_loss.dtype == torch.float32
    assert torch.equal(out.commitment_loss, ref.commitment_loss)


def test_training_refuses_half_codebook() -> None:
    q = _quantizer().train().to(torch.bfloat16)
    with pytest.raises(TypeError, match="float32"):
        q(torch.randn(1, 4, 2, 2, 2))


def test_perplexity_of_uniform_assignment_equals_codes_used() -> None:
    q = _quantizer(k=16, d=4).eval()
    q.codebook.copy_(torch.randn(16, 4) * 3)
    picked = torch.tensor([1, 4, 5, 9, 12])
    out = q(_grid(q.codebook[picked].repeat(6, 1)))
    assert int(out.codes_used) == 5
    torch.testing.assert_close(out.perplexity, torch.tensor(5.0))
    skewed = q(_grid(q.codebook[torch.tensor([1, 1, 1, 1, 1, 4])].repeat(5, 1)))
    assert int(skewed.codes_used) == 2 and float(skewed.perplexity) < 2.0


def _clusters(centres: torch.Tensor, per: int, std: float) -> torch.Tensor:
    return centres.repeat_interleave(per, 0) + std * torch.randn(len(centres) * per, 3)


def test_kmeans_init_puts_codes_on_data_clusters() -> None:
    torch.manual_seed(0)
    centres = torch.tensor([[10.0, 0, 0], [-10, 0, 0], [0, 10, 0], [0, 0, -10]])
    data = _clusters(centres, per=50, std=0.1)
    q = _quantizer(k=12, d=3, kmeans_init=True, kmeans_iters=10)
    q.codebook.mul_(0.01)  # start far from every cluster
    q.train()(_grid(data))
    to_centre = torch.cdist(q.codebook, centres)
    assert (to_centre.min(1).values < 0.5).all()  # every code sits on a cluster
    assert (to_centre.min(0).values < 0.5).all()  # every cluster has a code
    assert bool(q.initialised)


def test_kmeans_recovers_well_separated_centres() -> None:
    torch.manual_seed(1)
    centres = torch.tensor([[5.0, 5, 5], [-5, -5, -5]])
    found = kmeans(_clusters(centres, per=40, std=0.05), k=2, iters=5)
    order = found[:, 0].argsort(descending=True)
    torch.testing.assert_close(found[order], centres, atol=0.05, rtol=0)


def test_rejects_wrong_embedding_dim() -> None:
    with pytest.raises(ValueError, match=r"\(B, 4, d, h, w\)"):
        _quantizer(d=4)(torch.randn(1, 3, 2, 2, 2))

"""Sampling from `GatedPixelCNN3D`: a categorical draw and the naive and cached samplers.

Both samplers run the same per-position arithmetic (`StepState`): a depth step per slice, a
height step per row and a width step per voxel, each a fixed-shape computation on a fixed-shape
window of earlier activations. The cached sampler runs every step once and keeps its outputs; the
naive sampler, for every position, recomputes from scratch every step that position depends on
(all slices up to it, all rows of its slice up to it, all voxels of its row up to it). The two
therefore call the same kernels on bit-identical inputs, so their logits, and with the same
generator their draws, are bitwise equal; there is no full-versus-incremental rounding gap that
could flip a draw. The vectorised `GatedPixelCNN3D.forward` (training, nll) agrees with the
stepped logits to float rounding (tested), not bitwise.

Each draw consumes exactly one float64 uniform per batch row from the generator (inverse CDF), so
the random stream stays aligned whatever the logits are.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mri_vqvae.core.finite import NonFiniteError, describe_nonfinite
from mri_vqvae.models.priors.pixelcnn.model import (
    GatedLayer3D,
    GatedPixelCNN3D,
    PriorInputError,
    gate,
)

METHODS = ("fast", "naive")


def _draw(
    logits: Tensor,
    generator: torch.Generator,
    temperature: float,
    top_k: int | None,
    greedy: bool,
) -> tuple[Tensor, Tensor]:
    """`sample_categorical` without the host sync: (codes (B,) int64, 0-d bool "all finite").

    The flag covers the logits and, when sampling, ``logits / temperature``.
    """
    if logits.ndim != 2:
        raise PriorInputError(f"logits must be (B, K), received shape {tuple(logits.shape)}")
    num_classes = logits.shape[1]
    _check_draw_args(temperature, top_k, num_classes)
    u = torch.rand(logits.shape[0], generator=generator, dtype=torch.float64, device=logits.device)
    if greedy or temperature == 0:
        return logits.argmax(dim=1), torch.isfinite(logits).all()
    scaled = logits.double() / temperature
    finite = torch.isfinite(scaled).all()
    if top_k is not None and top_k < num_classes:
        keep = torch.zeros_like(scaled, dtype=torch.bool)
        keep.scatter_(1, scaled.topk(top_k, dim=1).indices, True)
        scaled = scaled.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scaled, dim=1)
    cdf = probs.cumsum(dim=1)
    drawn = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
    # u * total < total, but rounding could still land on the end: never return a zero-mass class
    last_positive = num_classes - 1 - (probs > 0).flip(1).to(torch.int8).argmax(dim=1)
    return torch.minimum(drawn, last_positive), finite


def _nonfinite_logits(where: str) -> NonFiniteError:
    """The error for logits (or logits / temperature) that are NaN/±Inf."""
    return NonFiniteError(
        f"the prior's logits hold NaN or Inf {where}, so any code drawn would be garbage: the "
        "prior's weights diverged or overflowed. Load checkpoints/best or an earlier checkpoint, "
        "or retrain with a lower learning rate / without bf16"
    )


def sample_categorical(
    logits: Tensor,
    generator: torch.Generator,
    temperature: float = 1.0,
    top_k: int | None = None,
    greedy: bool = False,
) -> Tensor:
    """Draw one class per row of ``logits`` (B, K) -> (B,) int64 by inverse CDF.

    Exactly B uniforms are taken from ``generator`` on every call (also when greedy). With
    ``top_k`` only the k largest logits of a row can be drawn (ties broken by `torch.topk`);
    ``temperature == 0`` or ``greedy`` returns the argmax. Probabilities are formed in float64.
    Non-finite logits raise `NonFiniteError`.
    """
    codes, finite = _draw(logits, generator, temperature, top_k, greedy)
    if not bool(finite):
        problem = describe_nonfinite(logits) or "values that overflow once divided by temperature"
        raise _nonfinite_logits(f"({problem})")
    return codes


MIN_TEMPERATURE = 1e-200
"""Smallest temperature > 0: below it float32 logits / temperature could overflow float64."""


def _check_draw_args(temperature: float, top_k: int | None, num_classes: int) -> None:
    if not temperature >= 0 or temperature == float("inf"):
        raise PriorInputError(
            f"temperature must be a finite number >= 0 (0 = argmax), received {temperature}"
        )
    if 0 < temperature < MIN_TEMPERATURE:
        raise PriorInputError(
            f"temperature {temperature} is too small (logits / temperature would overflow): use "
            f"temperature=0 for the argmax, or at least {MIN_TEMPERATURE}"
        )
    bad_k = not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= num_classes
    if top_k is not None and bad_k:
        raise PriorInputError(
            f"top_k must be None or an integer in [1, {num_classes}] (codebook_size), "
            f"received {top_k!r}"
        )


def _window(src: Tensor, dim: int, stop: int, length: int) -> Tensor:
    """The ``length`` entries of ``src`` before index ``stop`` along ``dim``, zeros in front."""
    start = stop - length
    part = src.narrow(dim, max(start, 0), stop - max(start, 0))
    if start >= 0:
        return part
    pads = [0] * (2 * (src.ndim - dim))
    pads[-2] = -start
    return F.pad(part, pads)


class _LayerKernels:
    """One layer's masked weights reshaped for the step kernels (computed once per sample call)."""

    def __init__(self, layer: GatedLayer3D, labels: Tensor | None) -> None:
        c = layer.depth.kernel_size // 2
        self.residual = layer.residual
        self.taps = c + 1 if layer.residual else c  # mask A: the always-zero current tap dropped
        self.channels = layer.channels
        depth = layer.depth.masked_weight()[:, :, : self.taps]  # (2C, C_in, taps, k, k)
        self.depth_w = depth.reshape(depth.shape[0], -1, *depth.shape[3:])  # taps folded in C_in
        self.depth_b = layer.depth.bias
        self.height_w = layer.height.masked_weight()[:, :, 0, : self.taps]  # (2C, C_in, taps, k)
        self.height_b = layer.height.bias
        width = layer.width.masked_weight()[:, :, 0, 0, : self.taps]  # (2C, C_in, taps)
        self.width_wt = width.permute(0, 2, 1).reshape(width.shape[0], -1).t().contiguous()
        self.d2h_w = layer.depth_to_height.weight[:, :, 0]  # (2C, 2C, 1, 1)
        self.d2h_b = layer.depth_to_height.bias
        self.h2w_w = layer.height_to_width.weight[:, :, 0, 0, 0]  # (2C, 2C)
        self.h2w_b = layer.height_to_width.bias + layer.width.bias
        self.out_wt = layer.out.weight[:, :, 0, 0, 0].t().contiguous()  # (C, 2C)
        self.out_b = layer.out.bias
        self.cond = layer.conditioning(labels)


class StepState:
    """Activations of every stack, filled slice by slice, row by row and voxel by voxel.

    Buffers (B = batch, C = hidden channels, E = embedding dim, c = kernel_size // 2):
        emb        (B, d, h, w, E)   embedded codes (only positions before the current one are read)
        depth_out  L x (B, C, d, h, w)  depth-stack outputs per layer
        h_link     L x (B, 2C, h, w)   depth -> height link for the current slice
        height_out L x (B, C, h, w)    height-stack outputs for the current slice
        w_link     L x (B, w, 2C)      height -> width link (+ biases, class offset), current row
        emb_row    (B, c + w, E)       codes of the current row, c zero columns in front
        width_out  L x (B, c + w, C)   width-stack outputs of the current row, c zero columns
    Every read is of an entry written earlier for the same slice/row (or a zero pad), so the
    result of a step depends only on codes before the step's position.
    """

    def __init__(
        self, model: GatedPixelCNN3D, batch: int, grid: Sequence[int], labels: Tensor | None
    ) -> None:
        self.model = model
        p = next(model.parameters())
        opts = {"dtype": p.dtype, "device": p.device}
        self.c = model.config.kernel_size // 2
        self.kernels = [_LayerKernels(layer, labels) for layer in model.layers]
        d, h, w = grid
        cfg = model.config
        hid = cfg.hidden_channels
        self.emb = torch.zeros(batch, d, h, w, cfg.embedding_dim, **opts)
        self.depth_out = [torch.zeros(batch, hid, d, h, w, **opts) for _ in self.kernels]
        self.h_link: list[Tensor] = [torch.empty(0)] * len(self.kernels)
        self.height_out = [torch.zeros(batch, hid, h, w, **opts) for _ in self.kernels]
        self.w_link: list[Tensor] = [torch.empty(0)] * len(self.kernels)
        self.emb_row = torch.zeros(batch, self.c + w, cfg.embedding_dim, **opts)
        self.width_out = [torch.zeros(batch, self.c + w, hid, **opts) for _ in self.kernels]
        self.head_w1 = model.head_hidden.weight[:, :, 0, 0, 0].t().contiguous()
        self.head_b1 = model.head_hidden.bias
        self.head_w2 = model.head_out.weight[:, :, 0, 0, 0].t().contiguous()
        self.head_b2 = model.head_out.bias

    def load(self, codes: Tensor) -> None:
        """Embed a whole code grid (B, d, h, w); only positions before the current one are read."""
        self.emb = self.model.embedding.weight[codes]

    def write(self, z: int, y: int, x: int, codes: Tensor) -> None:
        """Record the codes (B,) drawn at (z, y, x)."""
        vec = self.model.embedding.weight[codes]
        self.emb[:, z, y, x] = vec
        self.emb_row[:, self.c + x] = vec

    def write_row(self, x: int, codes: Tensor) -> None:
        """Record codes (B,) at column x of the current row only (naive replay of a row)."""
        self.emb_row[:, self.c + x] = self.model.embedding.weight[codes]

    def depth_step(self, z: int) -> None:
        """Depth stack for slice z (reads codes of slices < z) and its link to the height stack."""
        c = self.c
        for i, k in enumerate(self.kernels):
            if i == 0:
                win = _window(self.emb, 1, z, k.taps).permute(0, 4, 1, 2, 3)
            else:
                win = _window(self.depth_out[i - 1], 2, z + 1, k.taps)
            win = F.pad(win, (c, c, c, c))  # (B, C_in, taps, h + 2c, w + 2c), contiguous
            win = win.reshape(win.shape[0], -1, *win.shape[3:])
            a = F.conv2d(win, k.depth_w, k.depth_b)  # (B, 2C, h, w)
            if k.cond is not None:
                a = a + k.cond[0][:, :, None, None]
            new = gate(a)
            if k.residual:
                new = new + self.depth_out[i - 1][:, :, z]
            self.depth_out[i][:, :, z] = new
            link = F.conv2d(a, k.d2h_w, k.d2h_b)
            if k.cond is not None:
                link = link + k.cond[1][:, :, None, None]
            self.h_link[i] = link

    def height_step(self, z: int, y: int) -> None:
        """Height stack for row y of slice z (after `depth_step(z)`) and its width-stack link."""
        c = self.c
        for i, k in enumerate(self.kernels):
            if i == 0:
                win = _window(self.emb[:, z], 1, y, k.taps).permute(0, 3, 1, 2)
            else:
                win = _window(self.height_out[i - 1], 2, y + 1, k.taps)
            pre = F.conv2d(F.pad(win, (c, c)), k.height_w, k.height_b)[:, :, 0]  # (B, 2C, w)
            b = pre + self.h_link[i][:, :, y]  # (B, 2C, w)
            new = gate(b)
            if k.residual:
                new = new + self.height_out[i - 1][:, :, y]
            self.height_out[i][:, :, y] = new
            link = F.linear(b.transpose(1, 2), k.h2w_w, k.h2w_b)  # (B, w, 2C)
            if k.cond is not None:
                link = link + k.cond[2][:, None, :]
            self.w_link[i] = link

    def width_step(self, x: int) -> Tensor:
        """Logits (B, K) at column x of the current row (needs `height_step` for that row)."""
        c, batch = self.c, self.emb_row.shape[0]
        skip: Tensor | None = None
        for i, k in enumerate(self.kernels):
            src = self.emb_row if i == 0 else self.width_out[i - 1]
            win = src[:, x : x + k.taps]  # columns x - c .. x - c + taps - 1
            pre = torch.addmm(self.w_link[i][:, x], win.reshape(batch, -1), k.width_wt)
            res_skip = torch.addmm(k.out_b, gate(pre), k.out_wt)
            res, sk = res_skip[:, : k.channels], res_skip[:, k.channels :]
            if k.residual:
                res = res + self.width_out[i - 1][:, c + x]
            self.width_out[i][:, c + x] = res
            skip = sk if skip is None else skip + sk
        assert skip is not None
        hidden = torch.addmm(self.head_b1, F.relu(skip), self.head_w1).relu_()
        return torch.addmm(self.head_b2, hidden, self.head_w2)


Chooser = Callable[[Tensor], Tensor]


def _run_fast(state: StepState, out: Tensor, choose: Chooser) -> Tensor:
    """Cached sampler: one depth step per slice, one height step per row, one width step a voxel."""
    _, d, h, w = out.shape
    for z in range(d):
        state.depth_step(z)
        for y in range(h):
            state.height_step(z, y)
            for x in range(w):
                codes = choose(state.width_step(x))
                out[:, z, y, x] = codes
                state.write(z, y, x, codes)
    return out


def naive_logits_at(state: StepState, codes: Tensor, z: int, y: int, x: int) -> Tensor:
    """Logits (B, K) at (z, y, x), recomputed from scratch from ``codes`` (B, d, h, w) before it.

    Runs every depth step up to slice z, every height step of slice z up to row y and every
    width step of that row up to column x; nothing computed for an earlier position is reused.
    """
    state.load(codes)
    for zz in range(z + 1):
        state.depth_step(zz)
    for yy in range(y + 1):
        state.height_step(z, yy)
    for xx in range(x):
        state.width_step(xx)
        state.write_row(xx, codes[:, z, y, xx])
    return state.width_step(x)


def _run_naive(state: StepState, out: Tensor, choose: Chooser) -> Tensor:
    """Naive sampler: for each position recompute, from the codes so far, every step it needs."""
    _, d, h, w = out.shape
    for z in range(d):
        for y in range(h):
            for x in range(w):
                out[:, z, y, x] = choose(naive_logits_at(state, out, z, y, x))
    return out


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int, int]:
    ok = isinstance(shape, Sequence) and len(shape) == 4
    if ok:
        ok = all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape)
    if not ok:
        raise PriorInputError(
            f"shape must be (B, d, h, w), four integers >= 1, received {shape!r}; the latent grid "
            "is the VQ-VAE's latent_shape"
        )
    b, d, h, w = shape
    return b, d, h, w


@torch.no_grad()
def teacher_forced_logits(
    model: GatedPixelCNN3D, indices: Tensor, labels: Tensor | None = None
) -> Tensor:
    """Logits (B, K, d, h, w) of a given grid computed with the samplers' step arithmetic."""
    indices = model.check_indices(indices)
    labels = model.check_labels(labels, indices.shape[0])
    state = StepState(model, indices.shape[0], indices.shape[1:], labels)
    rows: list[Tensor] = []

    def replay(logits: Tensor) -> Tensor:
        rows.append(logits)
        flat = len(rows) - 1
        return indices.reshape(indices.shape[0], -1)[:, flat]

    _run_fast(state, torch.zeros_like(indices), replay)
    stacked = torch.stack(rows, dim=2)  # (B, K, d*h*w)
    return stacked.reshape(stacked.shape[0], stacked.shape[1], *indices.shape[1:])


@torch.no_grad()
def sample_grid(
    model: GatedPixelCNN3D,
    shape: Sequence[int],
    generator: torch.Generator,
    temperature: float = 1.0,
    top_k: int | None = None,
    labels: Tensor | None = None,
    method: str = "fast",
    greedy: bool = False,
) -> Tensor:
    """Sample code grids (B, d, h, w) int64 from ``model``; see `GatedPixelCNN3D.sample`.

    Raises `NonFiniteError` (no grid returned) when the model's logits are NaN/±Inf.
    """
    batch, d, h, w = _check_shape(shape)
    if method not in METHODS:
        raise PriorInputError(f"method must be one of {METHODS}, received {method!r}")
    if not isinstance(generator, torch.Generator):
        raise PriorInputError(
            "generator must be a seeded torch.Generator (torch.Generator().manual_seed(seed)), "
            f"received {type(generator).__name__}"
        )
    device = next(model.parameters()).device
    if generator.device != device:
        raise PriorInputError(
            f"generator is on {generator.device} but the model is on {device}; create it with "
            f"torch.Generator(device={str(device)!r})"
        )
    _check_draw_args(temperature, top_k, model.codebook_size)
    labels = model.check_labels(labels, batch)
    if labels is not None:
        labels = labels.to(device)
    state = StepState(model, batch, (d, h, w), labels)
    out = torch.zeros(batch, d, h, w, dtype=torch.long, device=device)
    all_finite = torch.ones((), dtype=torch.bool, device=device)
    steps = [0]

    def choose(logits: Tensor) -> Tensor:
        # The finiteness flag stays on the device; it is read once per latent slice (one host
        # sync per slice, not per voxel), so a diverged prior stops within one slice.
        codes, finite = _draw(logits, generator, temperature, top_k, greedy)
        all_finite.logical_and_(finite)
        steps[0] += 1
        if steps[0] % (h * w) == 0 and not bool(all_finite):
            raise _nonfinite_logits(f"in latent slice {steps[0] // (h * w) - 1}")
        return codes

    run = _run_fast if method == "fast" else _run_naive
    return run(state, out, choose)

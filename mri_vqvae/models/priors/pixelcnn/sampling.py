"""Sampling from `GatedPixelCNN3D`: the naive and cached samplers.

Both samplers run the same per-position arithmetic (`StepState`): a depth step per slice, a
height step per row and a width step per voxel, each a fixed-shape computation on a fixed-shape
window of earlier activations (a dilated layer's window holds every r-th earlier slice, row or
voxel; position and context offsets are computed per slice). The cached sampler runs
every step once and keeps its outputs; the naive sampler, for every position, recomputes from
scratch every step that position depends on (all slices up to it, all rows of its slice up to it,
all voxels of its row up to it). The two therefore call the same kernels on bit-identical inputs,
so their logits, and with the same generator their draws, are bitwise equal; there is no
full-versus-incremental rounding gap that could flip a draw. The vectorised
`GatedPixelCNN3D.forward` (training, nll) agrees with the stepped logits to float rounding
(tested), not bitwise.

Draws come from `mri_vqvae.models.priors.pixelcnn.draw` (one uniform per batch row and position).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mri_vqvae.models.priors.base import PriorInputError
from mri_vqvae.models.priors.pixelcnn.draw import check_draw_args, draw, nonfinite_logits_error
from mri_vqvae.models.priors.pixelcnn.model import GatedLayer3D, GatedPixelCNN3D, gate

METHODS = ("fast", "naive")


def _window(src: Tensor, dim: int, last: int, length: int, step: int = 1) -> Tensor:
    """Entries ``last - (length - 1) * step, ..., last`` of ``src`` along ``dim``, ``step`` apart.

    Indices below 0 read zeros (``last >= -step``); the result has ``length`` entries along dim.
    """
    first = last - (length - 1) * step
    missing = max(0, (step - 1 - first) // step)  # entries at negative indices
    part = src[(slice(None),) * dim + (slice(first + missing * step, last + 1, step),)]
    if missing == 0:
        return part
    pads = [0] * (2 * (src.ndim - dim))
    pads[-2] = missing
    return F.pad(part, pads)


def _row_conv(win: Tensor, weight: Tensor, bias: Tensor, dilation: int) -> Tensor:
    """The height stack's convolution along a row: (B, C_in, taps, w + 2 * reach) -> (B, 2C, w).

    ``weight`` is (2C, C_in, taps, k). Dilated, it runs as one matmul over unfolded columns:
    PyTorch's dilated CPU convolution is about 5x slower at these sizes.
    """
    if dilation == 1:
        return F.conv2d(win, weight, bias)[:, :, 0]
    k = weight.shape[-1]
    cols = win.unfold(3, (k - 1) * dilation + 1, 1)[..., ::dilation]  # (B, C_in, taps, w, k)
    cols = cols.transpose(3, 4).reshape(win.shape[0], -1, cols.shape[3])  # (B, C_in*taps*k, w)
    return torch.matmul(weight.reshape(weight.shape[0], -1), cols) + bias[:, None]


class _LayerKernels:
    """One layer's masked weights reshaped for the step kernels (computed once per sample call)."""

    def __init__(self, layer: GatedLayer3D, labels: Tensor | None) -> None:
        c = layer.depth.kernel_size // 2
        self.place_offsets = layer.place_offsets
        self.dilation = layer.dilation
        self.reach = c * layer.dilation  # zero padding each side of a window, in latents
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

    Buffers (B = batch, C = hidden channels, E = embedding dim, P = (kernel_size // 2) times the
    largest dilation):
        emb        (B, d, h, w, E)   embedded codes (only positions before the current one are read)
        depth_out  L x (B, C, d, h, w)  depth-stack outputs per layer
        h_link     L x (B, 2C, h, w)   depth -> height link for the current slice
        w_place    L x ([B,] h, w, 2C) width-stack position/context offsets of the slice (or None)
        height_out L x (B, C, h, w)    height-stack outputs for the current slice
        w_link     L x w x (B, 2C)     height -> width link (+ biases, class and position), row
        emb_row    (B, P + w, E)       codes of the current row, P zero columns in front
        width_out  L x (B, P + w, C)   width-stack outputs of the current row, P zero columns
    The width step reads fixed views of the row buffers made once (``windows``: a layer's input
    taps for each column; ``columns``: width_out per column), saving a slicing op per access.
    Every read is of an entry written earlier for the same slice/row (or a zero pad), so the
    result of a step depends only on codes before the step's position.
    """

    def __init__(
        self,
        model: GatedPixelCNN3D,
        batch: int,
        grid: Sequence[int],
        labels: Tensor | None,
        context: Tensor | None = None,
    ) -> None:
        self.model = model
        self.context = context  # (B, d, h, w, E_c) or None
        p = next(model.parameters())
        opts = {"dtype": p.dtype, "device": p.device}
        self.kernels = [_LayerKernels(layer, labels) for layer in model.layers]
        self.pad = max(k.reach for k in self.kernels)
        d, h, w = grid
        cfg = model.config
        hid = cfg.hidden_channels
        self.emb = torch.zeros(batch, d, h, w, cfg.embedding_dim, **opts)
        self.depth_out = [torch.zeros(batch, hid, d, h, w, **opts) for _ in self.kernels]
        self.h_link: list[Tensor] = [torch.empty(0)] * len(self.kernels)
        self.w_place: list[Tensor | None] = [None] * len(self.kernels)
        self.height_out = [torch.zeros(batch, hid, h, w, **opts) for _ in self.kernels]
        self.w_link: list[Sequence[Tensor]] = [()] * len(self.kernels)
        self.emb_row = torch.zeros(batch, self.pad + w, cfg.embedding_dim, **opts)
        self.width_out = [torch.zeros(batch, self.pad + w, hid, **opts) for _ in self.kernels]
        self.columns = [out.unbind(1) for out in self.width_out]
        sources = [self.emb_row, *self.width_out[:-1]]
        self.windows = [
            self._windows(src, k, w) for src, k in zip(sources, self.kernels, strict=True)
        ]
        self.head_w1 = model.head_hidden.weight[:, :, 0, 0, 0].t().contiguous()
        self.head_b1 = model.head_hidden.bias
        self.head_w2 = model.head_out.weight[:, :, 0, 0, 0].t().contiguous()
        self.head_b2 = model.head_out.bias

    def _windows(self, src: Tensor, k: _LayerKernels, w: int) -> list[Tensor]:
        """Views of a layer's input taps in ``src`` (B, P + w, C_in) for each column x.

        Columns x - reach, ..., x (``dilation`` apart), flattened to (B, taps * C_in) where that
        is a view (dilation 1), else (B, taps, C_in) to be flattened (copied) at each step.
        """
        span = (k.taps - 1) * k.dilation + 1
        starts = [self.pad + x - k.reach for x in range(w)]
        views = [src[:, s : s + span : k.dilation] for s in starts]
        return [v.flatten(1) if k.dilation == 1 else v for v in views]

    def load(self, codes: Tensor) -> None:
        """Embed a whole code grid (B, d, h, w); only positions before the current one are read."""
        self.emb = self.model.embedding.weight[codes]

    def write(self, z: int, y: int, x: int, codes: Tensor) -> None:
        """Record the codes (B,) drawn at (z, y, x)."""
        vec = self.model.embedding.weight[codes]
        self.emb[:, z, y, x] = vec
        self.emb_row[:, self.pad + x] = vec

    def write_row(self, x: int, codes: Tensor) -> None:
        """Record codes (B,) at column x of the current row only (naive replay of a row)."""
        self.emb_row[:, self.pad + x] = self.model.embedding.weight[codes]

    def depth_step(self, z: int) -> None:
        """Depth stack for slice z (reads codes of slices < z) and its link to the height stack."""
        _, h, w = self.emb.shape[1:4]
        position = self.model.position
        features = None if position is None else position.slice(z, h, w)  # (h, w, E)
        context = None if self.context is None else self.context[:, z]  # (B, h, w, E_c)
        for i, k in enumerate(self.kernels):
            if i == 0:  # mask A: the slices before z (the first layer is never dilated)
                win = _window(self.emb, 1, z - 1, k.taps).permute(0, 4, 1, 2, 3)
            else:
                win = _window(self.depth_out[i - 1], 2, z, k.taps, k.dilation)
            win = F.pad(win, (k.reach,) * 4)  # (B, C_in, taps, h + 2P, w + 2P), contiguous
            win = win.reshape(win.shape[0], -1, *win.shape[3:])
            a = F.conv2d(win, k.depth_w, k.depth_b, dilation=k.dilation)  # (B, 2C, h, w)
            if k.cond is not None:
                a = a + k.cond[0][:, :, None, None]
            place = k.place_offsets(features, context)
            if place is not None:
                a = a + place[0].movedim(-1, -3)
            new = gate(a)
            if k.residual:
                new = new + self.depth_out[i - 1][:, :, z]
            self.depth_out[i][:, :, z] = new
            link = F.conv2d(a, k.d2h_w, k.d2h_b)
            if k.cond is not None:
                link = link + k.cond[1][:, :, None, None]
            if place is not None:
                link = link + place[1].movedim(-1, -3)
            self.h_link[i] = link
            self.w_place[i] = None if place is None else place[2]

    def height_step(self, z: int, y: int) -> None:
        """Height stack for row y of slice z (after `depth_step(z)`) and its width-stack link."""
        for i, k in enumerate(self.kernels):
            if i == 0:  # mask A: the rows before y
                win = _window(self.emb[:, z], 1, y - 1, k.taps).permute(0, 3, 1, 2)
            else:
                win = _window(self.height_out[i - 1], 2, y, k.taps, k.dilation)
            win = F.pad(win, (k.reach, k.reach))  # (B, C_in, taps, w + 2 reach)
            pre = _row_conv(win, k.height_w, k.height_b, k.dilation)  # (B, 2C, w)
            b = pre + self.h_link[i][:, :, y]  # (B, 2C, w)
            new = gate(b)
            if k.residual:
                new = new + self.height_out[i - 1][:, :, y]
            self.height_out[i][:, :, y] = new
            link = F.linear(b.transpose(1, 2), k.h2w_w, k.h2w_b)  # (B, w, 2C)
            if k.cond is not None:
                link = link + k.cond[2][:, None, :]
            place = self.w_place[i]
            if place is not None:
                link = link + place[..., y, :, :]
            self.w_link[i] = link.unbind(1)

    def width_step(self, x: int) -> Tensor:
        """Logits (B, K) at column x of the current row (needs `height_step` for that row)."""
        col, batch = self.pad + x, self.emb_row.shape[0]
        skip: Tensor | None = None
        for i, k in enumerate(self.kernels):
            win = self.windows[i][x].reshape(batch, -1)  # a copy only when dilated
            pre = torch.addmm(self.w_link[i][x], win, k.width_wt)
            res_skip = torch.addmm(k.out_b, gate(pre), k.out_wt)
            res, sk = res_skip[:, : k.channels], res_skip[:, k.channels :]
            if k.residual:
                torch.add(res, self.columns[i - 1][col], out=self.columns[i][col])
            else:
                self.columns[i][col].copy_(res)
            skip = sk if skip is None else skip.add_(sk)
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
    model: GatedPixelCNN3D,
    indices: Tensor,
    labels: Tensor | None = None,
    context: Tensor | None = None,
) -> Tensor:
    """Logits (B, K, d, h, w) of a given grid computed with the samplers' step arithmetic."""
    indices = model.check_indices(indices)
    labels = model.check_labels(labels, indices.shape[0])
    model.check_grid(indices.shape[1:])
    model.check_context(context, indices.shape[0], indices.shape[1:])
    state = StepState(model, indices.shape[0], indices.shape[1:], labels, context)
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
    context: Tensor | None = None,
    kept: Tensor | None = None,
) -> Tensor:
    """Sample code grids (B, d, h, w) int64 from ``model``; see `GatedPixelCNN3D.sample`.

    ``kept`` (B, d, h, w) int64: a code >= 0 is taken instead of a draw at that position (the
    uniform is still drawn, so the random stream stays aligned), -1 is drawn; every later
    position is conditioned on the codes so placed (`GatedPixelCNN3D.complete`).
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
    check_draw_args(temperature, top_k, model.codebook_size)
    model.check_grid((d, h, w))
    labels = model.check_labels(labels, batch)
    if labels is not None:
        labels = labels.to(device)
    model.check_context(context, batch, (d, h, w))
    state = StepState(model, batch, (d, h, w), labels, context)
    out = torch.zeros(batch, d, h, w, dtype=torch.long, device=device)
    all_finite = torch.ones((), dtype=torch.bool, device=device)
    steps = [0]
    fixed = None if kept is None else kept.to(device).reshape(batch, -1)

    def choose(logits: Tensor) -> Tensor:
        # The finiteness flag stays on the device; it is read once per latent slice (one host
        # sync per slice, not per voxel), so a diverged prior stops within one slice.
        codes, finite = draw(logits, generator, temperature, top_k, greedy)
        if fixed is not None:  # positions are chosen in raster order: steps[0] is this one
            here = fixed[:, steps[0]]
            codes = torch.where(here >= 0, here, codes)
        all_finite.logical_and_(finite)
        steps[0] += 1
        if steps[0] % (h * w) == 0 and not bool(all_finite):
            raise nonfinite_logits_error(f"in latent slice {steps[0] // (h * w) - 1}")
        return codes

    run = _run_fast if method == "fast" else _run_naive
    return run(state, out, choose)

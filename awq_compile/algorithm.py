"""The AWQ algorithm core: pure tensor functions (no hooks, no modules, no device moves).

`search_scale` is AWQ's grid search over alpha for one scale group; `search_clip` is its
auto-clip for one linear. Both follow Lin et al. 2023 and the authors' reference code; where we
deviate it is said in the docstring.
"""

from __future__ import annotations

from typing import Callable

import torch

from .quant import _grouped, fake_quantize, padded_k

__all__ = ["weight_saliency", "search_scale", "search_clip", "apply_clip", "expand_scale"]


def weight_saliency(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """Mean over rows of |w| normalised by its group's max |w|: [K] (AutoAWQ's w_mean)."""
    k = w.shape[1]
    g = _grouped(w.abs().float(), group_size)
    g = g / g.amax(dim=-1, keepdim=True).clamp(min=1e-12)
    return g.reshape(w.shape[0], -1)[:, :k].mean(dim=0)


def expand_scale(s: torch.Tensor, channel_map: tuple[int, ...] | None) -> torch.Tensor:
    """A scale in the absorber's channel space -> one value per input channel of the group."""
    if channel_map is None:
        return s
    return s[torch.tensor(channel_map, device=s.device)]


def _to_absorber_space(v: torch.Tensor, channel_map: tuple[int, ...] | None, size: int):
    """Average a per-input-channel statistic over the input channels sharing an absorber
    channel (grouped-query attention repeats each v_proj channel over several o_proj inputs)."""
    if channel_map is None:
        return v
    idx = torch.tensor(channel_map, device=v.device)
    acc = torch.zeros(size, dtype=v.dtype, device=v.device).index_add_(0, idx, v)
    cnt = torch.zeros(size, dtype=v.dtype, device=v.device).index_add_(0, idx, torch.ones_like(v))
    return acc / cnt.clamp(min=1)


def _gram(x: torch.Tensor) -> torch.Tensor | None:
    """x^T x when that is the cheaper way to the output error: ||x d^T||^2 = sum((d H) * d)
    costs N K^2 with H, T N K without; so H is used while K < T."""
    return x.t() @ x if x.shape[1] < x.shape[0] else None


def _output_mse(x: torch.Tensor, h: torch.Tensor | None, d: torch.Tensor) -> float:
    """Mean over tokens and output rows of (x @ d^T)^2, d a weight error [N, K]."""
    if h is not None:
        return ((d @ h) * d).sum().item() / (x.shape[0] * d.shape[0])
    return (x @ d.t()).pow(2).mean().item()


@torch.no_grad()
def search_scale(
    x: torch.Tensor,
    x_mean: torch.Tensor,
    weights: list[torch.Tensor],
    group_size: int,
    zero_point: bool = True,
    n_grid: int = 20,
    duo_scaling: bool = True,
    channel_map: tuple[int, ...] | None = None,
    size: int | None = None,
    loss_fn: Callable[[list[torch.Tensor]], float] | None = None,
) -> tuple[torch.Tensor, float, list[float]]:
    """AWQ's scale search for one group.

    x [T, K]: sampled input rows; x_mean [K]: mean |x| over all calibration tokens; weights:
    the group's [N_i, K] weights. For alpha in {0, 1/n, ...}: s = x_mean^a / w_mean^(1-a)
    (duo) or x_mean^a, normalised by sqrt(max * min), and the loss is the mean squared error
    of the group's concatenated outputs x @ Q(W * s)^T / s against x @ W^T. Returns
    (best s in the absorber's channel space, best alpha, the losses).

    `loss_fn`, given the group's fake-quantized weights (one per linear, unscaled), returns the
    error measured further downstream (the group's region: passes/_region.py), as the reference
    code measures it at a block's output; without it, the loss is the MSE of the linears' own
    outputs over x.
    """
    w = torch.cat([wi.float() for wi in weights], dim=0)
    x = x.float()
    h = _gram(x) if loss_fn is None else None
    size = size or w.shape[1]
    xm = _to_absorber_space(x_mean.float(), channel_map, size)
    wm = _to_absorber_space(weight_saliency(w, group_size), channel_map, size)
    best = (float("inf"), 0.0, torch.ones(size, device=w.device))
    losses = []
    for i in range(n_grid):
        a = i / n_grid
        s = xm.pow(a) / wm.pow(1 - a).add(1e-4) if duo_scaling else xm.pow(a)
        s = s.clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        se = expand_scale(s, channel_map)
        wq = fake_quantize(w * se, group_size, zero_point) / se
        if loss_fn is not None:
            loss = loss_fn(list(wq.split([wi.shape[0] for wi in weights])))
        else:
            loss = _output_mse(x, h, wq - w)
        losses.append(loss)
        if loss < best[0]:
            best = (loss, a, s)
    if not torch.isfinite(best[2]).all():
        raise FloatingPointError("search_scale: the best scale is not finite")
    return best[2], best[1], losses


@torch.no_grad()
def search_clip(
    x: torch.Tensor,
    w: torch.Tensor,
    group_size: int,
    zero_point: bool = True,
    n_grid: int = 20,
    max_shrink: float = 0.5,
    separate_bounds: bool = True,
) -> torch.Tensor:
    """AWQ's auto-clip for one linear: per (row, group), the clip range minimising the MSE of
    that group's partial output over x [T, K]. Returns the bounds [N, G, 2] (lower, upper);
    `apply_clip` uses them.

    The reference searches one max m in {max|w| * (1 - i/n_grid)} and clamps to [-m, m].
    With `separate_bounds` and the asymmetric quantizer (deviation from the reference), the
    upper bound max(w) * (1 - i/n_grid) and the lower bound min(w) * (1 - j/n_grid) are
    searched on the full 2-D grid: the quantizer's range is [min, max], so the two tails can
    be cut by different amounts. Without it, the reference's symmetric search.

    The partial outputs' error is d^T H_g d with H_g the group's block of x^T x: the same
    number as over x itself, at g/T of the cost."""
    n, k = w.shape
    # Padded input columns are zero, so the padded weight columns (copies of the last real
    # one, see quant._grouped) add nothing to the outputs compared.
    xg = _pad_x(x.float(), k, group_size)  # [T, G, g]
    h = torch.einsum("tgk,tgl->gkl", xg, xg) / xg.shape[0]  # [G, g, g]
    wg = _grouped(w.float(), group_size)  # [N, G, g]
    steps = [1 - i / n_grid for i in range(max(1, int(max_shrink * n_grid)))]
    if separate_bounds and zero_point:
        hi, lo = wg.amax(dim=-1, keepdim=True), wg.amin(dim=-1, keepdim=True)
        cands = [(lo * b, hi * a) for a in steps for b in steps]
    else:
        m = wg.abs().amax(dim=-1, keepdim=True)
        cands = [(-m * a, m * a) for a in steps]
    best_err = torch.full(wg.shape[:2], float("inf"), device=w.device)
    best = torch.cat(cands[0], dim=-1)  # the first candidate clips nothing
    for lo_c, hi_c in cands:
        cw = torch.minimum(torch.maximum(wg, lo_c), hi_c)
        d = fake_quantize(cw.reshape(n, -1), group_size, zero_point).reshape(cw.shape) - wg
        err = torch.einsum("ngk,gkl,ngl->ng", d, h, d)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better.unsqueeze(-1), torch.cat([lo_c, hi_c], dim=-1), best)
    return best


def apply_clip(w: torch.Tensor, bounds: torch.Tensor, group_size: int) -> torch.Tensor:
    """Clamp w [N, K] per (row, group) to [lower, upper], bounds [N, G, 2] from search_clip."""
    k = w.shape[1]
    b = bounds.to(w.dtype).repeat_interleave(group_size, dim=1)[:, :k]
    return torch.minimum(torch.maximum(w, b[..., 0]), b[..., 1])


def _pad_x(x: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    kp = padded_k(k, group_size)
    if kp != k:
        x = torch.cat([x, x.new_zeros(x.shape[0], kp - k)], dim=1)
    return x.reshape(x.shape[0], kp // group_size, group_size)

"""The AWQ algorithm core (pure tensor functions): AWQ beats round-to-nearest on planted outlier
channels and on real weights; the Gram-matrix shortcuts equal the direct computation."""

import pytest
import torch

from awq_compile.algorithm import (
    _gram, _output_mse, apply_clip, search_clip, search_scale, weight_saliency,
)
from awq_compile.quant import fake_quantize


def _rtn_loss(x, ws, g):
    w = torch.cat(ws)
    return (x @ (fake_quantize(w, g) - w).t()).pow(2).mean().item()


def test_scale_search_protects_planted_outliers():
    torch.manual_seed(0)
    x = torch.randn(2048, 256)
    x[:, [3, 70, 140, 200]] *= 40  # salient input channels
    ws = [torch.randn(96, 256) * 0.05, torch.randn(32, 256) * 0.05]
    s, alpha, losses = search_scale(x, x.abs().mean(0), ws, 64, n_grid=20)
    rtn = _rtn_loss(x, ws, 64)
    assert min(losses) < 0.5 * rtn
    assert alpha > 0
    assert s[[3, 70, 140, 200]].min() > s.median() * 3  # the salient channels get larger scales


def test_gram_loss_equals_direct_loss():
    torch.manual_seed(1)
    x = torch.randn(300, 40, dtype=torch.float64)
    d = torch.randn(7, 40, dtype=torch.float64)
    h = _gram(x)
    assert h is not None
    assert _output_mse(x, h, d) == pytest.approx(_output_mse(x, None, d), rel=1e-12)
    assert _gram(torch.randn(10, 40)) is None  # K >= T: the direct product is cheaper


def _partial_output_err(x, w, q):
    return ((x @ (q - w)) ** 2).mean().item()


def test_clip_search_matches_brute_force_and_helps():
    """The reference's symmetric search (separate_bounds=False) against a float64 brute force."""
    torch.manual_seed(2)
    x = torch.randn(512, 128, dtype=torch.float64)
    w = torch.randn(16, 128, dtype=torch.float64)
    w[:, 5] *= 6  # a few heavy weights make clipping worthwhile
    best = search_clip(x, w, 64, n_grid=10, max_shrink=0.5, separate_bounds=False)
    assert best.shape == (16, 2, 2)
    torch.testing.assert_close(best[..., 0], -best[..., 1])
    # brute force over the same grid, per (row, group), with the partial outputs themselves
    wg, xg = w.reshape(16, 2, 64), x.reshape(512, 2, 64)
    org = wg.abs().amax(-1)
    for r in range(16):
        for g in range(2):
            errs = []
            for i in range(5):
                m = org[r, g] * (1 - i / 10)
                q = fake_quantize(wg[r, g].clamp(-m, m).reshape(1, 64), 64)[0]
                errs.append(_partial_output_err(xg[:, g], wg[r, g], q))
            want = org[r, g] * (1 - min(range(5), key=errs.__getitem__) / 10)
            assert best[r, g, 1].item() == pytest.approx(want.item(), rel=1e-6)  # search runs in fp32
    clipped = apply_clip(w, best, 64)
    err_clip = (x @ (fake_quantize(clipped, 64) - w).t()).pow(2).mean()
    err_none = (x @ (fake_quantize(w, 64) - w).t()).pow(2).mean()
    assert err_clip < err_none


def test_separate_bounds_clip_matches_2d_brute_force():
    """Lower and upper bounds searched apart (the default for the asymmetric quantizer): the
    chosen pair is the float64 brute force's over the 2-D grid, up to fp32 near-ties, and never
    worse than the symmetric search's. K = 80 with g = 64 also covers the padded last group."""
    torch.manual_seed(3)
    x = torch.randn(400, 80, dtype=torch.float64) * torch.rand(80, dtype=torch.float64).add(0.2)
    w = torch.randn(12, 80, dtype=torch.float64)
    w[:, 7] *= 5  # heavy positive and negative tails in different rows
    w[:3, 70:] += 0.8  # skewed groups, where the two bounds want different cuts
    best = search_clip(x, w, 64, n_grid=8, max_shrink=0.5)
    sym = search_clip(x, w, 64, n_grid=8, max_shrink=0.5, separate_bounds=False)
    steps = [1 - i / 8 for i in range(4)]
    bounds = [(0, 64), (64, 80)]
    for r in range(12):
        for g, (a, b) in enumerate(bounds):
            wr, xr = w[r, a:b], x[:, a:b]

            def err(lo, hi):
                q = fake_quantize(wr.clamp(lo, hi).reshape(1, -1), b - a)[0]
                return _partial_output_err(xr, wr, q)

            errs = {(wr.min() * sl, wr.max() * sh): None for sh in steps for sl in steps}
            errs = {k: err(*k) for k in errs}
            got = err(best[r, g, 0].item(), best[r, g, 1].item())
            assert got == pytest.approx(min(errs.values()), rel=1e-5)
            assert got <= err(sym[r, g, 0].item(), sym[r, g, 1].item()) * (1 + 1e-5)
            assert any(best[r, g, 0].item() == pytest.approx(lo.item(), rel=1e-6)
                       and best[r, g, 1].item() == pytest.approx(hi.item(), rel=1e-6)
                       for lo, hi in errs)


def test_symmetric_quantizer_ignores_separate_bounds():
    torch.manual_seed(4)
    x, w = torch.randn(64, 64), torch.randn(8, 64)
    a = search_clip(x, w, 32, zero_point=False, n_grid=6, separate_bounds=True)
    b = search_clip(x, w, 32, zero_point=False, n_grid=6, separate_bounds=False)
    torch.testing.assert_close(a, b)


def test_apply_clip_clamps_each_group_to_its_bounds():
    w = torch.tensor([[-3.0, 1.0, 2.0, -1.0, 5.0]])  # K = 5, g = 2: the last group is partial
    bounds = torch.tensor([[[-2.0, 0.5], [-0.5, 9.0], [-1.0, 4.0]]])
    want = torch.tensor([[-2.0, 0.5, 2.0, -0.5, 4.0]])
    torch.testing.assert_close(apply_clip(w, bounds, 2), want)


def test_weight_saliency_is_group_normalised_mean():
    w = torch.tensor([[1.0, -2.0, 4.0, 0.0], [2.0, 2.0, -1.0, 1.0]])
    want = torch.tensor([(0.5 + 1.0) / 2, (1.0 + 1.0) / 2, (1.0 + 1.0) / 2, (0.0 + 1.0) / 2])
    torch.testing.assert_close(weight_saliency(w, 2), want)


@pytest.mark.slow
def test_awq_beats_rtn_on_real_weights(smollm2):
    """Layer 3's attention inputs of the real model on real text: the searched scale lowers
    the output error of q/k/v below round-to-nearest's."""
    from awq_compile.calib import calibration_text, sample_calibration

    model, tok = smollm2
    ids = sample_calibration(tok, calibration_text(), n_samples=2, seq_len=256, seed=0)
    layer = model.model.layers[3]
    seen = []
    hook = layer.self_attn.q_proj.register_forward_hook(lambda m, a, o: seen.append(a[0]))
    with torch.no_grad():
        model(ids)
    hook.remove()
    x = seen[0].reshape(-1, 576)
    ws = [layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight, layer.self_attn.v_proj.weight]
    _, _, losses = search_scale(x, x.abs().mean(0), [w.detach() for w in ws], 64)
    assert min(losses) < 0.9 * _rtn_loss(x, [w.detach() for w in ws], 64)

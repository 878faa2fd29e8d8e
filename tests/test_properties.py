"""Property tests (hypothesis) of the INT4 primitives: quantize/dequantize error bounds, packing
bit-exact for any shape, group size and zero-point mode, the AutoAWQ layout both ways, the op
against a float64 reference.

Weights come from a seed and a "kind" (Gaussian, heavy outliers, constant rows, exact zeros,
sparse, all one sign) over magnitudes 1e-3..1e3, so hypothesis explores shapes and value
patterns while each example stays a few small tensors. The profile is derandomized: CI runs the
same examples every time.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from awq_compile.ops import int4_linear
from awq_compile.quant import (
    AWQ_ORDER, dequantize, fake_quantize, from_autoawq, pack_int4, padded_k, quantize, to_autoawq,
    unpack_int4,
)

CI = settings(deadline=None, derandomize=True, database=None, max_examples=60,
              suppress_health_check=[HealthCheck.too_slow])
GROUPS = st.sampled_from([32, 64, 128])
SCALE_DTYPES = st.sampled_from([torch.float16, torch.bfloat16, torch.float32])
KINDS = ("gauss", "outliers", "const_rows", "zeros", "sparse", "one_sign")
# Relative rounding of a scale stored in each dtype (half an ulp at 1.0).
EPS = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24}
TINY = {torch.float16: 6.2e-5, torch.bfloat16: 1.2e-38, torch.float32: 1.2e-38}  # smallest normal


def make_weight(n: int, k: int, kind: str, exp: int, seed: int) -> torch.Tensor:
    """A float32 weight [n, k] of magnitude ~10**exp with the value pattern `kind`."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    if kind == "outliers":
        hot = torch.rand(n, k, generator=gen) < 0.02
        w = torch.where(hot, w * 100, w)
    elif kind == "const_rows":
        w[::2] = w[::2, :1]
    elif kind == "zeros":
        w[:, ::3] = 0.0
        w[1::2] = 0.0
    elif kind == "sparse":
        w = torch.where(torch.rand(n, k, generator=gen) < 0.9, torch.zeros(()), w)
    elif kind == "one_sign":
        w = w.abs() + 1.0
    return w * 10.0**exp


weights = st.builds(
    make_weight,
    n=st.integers(1, 17),
    k=st.integers(1, 300),
    kind=st.sampled_from(KINDS),
    exp=st.integers(-3, 3),
    seed=st.integers(0, 2**31 - 1),
)


def _group_view(t: torch.Tensor, k: int, g: int) -> torch.Tensor:
    """[N, K] -> [N, G, g] with padded positions NaN (ignored by nan-aware reductions)."""
    n = t.shape[0]
    kp = padded_k(k, g)
    out = torch.full((n, kp), float("nan"), dtype=torch.float64)
    out[:, :k] = t.double()
    return out.reshape(n, kp // g, g)


# ----------------------------------------------------------------------------- quantize


@CI
@given(w=weights, g=GROUPS, zero_point=st.booleans(), sdt=SCALE_DTYPES)
def test_error_bound_from_stored_scales(w, g, zero_point, sdt):
    """Every group whose range contains 0 is reconstructed within half a step, plus what the
    scale's own rounding to `sdt` adds at the clamped end: with r = (real range) / (stored
    range), err <= s * (0.5 + L * max(0, r - 1)), L = 15 (asymmetric) or 7 (symmetric)."""
    n, k = w.shape
    qw = quantize(w, g, zero_point, sdt)
    assert qw.qweight.dtype == torch.uint8 and qw.qweight.shape == (n, padded_k(k, g) // 2)
    assert qw.scales.dtype == sdt and qw.scales.shape == (n, padded_k(k, g) // g)
    assert qw.in_features == k
    deq = dequantize(*qw[:3], g, k, dtype=torch.float64)
    assert deq.shape == (n, k) and torch.isfinite(deq).all()

    s = qw.scales.double()  # [N, G]
    err = _group_view((deq - w.double()).abs(), k, g)
    wg = _group_view(w, k, g)
    wmax = torch.nan_to_num(wg, nan=-float("inf")).amax(-1)
    wmin = torch.nan_to_num(wg, nan=float("inf")).amin(-1)
    if zero_point:
        levels, r = 15, (wmax - wmin).clamp(min=1e-5) / (15 * s)
        checked = (wmin <= 0) & (wmax >= 0)  # AWQ's min/max grid assumes it (see one_sign)
    else:
        levels, r = 7, torch.maximum(wmax.abs(), wmin.abs()).clamp(min=1e-5) / (7 * s)
        checked = torch.ones_like(r, dtype=torch.bool)
    bound = s * (0.5 + levels * (r - 1).clamp(min=0)) * (1 + 1e-6) + 1e-12
    worst = torch.nan_to_num(err, nan=0.0).amax(-1)
    assert (worst[checked] <= bound[checked]).all(), (worst - bound)[checked].max()
    # The scale's rounding stays within the dtype's precision wherever it is a normal number.
    normal = s >= TINY[sdt]
    assert ((r[normal] - 1) <= 2 * EPS[sdt] + 1e-6).all()


@CI
@given(w=weights, g=GROUPS, zero_point=st.booleans(), sdt=SCALE_DTYPES)
def test_codes_in_range_and_padding_dequantizes_to_zero(w, g, zero_point, sdt):
    n, k = w.shape
    qw = quantize(w, g, zero_point, sdt)
    q = unpack_int4(qw.qweight)
    assert int(q.max()) <= 15 and int(qw.zeros.max()) <= 15
    if not zero_point:
        assert bool((qw.zeros == 8).all())
    kp = padded_k(k, g)
    assert torch.equal(q[:, k:], qw.zeros[:, -1:].expand(n, kp - k))
    full = dequantize(*qw[:3], g, dtype=torch.float32)
    assert bool((full[:, k:] == 0).all())


@CI
@given(w=weights, g=GROUPS, zero_point=st.booleans())
def test_fake_quantize_equals_quantize_then_dequantize(w, g, zero_point):
    """The search's inner loop computes exactly what gets stored (float32 scales)."""
    qw = quantize(w, g, zero_point, torch.float32)
    ref = dequantize(*qw[:3], g, w.shape[1], dtype=torch.float32)
    assert torch.equal(fake_quantize(w, g, zero_point), ref)


@CI
@given(w=weights, g=GROUPS, zero_point=st.booleans(), e=st.integers(-4, 4), rows=st.data())
def test_power_of_two_scaling_and_row_independence(w, g, zero_point, e, rows):
    """quantize(2^e W) has the same codes and 2^e times the scales (exact in float32) in every
    group whose range stays above the 1e-5 floor, and any subset of rows quantizes as it does
    inside the full matrix."""
    n, k = w.shape
    qw = quantize(w, g, zero_point, torch.float32)
    q2 = quantize(w * 2.0**e, g, zero_point, torch.float32)
    wg = _group_view(w, k, g)
    hi = torch.nan_to_num(wg, nan=-float("inf")).amax(-1)
    lo = torch.nan_to_num(wg, nan=float("inf")).amin(-1)
    span = (hi - lo) if zero_point else torch.maximum(hi.abs(), lo.abs())
    ok = span * min(1.0, 2.0**e) >= 2e-5  # [N, G]: neither range hits the floor
    codes = unpack_int4(qw.qweight).reshape(n, -1, g)
    codes2 = unpack_int4(q2.qweight).reshape(n, -1, g)
    assert torch.equal(codes[ok], codes2[ok]) and torch.equal(qw.zeros[ok], q2.zeros[ok])
    assert torch.equal(q2.scales[ok], qw.scales[ok] * 2.0**e)
    idx = rows.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=5))
    sub = quantize(w[idx], g, zero_point, torch.float32)
    for got, full in zip(sub[:3], qw[:3]):
        assert torch.equal(got, full[idx])


def test_one_sign_group_is_not_within_half_a_step():
    """Known limitation, shared with AutoAWQ's formula: z = clamp(-round(min/s), 0, 15) cannot
    place a grid that excludes 0, so a group of all-positive weights far from 0 collapses onto
    the top code. Real weights straddle 0 per group; this pins the behaviour so a change
    (including 0 in the range) is a conscious one."""
    w = torch.full((1, 32), 10.0)
    w[0, 0] = 10.1
    qw = quantize(w, 32, True, torch.float32)
    err = (dequantize(*qw[:3], 32, dtype=torch.float32) - w).abs().max()
    assert float(err) > 9.0


@pytest.mark.parametrize("zero_point", [True, False])
def test_scales_overflowing_their_dtype_are_refused(zero_point):
    """A group range beyond fp16's max x 15 would store inf scales and dequantize to NaN."""
    w = torch.tensor([[1e6, -1e6] * 16])
    with pytest.raises(ValueError, match="not finite in float16"):
        quantize(w, 32, zero_point, torch.float16)
    assert torch.isfinite(dequantize(*quantize(w, 32, zero_point, torch.float32)[:3], 32)).all()


# ----------------------------------------------------------------------------- packing


shapes = st.lists(st.integers(1, 9), min_size=0, max_size=2).flatmap(
    lambda lead: st.integers(1, 40).map(lambda half: (*lead, 2 * half))
)


@CI
@given(shape=shapes, seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_bit_exact_any_shape(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, shape, generator=gen, dtype=torch.uint8)
    p = pack_int4(q)
    assert p.shape == (*shape[:-1], shape[-1] // 2) and p.dtype == torch.uint8
    assert torch.equal(unpack_int4(p), q)
    flat_q, flat_p = q.reshape(-1, shape[-1]), p.reshape(-1, shape[-1] // 2)
    assert all(int(flat_p[r, b]) == int(flat_q[r, 2 * b]) | int(flat_q[r, 2 * b + 1]) << 4
               for r in range(min(2, flat_q.shape[0])) for b in range(flat_p.shape[1]))
    byte = torch.randint(0, 256, p.shape, generator=gen, dtype=torch.uint8)
    assert torch.equal(pack_int4(unpack_int4(byte)), byte)  # every byte is a valid pair


@CI
@given(n=st.integers(1, 5), k=st.integers(0, 20))
def test_pack_refuses_odd_k(n, k):
    with pytest.raises(ValueError, match="must be even"):
        pack_int4(torch.zeros(n, 2 * k + 1, dtype=torch.uint8))


# ----------------------------------------------------------------------------- AutoAWQ layout


autoawq_shapes = st.tuples(st.integers(1, 4), st.integers(1, 4), GROUPS)  # (N/8, K/g, g)


@CI
@given(dims=autoawq_shapes, zero_point=st.booleans(), sdt=SCALE_DTYPES, seed=st.integers(0, 2**31 - 1))
def test_autoawq_round_trip_from_our_layout(dims, zero_point, sdt, seed):
    n8, groups, g = dims
    w = make_weight(8 * n8, groups * g, "gauss", 0, seed)
    qw = quantize(w, g, zero_point, sdt)
    tensors = to_autoawq(qw)
    assert tensors["qweight"].dtype == torch.int32 and tensors["qweight"].shape == (groups * g, n8)
    assert tensors["qzeros"].shape == (groups, n8) and tensors["scales"].shape == (groups, 8 * n8)
    back = from_autoawq(tensors["qweight"], tensors["qzeros"], tensors["scales"])
    for a, b in zip(back[:3], qw[:3]):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert back.in_features == qw.in_features


@CI
@given(dims=autoawq_shapes, seed=st.integers(0, 2**31 - 1))
def test_autoawq_round_trip_from_any_words(dims, seed):
    """Any int32 words (sign bit included) survive AutoAWQ -> ours -> AutoAWQ, and nibble i of
    word j holds channel 8j + AWQ_ORDER[i] (checked with plain Python integers)."""
    n8, groups, g = dims
    gen = torch.Generator().manual_seed(seed)
    qweight = torch.randint(-2**31, 2**31, (groups * g, n8), generator=gen, dtype=torch.int64).to(torch.int32)
    qzeros = torch.randint(-2**31, 2**31, (groups, n8), generator=gen, dtype=torch.int64).to(torch.int32)
    scales = torch.rand(groups, 8 * n8, generator=gen).half()
    ours = from_autoawq(qweight, qzeros, scales)
    back = to_autoawq(ours)
    assert torch.equal(back["qweight"], qweight) and torch.equal(back["qzeros"], qzeros)
    assert torch.equal(back["scales"], scales)
    q = unpack_int4(ours.qweight)  # [N, K]
    k = int(torch.randint(0, groups * g, (), generator=gen))
    word = int(qweight[k, 0]) & 0xFFFFFFFF
    for i in range(8):
        assert int(q[AWQ_ORDER[i], k]) == (word >> (4 * i)) & 0xF


@CI
@given(n=st.integers(1, 24), k=st.integers(1, 200), g=GROUPS)
def test_autoawq_refuses_what_it_cannot_hold(n, k, g):
    qw = quantize(make_weight(n, k, "gauss", 0, n * k), g)
    if n % 8 or k % g:
        with pytest.raises(ValueError, match="multiple of"):
            to_autoawq(qw)
    else:
        to_autoawq(qw)


# ----------------------------------------------------------------------------- the op


@CI
@given(w=weights, g=GROUPS, zero_point=st.booleans(), m=st.integers(1, 5), bias=st.booleans(),
       xdt=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_int4_linear_matches_float64_reference(w, g, zero_point, m, bias, xdt):
    n, k = w.shape
    qw = quantize(w / w.abs().amax().clamp(min=1e-6), g, zero_point, torch.float16)
    gen = torch.Generator().manual_seed(n * 1000 + k)
    x = torch.randn(m, k, generator=gen).to(xdt)
    b = torch.randn(n, generator=gen).to(xdt) if bias else None
    y = int4_linear(x, qw.qweight, qw.scales.to(xdt), qw.zeros, g, b)
    assert y.shape == (m, n) and y.dtype == xdt
    wref = dequantize(qw.qweight, qw.scales.to(xdt), qw.zeros, g, k, dtype=torch.float64)
    ref = x.double() @ wref.t() + (b.double() if bias else 0)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[xdt]
    scale = (x.double().abs() @ wref.abs().t()).clamp(min=1) + (b.double().abs() if bias else 0)
    assert ((y.double() - ref).abs() <= tol * scale).all()

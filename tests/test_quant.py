"""INT4 primitives against float64 references; bit-exact format round trips."""

import pytest
import torch

from awq_compile.quant import (
    dequantize, fake_quantize, from_autoawq, pack_int4, padded_k, quantize, to_autoawq, unpack_int4,
)


@pytest.mark.parametrize("zero_point", [True, False])
@pytest.mark.parametrize("k,g", [(128, 32), (576, 64), (576, 128), (96, 64)])
def test_quantize_error_within_half_step(k, g, zero_point):
    torch.manual_seed(k + g)
    w = torch.randn(24, k, dtype=torch.float64)
    qw = quantize(w, g, zero_point, scale_dtype=torch.float32)
    deq = dequantize(*qw[:3], g, k, dtype=torch.float64)
    step = qw.scales.double().repeat_interleave(g, dim=1)[:, :k]
    # Every weight inside its group's [min, max] lands within half a step of itself.
    assert ((deq - w).abs() <= step / 2 + 1e-6).all()
    assert qw.qweight.shape == (24, padded_k(k, g) // 2)


def test_padding_rule_last_group_partial():
    torch.manual_seed(0)
    w = torch.randn(8, 576)
    w[:, 512:] *= 100  # the partial last group has its own range
    qw = quantize(w, 128, scale_dtype=torch.float32)
    q = unpack_int4(qw.qweight)
    assert q.shape == (8, 640)
    assert torch.equal(q[:, 576:], qw.zeros[:, -1:].expand(8, 64))  # padding == zero point
    full = dequantize(*qw[:3], 128)  # padded columns dequantize to exactly 0
    assert torch.equal(full[:, 576:], torch.zeros(8, 64))
    # the last group's scale comes from the real columns only
    ref = (w[:, 512:].amax(1) - w[:, 512:].amin(1)) / 15
    torch.testing.assert_close(qw.scales[:, -1], ref, rtol=1e-6, atol=0)


def test_symmetric_zero_point_is_eight():
    qw = quantize(torch.randn(4, 64), 32, zero_point=False)
    assert torch.equal(qw.zeros, torch.full((4, 2), 8, dtype=torch.uint8))
    q = unpack_int4(qw.qweight).int() - 8
    assert q.min() >= -8 and q.max() <= 7


def test_fake_quantize_matches_quantize_dequantize():
    torch.manual_seed(1)
    w = torch.randn(16, 192)
    qw = quantize(w, 64, scale_dtype=torch.float32)
    torch.testing.assert_close(fake_quantize(w, 64), dequantize(*qw[:3], 64), rtol=0, atol=1e-6)


def test_pack_unpack_bit_exact():
    q = torch.randint(0, 16, (5, 34), dtype=torch.uint8)
    p = pack_int4(q)
    assert p.shape == (5, 17)
    assert torch.equal(unpack_int4(p), q)
    assert int(p[0, 0]) == int(q[0, 0]) | (int(q[0, 1]) << 4)  # low nibble first
    with pytest.raises(ValueError, match="must be even"):
        pack_int4(q[:, :3])


def test_autoawq_round_trip_bit_exact():
    torch.manual_seed(2)
    qw = quantize(torch.randn(32, 256), 64)
    d = to_autoawq(qw)
    assert d["qweight"].dtype == torch.int32 and d["qweight"].shape == (256, 4)
    assert d["qzeros"].shape == (4, 4) and d["scales"].shape == (4, 32)
    back = from_autoawq(d["qweight"], d["qzeros"], d["scales"])
    for a, b in zip(qw, back):
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))


def test_autoawq_refuses_padding_and_odd_n():
    with pytest.raises(ValueError, match="no padding rule"):
        to_autoawq(quantize(torch.randn(8, 576), 128))
    with pytest.raises(ValueError, match="multiple of 8"):
        to_autoawq(quantize(torch.randn(6, 128), 64))


def test_quantize_rejects_bad_weights():
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize(torch.tensor([[float("nan")] * 32]), 32)
    with pytest.raises(ValueError, match="2-D"):
        quantize(torch.randn(32), 32)

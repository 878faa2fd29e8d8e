"""The custom op awq::int4_linear: numerics against float64, opcheck, clear errors."""

import pytest
import torch

import awq_compile  # noqa: F401
from awq_compile.nn import Int4Linear
from awq_compile.quant import dequantize, quantize


def _case(m, k, n, g, seed=0, dtype=torch.float32, bias=True):
    torch.manual_seed(seed)
    qw = quantize(torch.randn(n, k), g, scale_dtype=dtype)
    x = torch.randn(m, k, dtype=dtype)
    b = torch.randn(n, dtype=dtype) if bias else None
    return x, qw, b


@pytest.mark.parametrize("m,k,n,g", [(1, 64, 8, 32), (3, 576, 40, 128), (17, 576, 24, 64), (2, 96, 16, 64)])
def test_int4_linear_matches_float64(m, k, n, g):
    x, qw, b = _case(m, k, n, g)
    y = torch.ops.awq.int4_linear(x, qw.qweight, qw.scales, qw.zeros, g, b)
    ref = x.double() @ dequantize(*qw[:3], g, k, torch.float64).t() + b.double()
    assert (y.double() - ref).norm() / ref.norm() < 1e-6


def test_int4_linear_3d_and_half():
    x, qw, b = _case(6, 128, 16, 64, dtype=torch.float16)
    y = torch.ops.awq.int4_linear(x.reshape(2, 3, 128), qw.qweight, qw.scales, qw.zeros, 64, b)
    assert y.shape == (2, 3, 16) and y.dtype == torch.float16
    ref = x.double() @ dequantize(*qw[:3], 64, 128, torch.float64).t() + b.double()
    assert (y.reshape(6, 16).double() - ref).norm() / ref.norm() < 2e-3


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck(bias):
    x, qw, b = _case(3, 576, 16, 128, bias=bias)
    torch.library.opcheck(torch.ops.awq.int4_linear.default, (x, qw.qweight, qw.scales, qw.zeros, 128, b))


def test_errors_name_the_shapes():
    x, qw, b = _case(2, 128, 16, 64)
    with pytest.raises(ValueError, match=r"K=60 features.*x \(2, 60\)"):
        torch.ops.awq.int4_linear(x[:, :60], qw.qweight, qw.scales, qw.zeros, 64, b)
    with pytest.raises(ValueError, match="must be uint8"):
        torch.ops.awq.int4_linear(x, qw.qweight.int(), qw.scales, qw.zeros, 64, b)
    with pytest.raises(ValueError, match=r"scales and zeros must be \[16, 2\]"):
        torch.ops.awq.int4_linear(x, qw.qweight, qw.scales[:, :1], qw.zeros, 64, b)
    with pytest.raises(ValueError, match="group_size must be"):
        torch.ops.awq.int4_linear(x, qw.qweight, qw.scales, qw.zeros, 48, b)
    with pytest.raises(ValueError, match=r"bias must be \[16\]"):
        torch.ops.awq.int4_linear(x, qw.qweight, qw.scales, qw.zeros, 64, b[:3])


def test_int4_linear_module_and_input_scale():
    x, qw, b = _case(4, 64, 8, 32)
    s = torch.rand(64) + 0.5
    mod = Int4Linear.from_quantized(qw, 32, b, input_scale=s)
    ref = (x.double() * s.double()) @ dequantize(*qw[:3], 32, 64, torch.float64).t() + b.double()
    assert (mod(x).double() - ref).norm() / ref.norm() < 1e-6
    torch.testing.assert_close(mod.dequantized_weight(torch.float64),
                               dequantize(*qw[:3], 32, 64, torch.float64) * s.double())


def test_fake_impl_traces_in_export():
    x, qw, b = _case(4, 64, 8, 32)
    mod = Int4Linear.from_quantized(qw, 32, b)
    ep = torch.export.export(mod, (x,))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert torch.ops.awq.int4_linear.default in targets
    torch.testing.assert_close(ep.module()(x), mod(x))

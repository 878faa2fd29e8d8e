"""awq::decode_attention (its reference path, fake kernel and argument checks) and the pass
swap_decode_attention, on the CPU. The CUDA kernel's tests are in test_cuda_attention.py."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

import awq_compile
import torch._inductor.inductor_prims  # noqa: F401  (prims.inductor_force_stride_order)
from awq_compile import passes
from conftest import attention_reference, static_cache_decode

OP = torch.ops.awq.decode_attention.default
FORCE_STRIDES = torch.ops.prims.inductor_force_stride_order.default


def _qkv(b, hq, hkv, s, length, d, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=gen).to(dtype)
                 for shape in ((b, hq, s, d), (b, hkv, length, d), (b, hkv, length, d)))


@pytest.mark.parametrize("mask_kind", ["bool", "additive", "none"])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2)], ids=["mha", "gqa"])
def test_reference_path_against_float64(mask_kind, heads):
    hq, hkv = heads
    q, k, v = _qkv(2, hq, hkv, 2, 33, 16)
    gen = torch.Generator().manual_seed(1)
    keep = torch.rand(2, 1, 2, 33, generator=gen) > 0.4
    mask = {"bool": keep, "additive": torch.where(keep, torch.randn(2, 1, 2, 33, generator=gen), -math.inf),
            "none": None}[mask_kind]
    got = OP(q, k, v, mask, 0.3, hq != hkv)
    assert got.is_contiguous() and got.shape == (2, hq, 2, 16)
    want = attention_reference(q, k, v, mask, 0.3)
    assert ((got.double() - want).norm() / want.norm()).item() < 1e-5


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k, v = _qkv(1, 2, 2, 1, 9, 64)
    torch.testing.assert_close(OP(q, k, v, None, None, False), attention_reference(q, k, v, None, 1 / 8).float())


def test_fake_kernel_and_opcheck():
    q, k, v = _qkv(2, 8, 2, 1, 12, 16, torch.bfloat16)
    keep = torch.ones(2, 1, 1, 12, dtype=torch.bool)
    torch.library.opcheck(OP, (q, k, v, keep, 0.25, True))
    with torch._subclasses.FakeTensorMode() as mode:
        fq, fk, fv, fm = (mode.from_tensor(t) for t in (q, k, v, keep))
        out = OP(fq, fk, fv[..., :8].contiguous(), fm, 0.25, True)
    assert out.shape == (2, 8, 1, 8) and out.dtype == torch.bfloat16


@pytest.mark.parametrize("case, message", [
    ("3d_q", "4-D tensors"),
    ("dtypes", "one floating dtype"),
    ("heads_without_gqa", "multiple of them with enable_gqa"),
    ("heads_not_multiple", "multiple of them with enable_gqa"),
    ("head_dims", "q's head dim"),
    ("int_mask", "bool or floating"),
    ("mask_shape", "must broadcast"),
])
def test_bad_arguments_raise_clear_errors(case, message):
    q, k, v = _qkv(2, 4, 4, 1, 10, 16)
    mask, gqa = None, False
    if case == "3d_q":
        q = q[0]
    elif case == "dtypes":
        k = k.double()
    elif case == "heads_without_gqa":
        k, v = k[:, :2], v[:, :2]
    elif case == "heads_not_multiple":
        k, v, gqa = k[:, :3], v[:, :3], True
    elif case == "head_dims":
        k = k[..., :8]
    elif case == "int_mask":
        mask = torch.ones(2, 1, 1, 10, dtype=torch.int32)
    else:
        mask = torch.ones(2, 1, 1, 11, dtype=torch.bool)
    with pytest.raises(ValueError, match=message):
        OP(q, k, v, mask, None, gqa)


def _decode_graphs(hkv: int, only_if):
    """(logits eager, logits compiled, swaps per graph) of a tiny Llama's static-cache decode with
    the pass run on each dynamo graph."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=hkv,
                      num_hidden_layers=2, vocab_size=128, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    swaps, ops = [], []

    def backend(gm, example_inputs):
        swaps.append(passes.swap_decode_attention(gm, only_if=only_if))
        ops.append([n for n in gm.graph.nodes if n.target is OP])
        return gm.forward

    torch._dynamo.reset()
    want, _ = static_cache_decode(model, cfg, model)
    got, _ = static_cache_decode(model, cfg, torch.compile(model, backend=backend, fullgraph=True))
    return want, got, swaps, ops


@pytest.mark.parametrize("hkv", [4, 2], ids=["mha", "gqa"])
def test_pass_swaps_each_layers_attention_in_a_llama_decode(hkv):
    """One decode_attention call a layer; with grouped heads it reads the cache itself (repeat_kv's
    expand and copy are gone, enable_gqa=True); the logits are those of the eager model."""
    want, got, swaps, ops = _decode_graphs(hkv, lambda q, k, v, m: q.shape[2] == 1)
    assert swaps and all(n == 2 for n in swaps)
    for call in ops[0]:
        q, k, v, mask, scale, gqa = call.args
        assert k.op == "placeholder" and v.op == "placeholder"  # the StaticCache's tensors
        assert gqa is (hkv != 4) and scale == 16 ** -0.5 and mask is not None
    masks = {call.args[3] for call in ops[0]}  # both layers read one fixed-strides copy of the mask
    assert len(masks) == 1 and masks.pop().target is FORCE_STRIDES
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_pass_leaves_cpu_graphs_by_default():
    """Without only_if the pass asks whether the CUDA kernel serves the tensors: not on the CPU."""
    want, got, swaps, _ = _decode_graphs(4, None)
    assert swaps and all(n == 0 for n in swaps)
    torch.testing.assert_close(got, want)


class _Attn(nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.kwargs = kwargs

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, **self.kwargs)


class _RepeatThenWrite(nn.Module):
    """repeat_kv, then an in-place write of the cache before the attention reads the copy."""

    def forward(self, q, cache):
        rep = cache[:, :, None, :, :].expand(1, 2, 2, 8, 16).reshape(1, 4, 8, 16)
        cache.mul_(2)
        return F.scaled_dot_product_attention(q, rep, rep)


@pytest.mark.parametrize("kwargs, swapped", [
    ({}, 1),
    ({"scale": 0.5}, 1),
    ({"dropout_p": 0.1}, 0),
    ({"is_causal": True}, 0),
])
def test_pass_takes_only_plain_attention(kwargs, swapped):
    q, k, v = _qkv(1, 4, 4, 1, 8, 16)
    gm = fx.symbolic_trace(_Attn(**kwargs))
    FakeTensorProp(gm).propagate(q, k, v)
    assert passes.swap_decode_attention(gm, only_if=lambda *a: True) == swapped
    if swapped:
        torch.testing.assert_close(gm(q, k, v), F.scaled_dot_product_attention(q, k, v, **kwargs))


def test_pass_keeps_repeat_kv_when_the_cache_is_written_in_between():
    gen = torch.Generator().manual_seed(3)
    q, cache = torch.randn(1, 4, 1, 16, generator=gen), torch.randn(1, 2, 8, 16, generator=gen)
    gm = fx.symbolic_trace(_RepeatThenWrite())
    FakeTensorProp(gm).propagate(q, cache.clone())
    assert passes.swap_decode_attention(gm, only_if=lambda *a: True) == 1
    call = next(n for n in gm.graph.nodes if n.target is OP)
    assert call.args[1].target == "reshape" and call.args[5] is False  # still the copy made before mul_
    want = _RepeatThenWrite()(q, cache.clone())
    torch.testing.assert_close(gm(q, cache.clone()), want)


class _TwoLayers(nn.Module):
    """Two attentions reading one mask; `write` changes the mask in place between them."""

    def __init__(self, write: bool):
        super().__init__()
        self.write = write

    def forward(self, q, k, v, mask):
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        if self.write:
            mask.mul_(2)
        return a + F.scaled_dot_product_attention(a, k, v, attn_mask=mask)


@pytest.mark.parametrize("write", [False, True])
def test_pass_shares_a_mask_unless_it_is_written_between(write):
    q, k, v = _qkv(2, 4, 4, 1, 8, 16)
    mask = torch.randn(1, 1, 1, 8).expand(2, 1, 1, 8)  # a broadcast view, as transformers' masks are
    gm = fx.symbolic_trace(_TwoLayers(write))
    FakeTensorProp(gm).propagate(q, k, v, mask.clone())
    assert passes.swap_decode_attention(gm, only_if=lambda *a: True) == 2
    masks = [n.args[3] for n in gm.graph.nodes if n.target is OP]
    if write:
        assert masks[0].op == "placeholder" and masks[1].op == "placeholder"
    else:
        assert masks[0] is masks[1] and masks[0].target is FORCE_STRIDES
    torch.testing.assert_close(gm(q, k, v, mask.clone()), _TwoLayers(write)(q, k, v, mask.clone()))


def test_inductor_makes_the_shared_mask_once(monkeypatch):
    """Through the backend with inductor (CPU; the pass told the kernel serves the tensors): every
    layer's decode_attention call reads one mask buffer, and the logits are the eager model's."""
    from torch._inductor.utils import run_and_get_code
    from transformers import LlamaConfig, LlamaForCausalLM

    from awq_compile import AWQConfig, _cuda

    monkeypatch.setattr(_cuda, "decode_attention_applies", lambda *a: True)
    awq_compile.backend.register()
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=3, vocab_size=128, max_position_embeddings=64)
    model = awq_compile.quantize_rtn(LlamaForCausalLM(cfg).eval(), AWQConfig(group_size=32))
    want, _ = static_cache_decode(model, cfg, model, steps=1)
    torch._dynamo.reset()
    step = torch.compile(model, backend="awq", fullgraph=True)
    (got, _), codes = run_and_get_code(lambda: static_cache_decode(model, cfg, step, steps=1))
    calls = re.findall(r"torch\.ops\.awq\.decode_attention\.default\((.*)\)", "\n".join(codes))
    assert len(calls) == cfg.num_hidden_layers
    masks = {re.findall(r"\b(?:buf|arg)\d+(?:_\d+)?\b", call)[-1] for call in calls}  # the last tensor argument
    assert len(masks) == 1, calls
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_max_rows():
    assert awq_compile.ops.DECODE_ATTENTION_MAX_ROWS == 8


def test_kernel_check_reads_symbolic_sizes_at_their_hints(monkeypatch):
    """decode_attention_applies on fake CUDA tensors with a symbolic batch (a dynamic-shape graph):
    the plan is asked at the size's hint, and no guard is installed; a size without a hint
    (unbacked) is refused."""
    from torch._dynamo.source import ConstantSource
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from awq_compile import _cuda

    asked = []
    monkeypatch.setattr(_cuda, "load_library", lambda: object())
    monkeypatch.setattr(_cuda, "_attention_rounds", lambda *a: asked.append(a[1:]) or 2)
    env = ShapeEnv()
    mode = FakeTensorMode(shape_env=env)
    b = env.create_symintnode(env.create_symbol(8, ConstantSource("batch")), hint=8)
    with mode:
        q = torch.empty(b, 32, 1, 128, dtype=torch.bfloat16, device="cuda")
        kv = torch.empty(b, 32, 384, 128, dtype=torch.bfloat16, device="cuda")
        assert _cuda.decode_attention_applies(q, kv, kv, None)
        u = env.create_unbacked_symint()
        assert not _cuda.decode_attention_applies(torch.empty(u, 32, 1, 128, dtype=torch.bfloat16, device="cuda"),
                                                  kv, kv, None)
    assert asked == [(8, 32, 32, 1, 384, 128)] and not env.guards

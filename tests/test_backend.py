"""The torch.compile backend "awq": options, calibration on dynamo graphs, serving, checkpoints.

Toy models cover graph breaks and errors in seconds; the real SmolLM2 (cut to 2 layers, tiny
search grids) covers inductor, dynamic shapes, generate and checkpoints; the whole 30-layer
model goes through the backend from an RTN checkpoint (no calibration needed).
"""

from __future__ import annotations

import copy
import importlib.metadata

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

import awq_compile
from awq_compile import AWQConfig, Int4Linear
from awq_compile.backend import VALID_OPTIONS, awq_backend, calibration, parse_options

pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # conftest: a clean torch.compile state

SEARCH = dict(n_grid=2, clip_grid=2, max_search_tokens=128, max_clip_tokens=32)
"""Tiny search grids: the tests compare the backend with quantize, not AWQ's quality."""


@pytest.fixture(scope="module", autouse=True)
def _awq_backend_registered():
    """backend="awq" also where the package runs from a checkout without its entry point (the
    GPU machine); a pip install registers it already."""
    from awq_compile.backend import register

    register()



class Block(nn.Module):
    def __init__(self, d: int, brk: bool = False) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)
        self.brk = brk

    def forward(self, x):
        h = F.gelu(self.up(self.norm(x)))
        if self.brk:
            torch._dynamo.graph_break()  # inside a submodule: a graph break in a nested frame
        return x + self.down(h)


class Toy(nn.Module):
    """Two blocks and a head; `brk` puts a graph break between the blocks ("top"), inside the
    second block ("nested"), or in a loop dynamo then runs eagerly ("loop")."""

    def __init__(self, brk: str | None = None, d: int = 128) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(d), Block(d, brk == "nested")])
        self.head = nn.Linear(d, 64)
        self.brk = brk

    def forward(self, x):
        if self.brk == "loop":
            for b in self.blocks:
                x = b(x)
                torch._dynamo.graph_break()
            return self.head(x)
        x = self.blocks[0](x)
        if self.brk == "top":
            torch._dynamo.graph_break()
        return self.head(self.blocks[1](x))


def _toy(brk=None):
    torch.manual_seed(0)
    return Toy(brk).eval()


def _batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(2, 16, 128, generator=g) for _ in range(2)]


def _calibrated(model, options, batches, call=lambda c, b: c(b)):
    compiled = torch.compile(model, backend="awq", options=options)
    with torch.no_grad(), calibration(compiled) as calib:
        for b in batches:
            call(compiled, b)
    return compiled, calib


# ----------------------------------------------------------------------------- options


def test_entry_point_registers_the_backend():
    eps = importlib.metadata.entry_points(group="torch_dynamo_backends")
    assert any(ep.name == "awq" and ep.value == "awq_compile.backend:awq_backend" for ep in eps)
    from torch._dynamo.backends.registry import lookup_backend

    assert lookup_backend("awq") is awq_backend


def test_options_accept_config_fields():
    opts = parse_options({"group_size": 64, "skip": ["lm_head", "head"], "inductor": False})
    assert opts.config == AWQConfig(group_size=64, skip=("lm_head", "head"))
    assert opts.inductor is False and opts.checkpoint is None
    assert parse_options({"config": {"group_size": 32}}).config.group_size == 32
    assert {"checkpoint", "inductor", "mode", "config", "group_size", "zero_point"} <= set(VALID_OPTIONS)
    assert parse_options({"mode": "reduce-overhead"}).mode == "reduce-overhead"


@pytest.mark.parametrize("flag, bad", [
    ("inductor", "yes"), ("fuse_siblings", "no"), ("fuse_activation", 1), ("defer_split_k", 1), ("fuse_rope", 1),
    ("fuse_norm", "yes"), ("decode_attention", 1), ("defer_counters", 0),
])
def test_boolean_options(flag, bad):
    """Every on/off option of the backend: listed, on by default, False turns it off, anything
    but a bool raises."""
    assert flag in VALID_OPTIONS
    assert getattr(parse_options(None), flag) is True and getattr(parse_options({}), flag) is True
    assert getattr(parse_options({flag: False}), flag) is False
    with pytest.raises(ValueError, match=rf"option {flag}={bad!r} must be True or False"):
        parse_options({flag: bad})


@pytest.mark.parametrize("options, match", [
    ({"grup_size": 64}, r"unknown option\(s\) \['grup_size'\]; valid options are \[.*'group_size'"),
    ({"group_size": 48}, r"invalid option: AWQConfig.group_size=48"),
    ({"inductor": "yes"}, r"inductor='yes' must be True or False"),
    ({"checkpoint": 3}, r"checkpoint=3 must be a path"),
    ({"checkpoint": "ck", "group_size": 64}, r"checkpoint takes its configuration from the checkpoint"),
    ({"config": AWQConfig(), "n_grid": 4}, r"either option config or AWQConfig fields"),
    ({"mode": "fast"}, r"mode='fast'; choose one of \['default', 'reduce-overhead'"),
])
def test_bad_options_raise(options, match):
    with pytest.raises(ValueError, match=match):
        parse_options(options)


def test_bad_option_through_torch_compile_lists_valid_ones():
    compiled = torch.compile(_toy(), backend="awq", options={"bogus": 1})
    with pytest.raises(Exception, match=r"unknown option\(s\) \['bogus'\]; valid options are"):
        compiled(torch.randn(1, 4, 128))
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['bogus'\]"):
        calibration(compiled)  # an OptimizedModule's options are checked up front


def test_calibration_refuses_another_backend():
    with pytest.raises(ValueError, match=r"compiled with backend='eager'; use .*backend='awq'"):
        calibration(torch.compile(_toy(), backend="eager"))
    with pytest.raises(TypeError, match=r"expected what torch.compile"):
        calibration(lambda x: x)


def test_call_before_calibration_says_how_to_calibrate():
    compiled = torch.compile(_toy(), backend="awq")
    with pytest.raises(Exception, match=r"have no INT4 weights yet\. Calibrate first"):
        compiled(torch.randn(1, 4, 128))


def test_no_calibration_data_raises():
    compiled = torch.compile(_toy(), backend="awq")
    with pytest.raises(RuntimeError, match=r"no calibration data reached a linear layer"):
        with calibration(compiled):
            pass


# ----------------------------------------------------------------------------- toy models


@pytest.mark.parametrize("brk", [None, "top", "nested"])
def test_graph_breaks_serve_what_quantize_returns(brk):
    model = _toy(brk)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = AWQConfig(group_size=64, **SEARCH)
    ref = awq_compile.quantize(model, _batches(), cfg)
    compiled, calib = _calibrated(model, {"group_size": 64, **SEARCH, "inductor": False}, _batches())
    assert counters["awq"]["calibration_graphs"] >= (1 if brk is None else 2)
    assert calib.stats["linears"] == 5
    with torch.no_grad():
        for t in (16, 7, 9):
            x = torch.randn(1, t, 128)
            torch.testing.assert_close(compiled(x), ref(x), rtol=0, atol=1e-6)
    assert counters["awq"]["quantize"] == 1
    # the user's model is untouched: float Linear layers, same tensors
    assert not any(isinstance(m, Int4Linear) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class SharedAcrossBreak(nn.Module):
    """One Linear called before and after a graph break, on two different inputs."""

    def __init__(self, d: int = 128) -> None:
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.shared = nn.Linear(d, d)

    def forward(self, x):
        y = self.shared(self.n1(x))
        torch._dynamo.graph_break()
        return self.shared(self.n2(y))


def test_weight_shared_across_graphs_is_quantized_once_unscaled():
    torch.manual_seed(0)
    model = SharedAcrossBreak().eval()
    cfg = AWQConfig(group_size=64, **SEARCH)
    ref = awq_compile.quantize(model, _batches(), cfg)  # one graph: the weight keeps s = 1
    compiled, calib = _calibrated(model, {"group_size": 64, **SEARCH, "inductor": False}, _batches())
    assert list(calib.plan.linears) == ["shared"]
    with torch.no_grad():
        x = torch.randn(1, 5, 128)
        torch.testing.assert_close(compiled(x), ref(x), rtol=0, atol=1e-6)


def test_linears_run_outside_graphs_are_reported():
    model = _toy("loop")  # dynamo runs the frame after a break in a loop eagerly
    with pytest.warns(UserWarning, match=r"never ran inside a compiled graph .*stay in floating point"):
        _calibrated(model, {"group_size": 64, **SEARCH, "inductor": False}, _batches())


def test_recalibration_replaces_the_plan():
    model = _toy()
    opts = {"group_size": 64, **SEARCH, "inductor": False}
    compiled, first = _calibrated(model, opts, _batches())
    with torch.no_grad(), calibration(compiled) as second:
        compiled(torch.randn(2, 16, 128) * 3)
    assert counters["awq"]["quantize"] == 2
    assert second.plan is not first.plan
    q = second.quantized_model()
    with torch.no_grad():
        x = torch.randn(1, 8, 128)
        torch.testing.assert_close(compiled(x), q(x), rtol=0, atol=1e-6)


class Pre(nn.Module):
    """A float parameter that requires grad upstream of every INT4 layer."""

    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Parameter(torch.ones(128))
        self.toy = _toy()

    def forward(self, x):
        return self.toy(x * self.pre)


def test_serving_under_grad_mode_is_inference_only():
    model = Pre().eval()
    ref = awq_compile.quantize(model, _batches(), AWQConfig(group_size=64, **SEARCH))
    compiled, _ = _calibrated(model, {"group_size": 64, **SEARCH}, _batches())  # inductor
    x = torch.randn(1, 8, 128)
    y = compiled(x)  # grad mode on: no backward graph is traced through the INT4 op
    assert not y.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(y, ref(x), rtol=1e-5, atol=1e-5)


def test_awq_ops_get_fallback_lowerings_before_inductor_meets_them(monkeypatch):
    """The backend registers inductor's fallback lowering for every awq op in the graph before
    compile_fx, with the layout constraint inductor's implicit fallback would give: inductor's
    implicit path formats the op's first node's IR arguments (eagerly on torch 2.11, where a
    7B batch-1 graph's final norm op made that exponential), so it must not run for them. The
    ops' lowerings are removed first, as in a fresh process; the output matches quantize's."""
    import logging

    from torch._inductor import lowering
    from torch._library.utils import get_layout_constraint_tag

    from awq_compile.ops import OP_NAMES

    for op in [k for k in lowering.lowerings if isinstance(k, torch._ops.OpOverload) and k.namespace == "awq"]:
        monkeypatch.delitem(lowering.lowerings, op)
    monkeypatch.setattr(torch._inductor.config, "fx_graph_cache", False)  # a cache hit lowers nothing
    model = _toy()
    ref = awq_compile.quantize(model, _batches(), AWQConfig(group_size=64, **SEARCH))
    records = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: records.append(record.getMessage())
    graph_log = logging.getLogger("torch._inductor.graph")
    monkeypatch.setattr(graph_log, "level", logging.INFO)
    graph_log.addHandler(handler)
    try:
        compiled, _ = _calibrated(model, {"group_size": 64, **SEARCH}, _batches())  # inductor
        with torch.no_grad():
            x = torch.randn(1, 8, 128)
            torch.testing.assert_close(compiled(x), ref(x), rtol=1e-5, atol=1e-5)
    finally:
        graph_log.removeHandler(handler)
    assert counters["awq"]["serve_graphs"] >= 1
    fallbacks = [m for m in records if "implicit fallback" in m]
    assert not [m for m in fallbacks if "awq." in m], fallbacks
    served = [k for k in lowering.lowerings if isinstance(k, torch._ops.OpOverload) and k.namespace == "awq"]
    assert sorted(op.name() for op in served) == sorted(f"awq::{name}" for name in OP_NAMES)
    assert sorted(OP_NAMES) == sorted(n[5:] for n in torch._C._dispatch_get_all_op_names() if n.startswith("awq::"))
    for op in served:
        want = lowering.tag_to_layout_constraint(get_layout_constraint_tag(op, with_default=True))
        assert lowering._maybe_layout_constraints[op] is want


def test_graph_left_in_dynamos_cache_still_serves_int4(monkeypatch):
    """Should dropping dynamo's cache fail, a calibration graph called later serves INT4."""
    model = _toy()
    ref = awq_compile.quantize(model, _batches(), AWQConfig(group_size=64, **SEARCH))
    monkeypatch.setattr(torch._dynamo, "reset_code", lambda code: None)
    compiled, _ = _calibrated(model, {"group_size": 64, **SEARCH, "inductor": False}, _batches())
    with torch.no_grad():
        x = _batches()[0]  # the calibration shape: dynamo's cached calibration graph runs
        torch.testing.assert_close(compiled(x), ref(x), rtol=0, atol=1e-6)
    assert counters["awq"]["calibration_graphs"] == 1 and counters["stats"]["unique_graphs"] == 1
    assert counters["awq"]["serve_graphs"] == 1  # served by the cached graph, not a recompile


# ----------------------------------------------------------------------------- the real model


def _cut(model: nn.Module, n_layers: int) -> nn.Module:
    m = copy.deepcopy(model).eval()
    m.model.layers = m.model.layers[:n_layers]
    m.config.num_hidden_layers = n_layers
    return m


@pytest.fixture(scope="module")
def real(smollm2):
    """SmolLM2 cut to 2 layers, quantized by `quantize` and calibrated through the backend on
    the same 4 x 128 tokens (use_cache=False: the graph `quantize` captures)."""
    from types import SimpleNamespace

    from awq_compile.calib import calibration_text, sample_calibration

    model, tok = smollm2
    m = _cut(model, 2)
    ids = sample_calibration(tok, calibration_text(), 4, 128)
    ref = awq_compile.quantize(m, ids, AWQConfig(group_size=64, **SEARCH))
    compiled, calib = _calibrated(m, {"group_size": 64, **SEARCH}, [ids],
                                  call=lambda c, b: c(b, use_cache=False))
    return SimpleNamespace(model=m, tok=tok, ids=ids, ref=ref, compiled=compiled, calib=calib)


@pytest.mark.slow
def test_real_model_through_inductor_matches_quantize_without_recompiles(real):
    assert real.calib.stats["linears"] == 14
    assert not any(isinstance(m, Int4Linear) for m in real.model.modules())
    with torch.no_grad():
        for i, t in enumerate((20, 33, 47, 61)):
            x = real.ids[:1, :t].clone()
            if i == 0:
                torch._dynamo.maybe_mark_dynamic(x, 1)
            y = real.compiled(x, use_cache=False).logits
            # same INT4 weights; inductor's fused float ops differ from eager by rounding only
            torch.testing.assert_close(y, real.ref(x, use_cache=False).logits, rtol=1e-4, atol=2e-3)
            if i == 0:
                graphs = dict(counters["awq"]), counters["stats"]["unique_graphs"]
    assert graphs[0]["serve_graphs"] == 1 and graphs[0]["linears_swapped"] == 14
    # three more sequence lengths: no recompile, no re-quantization
    assert (dict(counters["awq"]), counters["stats"]["unique_graphs"]) == graphs
    assert counters["awq"]["quantize"] == 0


@pytest.mark.slow
def test_real_model_generate_greedy(real):
    m = real.model
    m.forward = torch.compile(m.forward, backend="awq", options={"inductor": False})
    try:
        prompt = real.tok("The capital of France is", return_tensors="pt")
        out = m.generate(**prompt, max_new_tokens=8, do_sample=False)
    finally:
        del m.forward
    want = real.ref.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == prompt.input_ids.shape[1] + 8
    assert torch.equal(out, want)
    assert counters["awq"]["serve_graphs"] >= 2 and counters["awq"]["quantize"] == 0


@pytest.mark.slow
def test_real_model_checkpoints_serve_without_calibration(real, smollm2, tmp_path):
    from awq_compile.checkpoint import save_quantized

    real.calib.save(tmp_path / "flow1", real.tok)
    save_quantized(real.ref, tmp_path / "quantize")
    x = real.ids[:1, :40]
    with torch.no_grad():
        want = real.ref(x, use_cache=False).logits
        for name in ("flow1", "quantize"):
            fresh = _cut(smollm2[0], 2)
            compiled = torch.compile(fresh, backend="awq",
                                     options={"checkpoint": str(tmp_path / name), "inductor": False})
            torch.testing.assert_close(compiled(x, use_cache=False).logits, want, rtol=0, atol=1e-5)
        assert counters["awq"]["quantize"] == 0 and counters["awq"]["linears_swapped"] == 28
        wrong = torch.compile(_cut(smollm2[0], 3), backend="awq",
                              options={"checkpoint": str(tmp_path / "flow1"), "inductor": False})
        with pytest.raises(Exception, match=r"has no tensor for model\.layers\.2\..*does it match"):
            wrong(x, use_cache=False)


@pytest.mark.slow
def test_full_real_model_serves_an_rtn_checkpoint(smollm2, tmp_path):
    from awq_compile.checkpoint import save_quantized

    model, tok = smollm2
    rtn = awq_compile.quantize_rtn(model, AWQConfig(group_size=64))
    save_quantized(rtn, tmp_path / "rtn")
    compiled = torch.compile(model, backend="awq",
                             options={"checkpoint": str(tmp_path / "rtn"), "inductor": False})
    x = tok("INT4 weights, float activations.", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(compiled(x).logits, rtn(x).logits, rtol=0, atol=1e-4)
    assert counters["awq"]["linears_swapped"] == 30 * 7
    assert not any(isinstance(m, Int4Linear) for m in model.modules())


# ----------------------------------------------------------------------------- the GPU


SMOLLM2_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                     num_key_value_heads=3, head_dim=64, num_hidden_layers=30, vocab_size=49152,
                     tie_word_embeddings=True, max_position_embeddings=8192, rms_norm_eps=1e-5)
"""SmolLM2-135M's architecture: the GPU machine has no copy of its weights, random ones serve."""


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_reduce_overhead_real_architecture():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_SHAPE)).to("cuda", torch.float16).eval()
    ids = torch.randint(0, SMOLLM2_SHAPE["vocab_size"], (4, 128), device="cuda")
    ref = awq_compile.quantize(model, ids, AWQConfig(group_size=64, **SEARCH))
    compiled = torch.compile(model, backend="awq",
                             options={"mode": "reduce-overhead", "group_size": 64, **SEARCH})
    with torch.no_grad():
        with calibration(compiled) as calib:
            compiled(ids, use_cache=False)
        assert calib.stats["linears"] == 30 * 7
        for i, t in enumerate((20, 33, 47, 61)):
            x = ids[:1, :t].clone()
            if i == 0:
                torch._dynamo.maybe_mark_dynamic(x, 1)
            for _ in range(3):  # CUDA graphs: warm-up, record, replay
                y = compiled(x, use_cache=False).logits.float().clone()
            want = ref(x, use_cache=False).logits.float()
            rel = ((y - want).norm() / want.norm()).item()
            assert rel < 2e-2, f"seq {t}: relative error {rel:.2e} against quantize"
            if i == 0:
                graphs = dict(counters["awq"]), counters["stats"]["unique_graphs"]
    assert graphs[0]["linears_swapped"] == 30 * 7
    assert graphs[0]["mlps_fused"] == 30  # int4_linear_glu; at M > 8 the two linears, then the product
    assert (dict(counters["awq"]), counters["stats"]["unique_graphs"]) == graphs  # no recompile
    assert counters["inductor"]["cudagraph_skips"] == 0  # CUDA graphs ran, nothing fell back

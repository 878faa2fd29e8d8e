"""The FX passes, one by one, on small models: which groups and absorbers the dataflow gives,
that folding keeps the function (float64), observers' statistics, and the INT4 swap."""

import pytest
import torch
from torch import nn

from awq_compile import AWQConfig, quantize
from awq_compile import passes as P
from awq_compile.api import capture
from awq_compile.passes._graph import fetch_attr, iter_linears

aten = torch.ops.aten


def tiny_llama(dtype=torch.float64, layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                      tie_word_embeddings=True)
    m = LlamaForCausalLM(cfg).to(dtype).eval()
    with torch.no_grad():  # non-trivial norm weights, so a wrong fold shows
        for name, p in m.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return m


def _ids(n=2, t=12):
    return torch.randint(0, 128, (n, t), generator=torch.Generator().manual_seed(1))


def _random_scales(gm):
    gen = torch.Generator().manual_seed(3)
    for g in P.scale_groups(gm):
        size = g.absorber.size or g.in_features
        s = torch.rand(size, generator=gen, dtype=torch.float64) * 3 + 0.25
        P.annotate_scale_groups.__globals__["set_group"](gm, g.__class__(**{**g.__dict__, "scale": s}))


def test_llama_groups_from_dataflow():
    gm = capture(tiny_llama(), ((_ids(),), {}))
    P.annotate_scale_groups(gm, skip=("lm_head",))
    groups = P.scale_groups(gm)
    assert len(groups) == 8  # qkv, o, gate/up, down per layer
    q, o, up, down = groups[:4]
    assert [n.rsplit(".", 2)[-2] for n in q.linears] == ["q_proj", "k_proj", "v_proj"]
    assert [t.name for t in q.absorber.targets] == ["model.layers.0.input_layernorm.weight"]
    assert [t.name for t in up.absorber.targets] == ["model.layers.0.post_attention_layernorm.weight"]
    assert [t.name for t in down.absorber.targets] == ["model.layers.0.mlp.up_proj.weight"]
    # o_proj reads v_proj's 2 kv heads x 16 through grouped-query attention (4 heads)
    assert o.absorber.targets[0].name == "model.layers.0.self_attn.v_proj.weight"
    assert o.absorber.size == 32
    assert o.absorber.channel_map == tuple(list(range(16)) * 2 + list(range(16, 32)) * 2)
    # the error of q/k/v is measured after attention and o_proj, gate/up's after down_proj
    by_name = {n.name: n for n in gm.graph.nodes}
    def out_weight(g):
        return [str(by_name[o].args[1].target) for o in g.region.outputs]
    assert out_weight(q) == ["model.layers.0.self_attn.o_proj.weight"]
    assert out_weight(up) == ["model.layers.0.mlp.down_proj.weight"]
    assert o.region is None and down.region is None  # their own outputs: the direct loss
    assert q.region.inputs[0] == q.input  # plus rotary tables / mask recorded at calibration
    clip = {i.weight.rsplit(".", 2)[-2]: i.clip for _, i in P.linear_infos(gm)}
    assert clip == {"q_proj": False, "k_proj": False, "v_proj": True, "o_proj": True,
                    "gate_proj": True, "up_proj": True, "down_proj": True}


@pytest.mark.parametrize("dynamic", [False, True])
def test_fold_scales_keeps_the_function(dynamic):
    model = tiny_llama()
    ids = _ids()
    ref = model(ids).logits
    gm = capture(model, ((ids,), {}), dynamic=dynamic)
    P.annotate_scale_groups(gm, skip=("lm_head",))
    _random_scales(gm)
    assert P.fold_scales(gm) == 0  # every group absorbed upstream: no mul inserted
    out = gm(ids, use_cache=False).logits
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    # and the weights really changed
    name = "model.layers.0.input_layernorm.weight"
    assert not torch.equal(fetch_attr(gm, name), fetch_attr(model, name))


class GeluMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(32)
        self.fc1 = nn.Linear(32, 48)
        self.fc2 = nn.Linear(48, 32)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(self.ln(x))))


class OnePlusNorm(nn.Module):
    """A Gemma-style `(1 + w)` RMS norm in front of a linear."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(32) * 0.3)
        self.fc = nn.Linear(32, 16)

    def forward(self, x):
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.fc(h * (1.0 + self.w))


@pytest.mark.parametrize("cls,kinds,inserted", [
    (GeluMLP, ["params", "mul"], 1),
    (OnePlusNorm, ["params"], 0),
])
def test_absorbers_and_explicit_mul(cls, kinds, inserted):
    torch.manual_seed(0)
    model = cls().double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(3, 5, 32, dtype=torch.float64)
    ref = model(x)
    gm = capture(model, ((x,), {}))
    P.annotate_scale_groups(gm)
    assert [g.absorber.kind for g in P.scale_groups(gm)] == kinds
    _random_scales(gm)
    assert P.fold_scales(gm) == inserted
    torch.testing.assert_close(gm(x), ref, rtol=1e-9, atol=1e-9)
    muls = [n for n in gm.graph.nodes if n.op == "get_attr" and "awq_inv_scale" in str(n.target)]
    assert len(muls) == inserted


def test_layernorm_absorbs_weight_and_bias():
    gm = capture(GeluMLP().eval(), ((torch.randn(2, 32),), {}))
    P.annotate_scale_groups(gm)
    assert [t.name for t in P.scale_groups(gm)[0].absorber.targets] == ["ln.weight", "ln.bias"]


def test_observers_statistics_and_budget():
    model = GeluMLP().eval()
    xs = [torch.randn(4, 8, 32) for _ in range(3)]
    gm = capture(model, ((xs[0],), {}))
    P.annotate_scale_groups(gm)
    obs = P.insert_observers(gm, max_tokens=20, n_batches=3, seed=0)
    def observer_nodes():
        return [n for n in gm.graph.nodes if str(n.target).startswith("awq_observer_")]

    # one observer per group, one recorder for the fc1 group's region input (fc1 -> gelu -> fc2)
    assert sorted(str(n.target) for n in observer_nodes()) == [
        "awq_observer_0", "awq_observer_1", "awq_observer_rec_layer_norm"]
    for x in xs:
        gm(x)
    ln_out = torch.cat([model.ln(x).reshape(-1, 32) for x in xs])
    torch.testing.assert_close(obs[0].x_mean, ln_out.abs().mean(0), rtol=1e-5, atol=1e-6)
    assert obs[0].x_sample.shape == (20, 32)  # ceil(20/3)=7 per batch, capped at 20
    assert P.remove_observers(gm) == 3
    assert not observer_nodes()


def test_observer_rejects_nan():
    model = GeluMLP().eval()
    x = torch.randn(2, 32)
    gm = capture(model, ((x,), {}))
    P.annotate_scale_groups(gm)
    P.insert_observers(gm)
    with pytest.raises(ValueError, match=r"NaN/Inf activations at the input of \['fc1.weight'\]"):
        gm(torch.full((2, 32), float("nan")))


def test_swap_linear_int4_graph():
    model = tiny_llama(torch.float32)
    ids = _ids()
    gm = quantize(model, ids, AWQConfig(group_size=32, n_grid=4, clip_grid=4), output="graph")
    lin = [n for n in gm.graph.nodes if n.target is aten.linear.default]
    int4 = [n for n in gm.graph.nodes if n.target is torch.ops.awq.int4_linear.default]
    assert len(int4) == 14 and len(lin) == 1  # lm_head is skipped by default
    assert not hasattr(gm.get_submodule("model.layers.0.self_attn.q_proj"), "weight")  # float weight dropped
    ref = model(ids).logits
    out = gm(ids, use_cache=False).logits
    assert ((out - ref).norm() / ref.norm()).item() < 0.1


def test_quantize_module_matches_graph_and_leaves_model_alone():
    model = tiny_llama(torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = _ids()
    cfg = AWQConfig(group_size=32, n_grid=4, clip_grid=4)
    qm = quantize(model, ids, cfg)
    gm = quantize(model, ids, cfg, output="graph")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    torch.testing.assert_close(qm(ids).logits, gm(ids, use_cache=False).logits, rtol=0, atol=1e-5)
    assert type(qm.model.layers[1].mlp.down_proj).__name__ == "Int4Linear"
    assert qm.awq_config == cfg


def test_pipeline_order_is_one_list():
    assert P.PIPELINE == ("annotate_scale_groups", "insert_observers", "calibrate",
                          "remove_observers", "search_scales", "fold_scales", "search_clip",
                          "swap_linear_int4")


def test_linear_called_twice_keeps_unit_scale():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = nn.LayerNorm(32)
            self.fc = nn.Linear(32, 32)

        def forward(self, x):
            return self.fc(torch.relu(self.fc(self.ln(x))))

    gm = capture(Twice().eval(), ((torch.randn(2, 32),), {}))
    P.annotate_scale_groups(gm)
    assert [g.searchable for g in P.scale_groups(gm)] == [False, False]
    assert len(list(iter_linears(gm))) == 2


def test_streaming_runner_gives_the_same_plan():
    """device= streams weights through an interpreter; on one device it must change nothing."""
    model = tiny_llama(torch.float32)
    ids = _ids()
    cfg = AWQConfig(group_size=32, n_grid=4, clip_grid=4)
    direct = quantize(model, ids, cfg)
    streamed = quantize(model, ids, cfg, device="cpu", stream=True)
    for (k, a), (_, b) in zip(direct.state_dict().items(), streamed.state_dict().items()):
        assert torch.equal(a, b), k


def test_streaming_runner_moves_weights_only_for_the_op_that_reads_them(monkeypatch):
    """An unlifted export graph reads every parameter at its top: moving weights there would put
    the whole model on the device at once. The runner must move them as op arguments only."""
    from awq_compile.api import _calibrate, _StreamingRunner, prepare_batches

    model = tiny_llama(torch.float32)
    batches = prepare_batches(_ids(), 8, torch.device("cpu"))
    gm = capture(model, batches[0])
    params = {id(t) for t in list(gm.parameters()) + list(gm.buffers())}
    seen = []

    class Spy(_StreamingRunner):
        def run_node(self, n):
            self.op = n.op
            return super().run_node(n)

        def _move(self, v):
            if isinstance(v, torch.Tensor) and id(v) in params:
                seen.append(self.op)
            return super()._move(v)

    monkeypatch.setattr("awq_compile.api._StreamingRunner", Spy)
    _calibrate(gm, batches, progress=False, stream_to=torch.device("cpu"))
    assert seen and set(seen) <= {"call_function", "call_method"}, set(seen)

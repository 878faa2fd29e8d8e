"""awq_compile.export: torch.export of INT4 models, dynamic sequence length, save/load."""

import subprocess
import sys

import pytest
import torch
from torch import nn

from awq_compile import AWQConfig, Int4Linear
from awq_compile.export import config_of, export, int4_nodes
from awq_compile.quant import quantize as quantize_weight


def rtn_int4(model: nn.Module, group_size: int = 32, zero_point: bool = True,
             skip=("lm_head",)) -> nn.Module:
    """Replace the nn.Linear modules (outside `skip`) by round-to-nearest Int4Linear, in place."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Linear) and name not in skip:
            qw = quantize_weight(child.weight, group_size, zero_point, torch.float16)
            setattr(model, name, Int4Linear.from_quantized(qw, group_size, child.bias))
        else:
            rtn_int4(child, group_size, zero_point, skip)
    model.awq_config = AWQConfig(group_size=group_size, zero_point=zero_point)
    return model


def tiny_llama(zero_point: bool = True, quantized: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    model = LlamaForCausalLM(cfg).eval()
    return rtn_int4(model, 32, zero_point) if quantized else model


def ids(t: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (1, t), generator=torch.Generator().manual_seed(seed))


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids, use_cache=False).logits


@pytest.fixture(scope="module")
def llama_program():
    model = tiny_llama()
    return model, export(model, (ids(7),))


def test_export_has_one_op_per_int4_linear(llama_program):
    model, ep = llama_program
    n_int4 = sum(isinstance(m, Int4Linear) for m in model.modules())
    assert n_int4 == 14  # 7 linears x 2 layers; lm_head stays float
    assert len(int4_nodes(ep)) == n_int4
    linears = [n for n in ep.graph.nodes if n.target == torch.ops.aten.linear.default]
    assert len(linears) == 1  # lm_head


@pytest.mark.parametrize("t", [1, 7, 13, 300])
def test_dynamic_sequence_length_matches_eager(llama_program, t):
    model, ep = llama_program
    x = ids(t, seed=t)
    with torch.no_grad():
        got = ep.module()(x)
    torch.testing.assert_close(got, logits(model, x), atol=1e-5, rtol=1e-5)


def test_config_travels_in_the_program(llama_program):
    model, ep = llama_program
    assert config_of(ep) == model.awq_config


def test_save_load_round_trip(llama_program, tmp_path):
    model, ep = llama_program
    path = tmp_path / "llama.pt2"
    torch.export.save(ep, path)
    loaded = torch.export.load(path)
    assert config_of(loaded) == model.awq_config
    assert len(int4_nodes(loaded)) == 14
    x = ids(21, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module()(x), logits(model, x), atol=1e-5, rtol=1e-5)


def test_load_without_awq_compile_says_what_to_import(llama_program, tmp_path):
    _, ep = llama_program
    path = tmp_path / "llama.pt2"
    torch.export.save(ep, path)
    code = f"import torch; torch.export.load({str(path)!r})"  # awq_compile never imported
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "awq.int4_linear" in proc.stderr
    assert "import awq_compile" in proc.stderr


def test_plain_module_static_and_dynamic():
    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = nn.Linear(80, 64), nn.Linear(64, 40, bias=False)

        def forward(self, x):
            return self.down(torch.relu(self.up(x)))

    torch.manual_seed(0)
    model = rtn_int4(MLP().eval())
    ep = export(model, (torch.randn(2, 5, 80),))
    x = torch.randn(2, 9, 80)
    torch.testing.assert_close(ep.module()(x), model(x), atol=1e-6, rtol=1e-6)
    static = export(model, (torch.randn(2, 5, 80),), seq_dim=None)
    with pytest.raises(AssertionError, match=r"x.size\(\)\[1\] == 5"):
        static.module()(x)


def test_export_quantizes_with_calibration():
    model = tiny_llama(quantized=False)
    config = AWQConfig(group_size=32, n_grid=2, clip_grid=2)
    ep = export(model, (ids(8),), calibration=torch.randint(0, 128, (2, 16)), config=config)
    assert len(int4_nodes(ep)) == 14
    assert config_of(ep) == config
    assert not any(isinstance(m, Int4Linear) for m in model.modules())  # the input is untouched


def test_export_refuses_a_float_model():
    with pytest.raises(ValueError, match="no Int4Linear layers; quantize it first"):
        export(tiny_llama(quantized=False), (ids(4),))
    with pytest.raises(ValueError, match="without calibration"):
        export(tiny_llama(quantized=False), (ids(4),), config=AWQConfig())


def test_export_a_quantized_graph_module():
    """quantize(output="graph") gives a GraphModule calling the op directly (no Int4Linear);
    export reuses the keyword arguments of its capture (use_cache=False)."""
    from awq_compile import quantize

    config = AWQConfig(group_size=32, n_grid=2, clip_grid=2)
    gm = quantize(tiny_llama(quantized=False), torch.randint(0, 128, (2, 16)), config,
                  output="graph")
    ep = export(gm, (ids(7),))
    assert len(int4_nodes(ep)) == 14 and config_of(ep) == config
    x = ids(19, seed=4)
    with torch.no_grad():
        got, ref = ep.module()(x, use_cache=False).logits, gm(x, use_cache=False).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)

"""Determinism: the same model, calibration and config give bit-identical packed weights on the
CPU, run after run: in one process (whatever the global RNG state), in a fresh process with one
thread, for output="module" and output="graph", and down to the checkpoint's tensor bytes.

The scale search samples calibration rows from a generator seeded by `AWQConfig.seed` (never the
global RNG), and every reduction runs in a fixed order on the CPU; these tests pin both.
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
import textwrap

import torch
import torch.nn.functional as F
from torch import nn

from awq_compile import AWQConfig, quantize

CONFIG = AWQConfig(group_size=32, n_grid=8, clip_grid=8, max_search_tokens=48, max_clip_tokens=24)
"""max_search_tokens < the 96 calibration tokens: the seeded row sampling is exercised."""


class Block(nn.Module):
    """Norm -> gated MLP (nn.Linear) -> functional F.linear head, with K = 40 (a padded group)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.norm = nn.LayerNorm(40)
        self.gate, self.up = nn.Linear(40, 64), nn.Linear(40, 64, bias=False)
        self.down = nn.Linear(64, 40)
        self.head = nn.Parameter(torch.randn(24, 40) * 0.2)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)

    def forward(self, x):
        h = self.norm(x)
        return F.linear(x + self.down(F.silu(self.gate(h)) * self.up(h)), self.head)


def _calibration() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    scale = torch.ones(40)
    scale[::7] = 25.0  # outlier channels, so the searched scales are far from 1
    return [torch.randn(2, 8, 40, generator=gen) * scale for _ in range(6)]


def digest(module: nn.Module) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes), in name order."""
    h = hashlib.sha256()
    state = dict(module.named_parameters())
    state.update(dict(module.named_buffers()))
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _packed(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in module.named_buffers() if k.endswith(("qweight", "scales", "zeros"))}


def test_two_runs_in_one_process_are_bit_identical():
    model, calib = Block(), _calibration()
    gm1 = quantize(model, calib, CONFIG, output="graph")
    torch.manual_seed(12345)  # the global RNG must not matter
    random.seed(1)
    torch.rand(100)
    gm2 = quantize(model, calib, CONFIG, output="graph")
    packed = _packed(gm1)
    assert len(packed) == 4 * 3  # gate, up, down, head
    assert digest(gm1) == digest(gm2)
    for k, v in packed.items():
        assert torch.equal(v, _packed(gm2)[k]) and v.dtype == _packed(gm2)[k].dtype


def test_module_output_is_deterministic_and_matches_the_graph_plan():
    class NoHead(Block):
        def forward(self, x):
            h = self.norm(x)
            return x + self.down(F.silu(self.gate(h)) * self.up(h))

    model, calib = NoHead(), _calibration()
    q1, q2 = quantize(model, calib, CONFIG), quantize(model, calib, CONFIG)
    assert digest(q1) == digest(q2)
    gm = quantize(model, calib, CONFIG, output="graph")
    for name in ("gate", "up", "down"):  # module and graph quantize the same folded weights
        for leaf in ("qweight", "scales", "zeros"):
            assert torch.equal(getattr(getattr(q1, name), leaf), gm.get_buffer(f"{name}.{leaf}"))


def test_seed_is_the_only_source_of_randomness():
    model, calib = Block(), _calibration()
    same = quantize(model, calib, CONFIG, output="graph")
    other = quantize(model, calib, AWQConfig(**{**CONFIG.to_dict(), "seed": 1}), output="graph")
    assert digest(same) == digest(quantize(model, calib, CONFIG, output="graph"))
    assert digest(other) != digest(same)  # the row sample changed, so the search saw other rows


_CHILD = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(int(sys.argv[1]))
    sys.path.insert(0, sys.argv[2])
    import test_determinism as T
    from awq_compile import quantize
    print(T.digest(quantize(T.Block(), T._calibration(), T.CONFIG, output="graph")))
""")


def test_a_fresh_process_with_one_thread_agrees():
    """This process runs with torch's default thread count (one per core), the child with 1."""
    here = os.path.dirname(os.path.abspath(__file__))
    mine = digest(quantize(Block(), _calibration(), CONFIG, output="graph"))
    out = subprocess.run([sys.executable, "-c", _CHILD, "1", here], check=True,
                         capture_output=True, text=True, timeout=300)
    assert out.stdout.strip().splitlines()[-1] == mine


def test_checkpoint_files_are_byte_identical(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from awq_compile.checkpoint import save_quantized

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(1))
    for run in ("a", "b"):
        save_quantized(quantize(model, ids, CONFIG, batch_size=2), tmp_path / run)
    a, b = (tmp_path / run for run in ("a", "b"))
    assert (a / "config.json").read_bytes() == (b / "config.json").read_bytes()
    # The safetensors header is compared parsed: safetensors writes its __metadata__ map in
    # hash order, which changes from one save to the next (F20); every tensor byte must match.
    header_a, data_a = _safetensors_parts(a / "model.safetensors")
    header_b, data_b = _safetensors_parts(b / "model.safetensors")
    assert header_a == header_b and data_a == data_b


def _safetensors_parts(path) -> tuple[dict, bytes]:
    """(parsed JSON header, raw tensor bytes) of a safetensors file."""
    import json
    import struct

    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]

"""quantize(..., device="cuda") on a model kept on the CPU holds about one layer on the GPU.

Needs a CUDA GPU; skipped otherwise. The model is weight-heavy and activation-light (8 layers of
4 MiB, 16 calibration tokens), so the peak is dominated by the weights the pipeline holds.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from awq_compile import AWQConfig, quantize

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_streamed_quantization_peak_is_about_one_layer():
    torch.manual_seed(0)
    layers = [m for _ in range(8) for m in (nn.Linear(1024, 1024), nn.ReLU())]
    model = nn.Sequential(*layers).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    x = torch.randn(2, 8, 1024)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    q = quantize(model, [x], AWQConfig(group_size=128), device="cuda")
    peak = torch.cuda.max_memory_allocated() - base
    assert next(q.parameters(), next(q.buffers())).device.type == "cpu"
    # one 4 MiB layer and its float32 working copies in the search, never the 32 MiB model
    assert peak < weight_bytes / 2, f"peak {peak / 2**20:.1f} MiB for {weight_bytes / 2**20:.0f} MiB of weights"
    ref = model(x)
    assert ((q(x) - ref).norm() / ref.norm()).item() < 0.05

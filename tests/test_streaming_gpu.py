"""quantize(..., device="cuda") on a model kept on the CPU holds about one layer on the GPU.

Needs a CUDA GPU; skipped otherwise. The model is weight-heavy and activation-light (96 layers of
4 MiB, 16 calibration tokens), so the peak is what the pipeline holds of the weights: one
layer's float32 working copies in the searches (17-25 layers' worth: 98 MiB here on an H100,
3.0 GiB for Llama-2-7B's 180 MB fp32 down_proj), never the 384 MiB model. cuBLAS's workspace is
allocated before the baseline is taken.
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
    layers = []
    for _ in range(96):
        lin = nn.Linear(1024, 1024)
        nn.init.normal_(lin.weight, std=(2 / 1024) ** 0.5)  # keeps the activations' scale
        layers += [lin, nn.ReLU()]
    model = nn.Sequential(*layers).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    layer_bytes = weight_bytes / 96
    x = torch.randn(2, 8, 1024)
    a = torch.randn(64, 1024, device="cuda")
    (a @ a.T).sum().item()  # cuBLAS handle and workspace, outside the measurement
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    q = quantize(model, [x], AWQConfig(group_size=128, n_grid=4, clip_grid=4), device="cuda")
    peak = torch.cuda.max_memory_allocated() - base
    print(f"streamed quantization: peak {peak / 2**20:.1f} MiB of GPU memory, weights {weight_bytes / 2**20:.0f} MiB")
    assert next(q.buffers()).device.type == "cpu"
    assert peak < 32 * layer_bytes, f"peak {peak / 2**20:.1f} MiB for {weight_bytes / 2**20:.0f} MiB of weights"
    assert torch.isfinite(q(x)).all()

"""CPU-machine checks of the CUDA kernels: the sources compile with nvcc for sm_90a and sm_80, and
the package imports and runs without the library.

Compiling all of csrc/ for both targets takes about 15-30 s on 2 cores (no CUTLASS kernel yet).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from awq_compile import build_kernels


@pytest.mark.skipif(build_kernels.find_nvcc() is None, reason="nvcc not installed")
@pytest.mark.parametrize("arch", ["90a", "80"])
def test_sources_compile(tmp_path, arch):
    objs = build_kernels.compile_objects(tmp_path, archs=(arch,), jobs=2)
    assert [o.name for o in objs] == [s.replace(".cu", ".o") for s in build_kernels.SOURCES]
    assert all(o.stat().st_size > 0 for o in objs)


def test_import_without_library(tmp_path):
    """A missing library registers nothing; the reference path still serves the op."""
    code = (
        "import torch, awq_compile, awq_compile._cuda as c\n"
        "from awq_compile.quant import quantize\n"
        "assert not c.REGISTERED and not c.available()\n"
        "qw = quantize(torch.randn(16, 64), 32)\n"
        "y = torch.ops.awq.int4_linear(torch.randn(2, 64), qw.qweight, qw.scales.float(), qw.zeros, 32)\n"
        "assert y.shape == (2, 16)\n"
    )
    env = {**os.environ, "AWQ_COMPILE_CUDA_LIB": str(tmp_path / "missing.so")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)

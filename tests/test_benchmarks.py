"""The end-to-end decode benchmark runs (CPU smoke test with a tiny Llama; the figures come from
the GPU: benchmarks/RESULTS.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_decode_benchmark_smoke(tmp_path):
    out = tmp_path / "decode.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_e2e_gpu.py"), "decode", "--device", "cpu", "--tiny",
           "--layers", "2", "--batch", "1", "--prompt", "8", "--new", "4", "--unfused", "1", "--ablate", "fuse_rope",
           "env:AWQ_PDL=0,AWQ_ATTN_THREADS=128", "--bf16-attention", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600, cwd=ROOT)
    rows = json.loads(out.read_text())["rows"]
    assert [r["model"] for r in rows] == ["bf16 inductor", "bf16 inductor + decode_attention", "int4 awq", "int4 awq, fuse_siblings=False",
                                          "int4 awq, fuse_rope=False", "int4 awq, env:AWQ_PDL=0,AWQ_ATTN_THREADS=128"]
    assert all(r["decode_tok_s"] > 0 and r["batch"] == 1 for r in rows)

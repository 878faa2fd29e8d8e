"""The pass defer_cache_counters and the 0-d cache_position of awq::int4_linear_rope_cache: the op
with a first position against the same op with the positions (CPU and CUDA, in a CUDA graph
replayed after the counter moved); which graphs the pass rewrites and which it leaves (a reader
of the new value, a second write, positions it does not recognise); the backend's option and
counter on the real SmolLM2 (bit for bit against the option off; the tiny Llama's decode against
eager is test_fuse_rope_cache's, where both are on); on CUDA the backend end to end."""

from __future__ import annotations

import pytest
import torch

from awq_compile.ops import cache_positions
from conftest import decode_option_ab, smollm2_option_ab
from passes import defer_cache_counters
from test_fuse_rope_cache import _block, _cos_sin

ROPE = torch.ops.awq.int4_linear_rope_cache.default
FOREACH = torch.ops.aten._foreach_add_.Scalar


def _op_inputs(b, s, hq=4, hkv=2, d=16, k=64, g=32, start=5, device="cpu", dtype=torch.float32):
    qws, biases = _block(hq, hkv, d, k=k, g=g, bias=True)
    w = ([q.qweight.to(device) for q in qws], [q.scales.to(device, dtype) for q in qws],
         [q.zeros.to(device) for q in qws], g, [bb.to(device, dtype) for bb in biases])
    x = torch.randn(b, s, k, generator=torch.Generator().manual_seed(7)).to(device, dtype)
    cos, sin = (t.to(device, dtype) for t in _cos_sin(1, s, d, start=start))
    return x, w, cos, sin


def _caches(b, hkv=2, d=16, length=12, device="cpu", dtype=torch.float32):
    return [torch.zeros(b, hkv, length, d, device=device, dtype=dtype) for _ in range(2)]


@pytest.mark.parametrize("b,s", [(2, 1), (1, 3)])
def test_op_takes_the_first_position(b, s):
    """A 0-d cache_position p is the positions p + arange(S): the same q and caches bit for bit, the
    counter itself not changed."""
    x, w, cos, sin = _op_inputs(b, s)
    start = torch.tensor(5)
    one, two = _caches(b), _caches(b)
    q1 = ROPE(x, *w, cos, sin, torch.arange(5, 5 + s), *one)
    q2 = ROPE(x, *w, cos, sin, start, *two)
    assert torch.equal(q1, q2) and torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
    assert start.item() == 5 and one[0][:, :, 5:5 + s].abs().sum() > 0
    assert torch.equal(cache_positions(start, s), torch.arange(5, 5 + s))
    torch.library.opcheck(ROPE, (x, *w, cos, sin, start, *_caches(b)))


def test_op_refuses_other_position_shapes():
    x, w, cos, sin = _op_inputs(2, 1)
    for bad in (torch.tensor([[5]]), torch.tensor([5, 6]), torch.tensor(5, dtype=torch.int32)):
        with pytest.raises(ValueError, match=r"cache_position must be int64 \[tokens\] \(the positions\) or \[\]"):
            ROPE(x, *w, cos, sin, bad, *_caches(2))


# ----------------------------------------------------------------------------- the pass


class _Layer(torch.nn.Module):
    """A static cache layer's update as transformers writes it (positions from the counter, the
    counter's add_, the writes), here one rope call; `late` reads the counter after its add_,
    `twice` adds to it twice, `shifted` makes the positions arange(1, S + 1) + counter - 1."""

    def __init__(self, late=False, twice=False, shifted=False):
        super().__init__()
        self.late, self.twice, self.shifted = late, twice, shifted
        qws, _ = _block(bias=False)
        for name, qw in zip("qkv", qws):
            for leaf in ("qweight", "scales", "zeros"):
                self.register_buffer(f"{name}_{leaf}", getattr(qw, leaf))

    def forward(self, x, cos, sin, counter, k_cache, v_cache):
        s = x.shape[1]
        w = [[getattr(self, f"{n}_{leaf}") for n in "qkv"] for leaf in ("qweight", "scales", "zeros")]
        pos = torch.arange(1, s + 1) + counter - 1 if self.shifted else torch.arange(s) + counter
        counter.add_(s)
        if self.twice:
            counter.add_(0)
        q = ROPE(x, *w, 32, [None, None, None], cos, sin, pos, k_cache, v_cache)
        return q * counter if self.late else q


def _run(module, steps=2, s=1):
    """(q of each step, the caches, the counter): `module` compiled with a backend that runs
    defer_cache_counters on dynamo's graph, `steps` calls; and the same run eagerly. Returns
    (compiled, eager, the number deferred)."""
    deferred, graphs = [], []

    def backend(gm, example_inputs):
        deferred.append(defer_cache_counters(gm))
        graphs.append(gm)
        return gm.forward

    runs = []
    for fn in (module, None):
        if fn is None:
            torch._dynamo.reset()
            fn = torch.compile(module, backend=backend, fullgraph=True)
        x, w, cos, sin = _op_inputs(2, s)
        caches, counter, qs = _caches(2), torch.tensor(3), []
        for i in range(steps):
            qs.append(fn(x + i, cos, sin, counter, *caches))
        runs.append((torch.stack(qs), caches, counter))
    return runs[1], runs[0], sum(deferred), graphs


@pytest.mark.parametrize("s", [1, 2])
def test_pass_defers_the_counter(s):
    (q, caches, counter), (q0, caches0, counter0), deferred, graphs = _run(_Layer(), s=s)
    assert deferred == 1
    nodes = list(graphs[0].graph.nodes)
    assert nodes[-2].target is FOREACH and nodes[-1].op == "output"
    assert not any(n.op == "call_method" and n.target == "add_" for n in nodes)
    assert torch.equal(q, q0) and all(torch.equal(a, b) for a, b in zip(caches, caches0))
    assert counter.item() == counter0.item() == 3 + 2 * s
    assert caches[0][:, :, 3:3 + 2 * s].abs().amin() > 0 and caches[0][:, :, 3 + 2 * s:].abs().sum() == 0


@pytest.mark.parametrize("kind", ["late", "twice", "shifted"])
def test_pass_leaves_what_it_cannot_prove(kind):
    """A reader of the incremented counter, a second write, positions not arange(S) + counter:
    left as they are, and the results those of the eager module."""
    (q, caches, counter), (q0, caches0, counter0), deferred, graphs = _run(_Layer(**{kind: True}))
    assert deferred == 0
    assert not any(n.target is FOREACH for n in graphs[0].graph.nodes)
    assert torch.equal(q, q0) and all(torch.equal(a, b) for a, b in zip(caches, caches0))
    assert counter.item() == counter0.item()


def test_backend_defers_smollm2_bit_for_bit(smollm2_decode):
    """The real SmolLM2-135M (30 layers), RTN INT4, batch 2 decoding real text, served eagerly:
    every layer's counter deferred, logits, caches and counters bit for bit those with the
    option off."""
    q, decode = smollm2_decode
    off, on, got_cache = smollm2_option_ab(decode, "defer_counters", "counters_deferred")
    assert off == 0 and on >= q.config.num_hidden_layers
    assert all(layer.cumulative_length.item() == 15 for layer in got_cache.layers)


# ----------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("b,s", [(1, 1), (8, 1), (2, 3)])
def test_cuda_op_reads_the_counter_in_place(fold, b, s, cuda_library, monkeypatch):
    """On CUDA, both kernel paths (the folded GEMV's rope epilogue, the projection +
    awq_rope_cache): a 0-d start gives the positions' results bit for bit; captured in a CUDA graph
    at one token, a replay after the counter moved writes at the new position (the kernel reads
    the counter itself)."""
    from awq_compile import _cuda

    if not fold:
        monkeypatch.setattr(_cuda, "_fold_rope_applies", lambda *a: False)
    dev, dt, d = "cuda", torch.bfloat16, 128
    x, w, cos, sin = _op_inputs(b, s, hq=32, hkv=8, d=d, k=4096, g=128, device=dev, dtype=dt)
    one, two = _caches(b, 8, d, 16, dev, dt), _caches(b, 8, d, 16, dev, dt)
    q1 = ROPE(x, *w, cos, sin, torch.arange(5, 5 + s, device=dev), *one)
    q2 = ROPE(x, *w, cos, sin, torch.tensor(5, device=dev), *two)
    assert torch.equal(q1, q2) and torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
    if s != 1:
        return
    counter, caches = torch.tensor(5, device=dev), _caches(b, 8, d, 16, dev, dt)
    ROPE(x, *w, cos, sin, counter, *caches)  # warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ROPE(x, *w, cos, sin, counter, *caches)
    for c in caches:
        c.zero_()
    counter.fill_(9)
    graph.replay()
    torch.cuda.synchronize()
    want = _caches(b, 8, d, 16, dev, dt)
    ROPE(x, *w, cos, sin, torch.tensor([9], device=dev), *want)
    assert torch.equal(caches[0], want[0]) and torch.equal(caches[1], want[1])
    assert caches[0][:, :, 9].abs().sum() > 0 and caches[0][:, :, 5].abs().sum() == 0


@pytest.mark.cuda
@pytest.mark.parametrize("batch", [1, 8])
def test_cuda_backend_decode_with_deferred_counters(batch, cuda_library, cuda_llama_decode):
    """A 2-layer Llama of 7B's widths on CUDA, bf16, CUDA graphs: the decode with the counters
    deferred against the option off (teacher-forced tokens). The compiled steps run the same
    kernels on the same values, so logits and caches are bit for bit. (Until session 17 batch 1
    was not: the eager 8-token prefill runs the gate and up projections through the mma kernel,
    whose split-K sum used atomics; it now sums its chunks in order. Both compile under inductor's
    deterministic mode, decode_option_ab's, so inductor's own reductions agree as well.)"""
    cfg, run = cuda_llama_decode
    off, on, err = decode_option_ab(run, batch, "defer_counters", "counters_deferred")
    assert off == 0 and on == cfg.num_hidden_layers
    assert err == 0.0

"""Shared pytest fixtures."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the real SmolLM2-135M-Instruct, loaded once per session (~1 s cached)."""
    from awq_compile.models import load_smollm2

    return load_smollm2()


@pytest.fixture(scope="session")
def smollm2_decode(smollm2):
    """(q, decode): the real SmolLM2-135M in RTN INT4 (group size 64), and decode(options, steps)
    -> (logits of each step, the StaticCache): two rows of real text, a 12-token eager prefill
    into a 16-token static cache, then `steps` (<= 3) one-token steps of q compiled with
    backend="awq", options={"inductor": False, **options}, with dynamo reset and the counters
    cleared first. The fusion tests compare the same decode with an option on and off."""
    import awq_compile
    from awq_compile import AWQConfig
    from awq_compile.calib import calibration_text
    from torch._dynamo.utils import counters
    from transformers import StaticCache

    model, tok = smollm2
    awq_compile.backend.register()
    q = awq_compile.quantize_rtn(model, AWQConfig(group_size=64))
    words = calibration_text().split()
    ids = torch.stack([tok(" ".join(words[i:i + 40]), return_tensors="pt").input_ids[0, :15] for i in (0, 200)])

    def decode(options: dict, steps: int):
        torch._dynamo.reset()
        counters.clear()
        step = torch.compile(q, backend="awq", fullgraph=True, options={"inductor": False, **options})
        cache = StaticCache(config=q.config, max_cache_len=16)
        logits = []
        with torch.no_grad():
            q(ids[:, :12], past_key_values=cache, cache_position=torch.arange(12), use_cache=True)
            for i in range(steps):
                logits.append(step(ids[:, 12 + i:13 + i], past_key_values=cache,
                                   cache_position=torch.arange(12 + i, 13 + i), use_cache=True).logits)
        return torch.stack(logits), cache

    return q, decode


def smollm2_option_ab(decode, option: str, counter: str, steps: int = 3):
    """A/B of one backend option with smollm2_decode's `decode`: the decode with `option` off, then
    on, whose logits and every layer's cached keys and values must be bit for bit equal. Returns
    (the backend counter `counter` after the off run, after the on run, the on run's cache)."""
    from torch._dynamo.utils import counters

    want, want_cache = decode({option: False}, steps)
    off = counters["awq"][counter]
    got, got_cache = decode({option: True}, steps)
    assert torch.equal(got, want)
    for a, b in zip(got_cache.layers, want_cache.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    return off, counters["awq"][counter], got_cache


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A word-level Hugging Face tokenizer (512 ids) over the calibration text; needs no files.

    Words outside its vocabulary map to <unk>, so any text tokenizes to roughly one id per word.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from awq_compile.calib import calibration_text

    vocab = {"<unk>": 0}
    for word in calibration_text().split():
        if len(vocab) == 512:
            break
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


@pytest.fixture
def fresh_dynamo():
    """A clean torch.compile state and empty counters around a test (backend tests count graphs
    and quantizations)."""
    import torch
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def tiny_llama():
    """A 2-layer Llama (hidden 64, SwiGLU MLP, GQA), RTN-quantized with group size 32; the "awq"
    backend registered."""
    import awq_compile
    from awq_compile import AWQConfig
    from transformers import LlamaConfig, LlamaForCausalLM

    awq_compile.backend.register()
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=128, max_position_embeddings=64)
    return awq_compile.quantize_rtn(LlamaForCausalLM(cfg).eval(), AWQConfig(group_size=32))


def static_cache_decode(model, cfg, step, steps: int = 4):
    """(logits of `steps` decode steps, the StaticCache) of a tiny Llama (vocab 128): a 4-token
    prefill of two rows run eagerly by `model` into a 16-token static cache, then one-token steps
    of `step` (the model itself, or it compiled), token t + 1 after t. Shared by the fusion passes'
    tests, which compare a compiled decode against another."""
    from transformers import StaticCache

    cache = StaticCache(config=cfg, max_cache_len=16)
    ids = torch.randint(0, 128, (2, 4), generator=torch.Generator().manual_seed(1))
    logits = []
    with torch.no_grad():
        model(ids, past_key_values=cache, cache_position=torch.arange(4), use_cache=True)
        tok = ids[:, -1:]
        for i in range(steps):
            logits.append(step(tok, past_key_values=cache, cache_position=torch.arange(4 + i, 5 + i),
                               use_cache=True).logits)
            tok = (tok + 1) % 128
    return torch.stack(logits), cache


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Relative Frobenius error of got against want, in float64: the tests' measure of closeness."""
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def attention_reference(q, k, v, mask, scale):
    """float64 softmax(scale q k^T + mask) v for [B, H, S, D] tensors, k and v repeated for grouped
    heads; a row with every position masked is 0, and k, v at masked positions (NaN in the tests)
    do not count. The reference of awq::decode_attention's tests."""
    import math

    g = q.shape[1] // k.shape[1]
    k64, v64 = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    s = q.double() @ k64.transpose(-1, -2) * scale
    if mask is not None:
        allowed = mask if mask.dtype == torch.bool else torch.isfinite(mask)
        add = 0.0 if mask.dtype == torch.bool else torch.where(allowed, mask.double(), 0.0)
        s = torch.where(allowed.expand_as(s), s + add, -math.inf)
    w = torch.nan_to_num(torch.softmax(s, -1), nan=0.0)
    return w @ torch.nan_to_num(v64, nan=0.0)


def llama_7b_widths_decode(device: str):
    """(cfg, decode): a 2-layer Llama of 7B's widths in bf16, RTN INT4 (group size 128), on
    `device`, and decode(batch, options) -> (logits of each step, the StaticCache): an eager 8-token
    prefill into a 32-token static cache, then 6 teacher-forced one-token steps of the model
    compiled with backend="awq", options={"mode": "reduce-overhead", **options} (CUDA graphs on a
    GPU), with dynamo reset (unless reset=False: a new batch size then makes dynamo trace the
    batch as a symbolic size) and the counters cleared first. The CUDA fusion tests compare the same
    decode with an option on and off."""
    import awq_compile
    from awq_compile import AWQConfig
    from torch._dynamo.utils import counters
    from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

    awq_compile.backend.register()
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                      num_hidden_layers=2, vocab_size=512, max_position_embeddings=256)
    model = awq_compile.quantize_rtn(LlamaForCausalLM(cfg).to(torch.bfloat16).to(device).eval(),
                                     AWQConfig(group_size=128, compute_dtype="bfloat16"))

    def decode(batch: int, options: dict, reset: bool = True):
        ids = torch.randint(0, 512, (batch, 8), device=device, generator=torch.Generator(device).manual_seed(1))
        feed = torch.randint(0, 512, (6, batch, 1), device=device, generator=torch.Generator(device).manual_seed(2))
        if reset:
            torch._dynamo.reset()
        counters.clear()
        step = torch.compile(model, backend="awq", fullgraph=True, options={"mode": "reduce-overhead", **options})
        cache = StaticCache(config=cfg, max_cache_len=32)
        out = []
        with torch.no_grad():
            model(ids, past_key_values=cache, cache_position=torch.arange(8, device=device), use_cache=True)
            for i in range(6):
                pos = torch.arange(8 + i, 9 + i, device=device)
                out.append(step(feed[i], past_key_values=cache, cache_position=pos, use_cache=True).logits.clone())
        return torch.stack(out), cache

    return cfg, decode


def decode_option_ab(decode, batch: int, option: str, counter: str) -> tuple[int, int, float]:
    """A/B of one backend option with llama_7b_widths_decode's `decode`: the decode with `option`
    off, then on. Returns (the backend counter `counter` after the off run, after the on run, the
    largest relative Frobenius error between the two of the logits and of each layer's cached
    keys and values). The CUDA fusion tests assert the counts and bound the error.

    Both compile with inductor's deterministic mode: otherwise inductor picks each reduction
    kernel's block size by timing it on first run (the RMSNorms where they stay inductor's, as at
    batch 8), which moves the last bits, so two compiles of one model need not agree bit for bit
    (session 18: the deferred counters' batch-8 A/B failed once in three full CUDA runs by 6e-4,
    and passed alone six times)."""
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import counters

    runs = []
    for on in (False, True):
        with inductor_config.patch(deterministic=True):
            logits, cache = decode(batch, {option: on})
        runs.append((logits, cache, counters["awq"][counter]))
    (want, want_cache, off), (got, got_cache, on) = runs
    errs = [rel_err(got, want)] + [rel_err(getattr(a, name), getattr(b, name))
                               for a, b in zip(got_cache.layers, want_cache.layers) for name in ("keys", "values")]
    print(f"{option}: relative errors, logits then each layer's keys and values: {errs}")  # shown on failure
    return off, on, max(errs)


@pytest.fixture(scope="session")
def cuda_llama_decode():
    """llama_7b_widths_decode("cuda"), built once a session; skips as cuda_library does (a
    session fixture is set up before the function-scoped one)."""
    _skip_without_cuda_library()
    return llama_7b_widths_decode("cuda")


def _skip_without_cuda_library():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from awq_compile import _cuda

    if not _cuda.REGISTERED:
        pytest.skip("libawq_int4.so not built/loadable")


@pytest.fixture
def cuda_library():
    """Skips the test without a CUDA GPU or without a loadable libawq_int4.so (the CUDA ops)."""
    _skip_without_cuda_library()


def assert_graph_replays(chain, want, what: str = "") -> None:
    """chain() (returning tensors) warmed up on a side stream, captured in a CUDA graph, and replayed
    three times with every output filled with NaN first: each replay equals `want`."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        chain()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = chain()
    for _ in range(3):
        for t in outs:
            t.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        for got, ref in zip(outs, want):
            assert torch.equal(got, ref), f"{what}: a replay differs from eager"

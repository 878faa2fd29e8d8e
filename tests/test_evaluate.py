import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from awq_compile.calib import calibration_text, evaluation_text, tokenize_text
from awq_compile.evaluate import logits_of, perplexity

SEQ = 16


@pytest.fixture(scope="module")
def tiny_llama(tiny_tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def text():
    return calibration_text()[:5_000]


def _reference_ppl(model, tokens, seq_len, n_windows):
    # Written out by hand in float64: log-softmax via logsumexp, the target's log-probability.
    nll, count = 0.0, 0
    for w in range(n_windows):
        ids = tokens[w * seq_len : (w + 1) * seq_len].unsqueeze(0)
        with torch.no_grad():
            logits = model(ids).logits[0].double()
        for t in range(seq_len - 1):
            row = logits[t]
            nll += float(torch.logsumexp(row, 0) - row[ids[0, t + 1]])
            count += 1
    return math.exp(nll / count)


def test_perplexity_matches_float64_reference(tiny_llama, tiny_tokenizer, text):
    tokens = tokenize_text(tiny_tokenizer, text)
    got = perplexity(tiny_llama, tiny_tokenizer, text, seq_len=SEQ, max_windows=2, progress=False)
    want = _reference_ppl(tiny_llama, tokens, SEQ, 2)
    assert got == pytest.approx(want, rel=1e-5)
    # A random model over ~512 ids sits near uniform.
    assert 100 < got < 2000


def test_perplexity_all_windows(tiny_llama, tiny_tokenizer):
    text = "the " * (3 * SEQ + 5)  # three full windows and a partial one, which is dropped
    tokens = tokenize_text(tiny_tokenizer, text)
    got = perplexity(tiny_llama, tiny_tokenizer, text, seq_len=SEQ, max_windows=None, progress=False)
    assert got == pytest.approx(_reference_ppl(tiny_llama, tokens, SEQ, 3), rel=1e-5)
    assert got == perplexity(tiny_llama, tiny_tokenizer, text, seq_len=SEQ, max_windows=99, progress=False)


def test_perplexity_accepts_plain_callables_and_graph_modules(tiny_llama, tiny_tokenizer, text):
    want = perplexity(tiny_llama, tiny_tokenizer, text, seq_len=SEQ, max_windows=2, progress=False)

    class LogitsOnly(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids):
            return self.inner(input_ids).logits

    as_tuple = lambda ids: (tiny_llama(ids).logits, None)  # noqa: E731
    for model in (LogitsOnly(tiny_llama), as_tuple):
        got = perplexity(model, tiny_tokenizer, text, seq_len=SEQ, max_windows=2, progress=False)
        assert got == pytest.approx(want, rel=1e-6)


def test_perplexity_on_fx_graph_module(tiny_tokenizer, text):
    torch.manual_seed(1)
    vocab = len(tiny_tokenizer)
    bigram = torch.nn.Sequential(torch.nn.Embedding(vocab, 8), torch.nn.Linear(8, vocab))
    gm = torch.fx.symbolic_trace(bigram)
    assert isinstance(gm, torch.fx.GraphModule)
    want = perplexity(bigram, tiny_tokenizer, text, seq_len=SEQ, max_windows=2, progress=False)
    got = perplexity(gm, tiny_tokenizer, text, seq_len=SEQ, max_windows=2, progress=True)
    assert got == pytest.approx(want, rel=1e-6)


def test_logits_of():
    x = torch.zeros(1)

    class Out:
        logits = x

    for out in (Out(), (x, None), [x], x):
        assert logits_of(out) is x


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"seq_len": 1}, "seq_len must be at least 2"),
        ({"max_windows": 0}, "max_windows must be positive"),
        ({"seq_len": 10_000}, "fewer than one window of 10000"),
    ],
)
def test_perplexity_errors(tiny_llama, tiny_tokenizer, text, kwargs, match):
    with pytest.raises(ValueError, match=match):
        perplexity(tiny_llama, tiny_tokenizer, text, progress=False, **kwargs)


@pytest.mark.slow
def test_real_model_perplexity_two_windows(smollm2):
    model, tokenizer = smollm2
    ppl = perplexity(model, tokenizer, evaluation_text(), seq_len=512, max_windows=2, progress=False)
    assert ppl == pytest.approx(29.0, rel=0.10)

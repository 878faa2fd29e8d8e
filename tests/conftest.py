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


@pytest.fixture
def cuda_library():
    """Skips the test without a CUDA GPU or without a loadable libawq_int4.so (the CUDA ops)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from awq_compile import _cuda

    if not _cuda.REGISTERED:
        pytest.skip("libawq_int4.so not built/loadable")

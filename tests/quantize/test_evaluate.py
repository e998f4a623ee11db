"""Evaluation data and metrics: built-in texts, windows, perplexity against transformers, KL and top-1."""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import save_tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from kiln.core.errors import UserInputError
from kiln.models.loader import load_model
from kiln.quantize import evaluate as evaluate_module
from kiln.quantize.datasets import builtin_path, load_text, token_windows
from kiln.quantize.evaluate import compare_logits, evaluate, perplexity


def sha256_of(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def word_ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = re.findall(r"[a-z']+", text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_llama_dir: Path):
    return AutoTokenizer.from_pretrained(str(tiny_llama_dir))


@pytest.fixture(scope="module")
def perturbed_dir(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with noise on one weight (its tokenizer and config unchanged)."""
    out = Path(shutil.copytree(tiny_llama_dir, tmp_path_factory.mktemp("perturbed") / "model"))
    tensors = load_file(out / "model.safetensors")
    generator = torch.Generator().manual_seed(7)
    weight = tensors["model.layers.1.mlp.down_proj.weight"]
    tensors["model.layers.1.mlp.down_proj.weight"] = weight + torch.randn(weight.shape, generator=generator)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


# --- data -------------------------------------------------------------------------------------------


def test_builtin_texts_are_prose_and_eval_is_held_out() -> None:
    eval_text = load_text("builtin", builtin="eval")
    calibration = load_text("builtin", builtin="calibration")
    assert eval_text.source == "builtin:eval" and calibration.source == "builtin:calibration"
    assert eval_text.num_words > 3000 and calibration.num_words > 3000
    # Held out: not one run of eight words in common.
    assert not word_ngrams(eval_text.text, 8) & word_ngrams(calibration.text, 8)
    assert eval_text.digest == sha256_of(builtin_path("eval"))
    assert calibration.digest == sha256_of(builtin_path("calibration"))
    assert load_text("builtin").digest == eval_text.digest  # eval is the default


def test_txt_and_jsonl_files(tmp_path: Path) -> None:
    txt = tmp_path / "notes.txt"
    txt.write_text("One line.\nAnother line.\n", encoding="utf-8")
    data = load_text(txt)
    assert data.text == "One line.\nAnother line.\n" and data.digest == sha256_of(txt)
    assert load_text(str(txt)) == data  # same bytes, same digest

    jsonl = tmp_path / "records.jsonl"
    jsonl.write_text(json.dumps({"text": "First."}) + "\n\n" + json.dumps({"text": "Second.", "id": 2}) + "\n")
    data = load_text(jsonl)
    assert data.text == "First.\n\nSecond." and data.digest == sha256_of(jsonl)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.txt", "  \n", "holds no text"),
        ("bad.jsonl", '{"text": "ok"}\nnot json\n', "bad.jsonl:2: not valid JSON"),
        ("nofield.jsonl", '{"prompt": "hi"}\n', "needs a string field 'text'"),
    ],
)
def test_bad_data_files(tmp_path: Path, name: str, content: str, message: str) -> None:
    (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(UserInputError, match=re.escape(message)):
        load_text(tmp_path / name)


def test_missing_data_file(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="does not exist"):
        load_text(tmp_path / "nope.txt")


def test_windows_are_consecutive_and_start_with_bos(tiny_tokenizer) -> None:
    text = load_text().text
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tiny_tokenizer.bos_token_id
    windows = token_windows(tiny_tokenizer, text, seq_len=32, max_windows=5)
    assert len(windows) == 5 and all(len(w) == 32 and w[0] == bos for w in windows)
    assert [t for w in windows for t in w[1:]] == ids[: 5 * 31]  # non-overlapping, in order, nothing skipped

    # A short text fills fewer windows; the tail that does not fill one is dropped.
    short = tiny_tokenizer.decode(ids[:100])
    assert len(token_windows(tiny_tokenizer, short, seq_len=32, max_windows=16)) == 100 // 31
    with pytest.raises(UserInputError, match="too few for one window"):
        token_windows(tiny_tokenizer, "Paris.", seq_len=32, max_windows=4)


def test_windows_without_bos() -> None:
    class NoBosTokenizer:
        bos_token_id = None

        def __call__(self, text: str, **kwargs: object) -> dict[str, list[int]]:
            return {"input_ids": list(range(10))}

    assert token_windows(NoBosTokenizer(), "x", seq_len=4, max_windows=8) == [[0, 1, 2, 3], [4, 5, 6, 7]]


# --- metrics ----------------------------------------------------------------------------------------


@torch.inference_mode()
def test_perplexity_matches_transformers(tiny_llama_dir: Path, tiny_tokenizer, monkeypatch) -> None:
    windows = token_windows(tiny_tokenizer, load_text().text, seq_len=64, max_windows=4)
    windows[2] = windows[2][:40]  # ragged lengths: the mean is over tokens, not over windows
    hf_model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    total_nll = 0.0
    for window in windows:
        ids = torch.tensor([window])
        total_nll += hf_model(ids, labels=ids).loss.item() * (len(window) - 1)  # loss is a mean per window
    expected = math.exp(total_nll / sum(len(w) - 1 for w in windows))

    model, _ = load_model(tiny_llama_dir, dtype=torch.float32)
    assert perplexity(model, windows) == pytest.approx(expected, rel=1e-4)
    # Split into several forwards and several logits chunks: the same number.
    monkeypatch.setattr(evaluate_module, "MAX_BATCH_TOKENS", 100)
    monkeypatch.setattr(evaluate_module, "_LOGITS_ROWS", 50)
    assert perplexity(model, windows) == pytest.approx(expected, rel=1e-4)


def test_compare_with_itself_and_with_a_perturbed_copy(tiny_llama_dir: Path, perturbed_dir: Path) -> None:
    same = evaluate(tiny_llama_dir, compare_dir=tiny_llama_dir, seq_len=64, max_windows=4)
    assert same.kl == pytest.approx(0.0, abs=1e-9) and same.top1_agreement == 1.0
    assert same.ppl_other == same.ppl and same.ppl_increase_pct == 0.0
    assert same.num_tokens == 4 * 63 and same.num_windows == 4 and same.seq_len == 64
    assert same.data_digest == sha256_of(builtin_path("eval")) and same.data_source == "builtin:eval"

    drift = evaluate(tiny_llama_dir, compare_dir=perturbed_dir, seq_len=64, max_windows=4)
    assert drift.kl > 1e-3 and drift.top1_agreement < 1.0
    assert drift.ppl == same.ppl  # the first model is the reference either way
    alone = evaluate(perturbed_dir, seq_len=64, max_windows=4)
    assert alone.kl is None and alone.top1_agreement is None and alone.ppl_other is None
    assert drift.ppl_other == pytest.approx(alone.ppl, rel=1e-6)
    report = drift.to_dict()
    assert report["kl"] == drift.kl and report["ppl_increase_pct"] == pytest.approx(
        (drift.ppl_other / drift.ppl - 1) * 100
    )

    # compare_logits on loaded models agrees with evaluate's numbers.
    windows = token_windows(AutoTokenizer.from_pretrained(str(tiny_llama_dir)), load_text().text, 64, 4)
    model_a, _ = load_model(tiny_llama_dir)
    model_b, _ = load_model(perturbed_dir)
    kl, top1 = compare_logits(model_a, model_b, windows)
    assert kl == pytest.approx(drift.kl, rel=1e-6) and top1 == drift.top1_agreement


def test_refusals(tiny_llama_dir: Path, tmp_path: Path) -> None:
    other_vocab = save_tiny_model(tmp_path / "other-vocab", vocab_size=384)
    with pytest.raises(UserInputError, match="same tokenizer"):
        evaluate(tiny_llama_dir, compare_dir=other_vocab, seq_len=64, max_windows=1)
    with pytest.raises(UserInputError, match="longer than .* context of 256 tokens"):
        evaluate(tiny_llama_dir, seq_len=300, max_windows=1)
    short = tmp_path / "short.txt"
    short.write_text("Just a few words.", encoding="utf-8")
    with pytest.raises(UserInputError, match="too few for one window"):
        evaluate(tiny_llama_dir, data=short, seq_len=64)


@pytest.mark.slow
def test_builtin_smollm2_perplexity_is_plausible(builtin_checkpoint: Path) -> None:
    start = time.perf_counter()
    report = evaluate(builtin_checkpoint, seq_len=512, max_windows=2, dtype="fp32")
    seconds = time.perf_counter() - start
    print(f"SmolLM2-135M on builtin:eval: ppl {report.ppl:.3f} over {report.num_tokens} tokens in {seconds:.1f}s")
    # A pretrained 135M model on plain English; random weights would give tens of thousands.
    assert 5 < report.ppl < 40
    assert report.num_tokens == 2 * 511 and report.data_digest == sha256_of(builtin_path("eval"))

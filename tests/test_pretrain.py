"""Offline pretrained initialisations: tokenisers, image tokens, save/load, and that the shipped
models learned their modality (real data scores clearly better than the same tokens shuffled)."""

import argparse
import importlib.util
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import regex
import torch
from transformers import AutoTokenizer, GPT2LMHeadModel

from dtsweep.assets import asset_path, list_assets
from dtsweep.pretrain import (
    ImageConfig,
    LanguageConfig,
    add_arguments,
    image,
    image_tokens,
    language,
    load_fashion_mnist,
    load_model_dir,
    mean_token_loss,
    pretrain_image,
    pretrain_language,
)
from dtsweep.pretrain.common import config_from_args, shuffle_within_rows
from dtsweep.pretrain.language import (
    GPT2_PATTERN,
    build_tokenizer,
    encode_documents,
    first_sequences,
    gpt2_encoding,
    gpt2_ranks,
    news_articles,
)

# Ordinary English written for this test (not from the training corpus).
ENGLISH = (
    "The city council met on Tuesday evening to discuss the new budget for schools and roads. "
    "Several residents said they were worried about the cost of the project, while the mayor "
    "argued that the investment would create jobs and improve public safety. After a long debate, "
    "the council voted to approve the plan, but members agreed to review the spending again next "
    "year. Officials said the first phase of construction is expected to begin in the spring, and "
    "the work should be finished before the end of the year. The president of the local teachers' "
    'union told reporters that the money was long overdue. "Our students have waited too long for '
    'safe buildings," she said. Police said traffic would be diverted during the work.'
)
HARD_TEXT = "Naïve café déjà vu — 東京 🚀 3.14159 $1,000,000 don't  tabs\tand\nnewlines <b>HTML</b> Zyzzyva"

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def chibit():
    return asset_path("chibit")


@pytest.fixture(scope="module")
def igpt():
    return asset_path("igpt-mini")


@pytest.fixture(scope="module")
def fashion_test():
    images, _ = load_fashion_mnist("test")
    return images


def test_gpt2_tokenizer_from_tiktoken_matches_tiktoken():
    """transformers' GPT2Tokenizer over GPT-2's full merge list reproduces tiktoken's ids."""
    ranks = gpt2_ranks()
    enc = gpt2_encoding(ranks)
    tokenizer, gpt2_ids = build_tokenizer(sorted(ranks, key=ranks.__getitem__), ranks)
    assert gpt2_ids == list(range(50257)) and len(tokenizer) == 50257
    for text in (ENGLISH, HARD_TEXT):
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == enc.encode_ordinary(text)
    assert tokenizer("<|endoftext|>")["input_ids"] == [50256]


def test_shipped_tokenizer_round_trips_and_matches_gpt2(chibit):
    tokenizer = AutoTokenizer.from_pretrained(chibit)
    gpt2_ids = np.asarray(json.loads((chibit / "gpt2_token_ids.json").read_text()))
    config = GPT2LMHeadModel.config_class.from_pretrained(chibit)
    assert len(tokenizer) == len(gpt2_ids) == config.vocab_size
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.eos_token_id == config.eos_token_id

    # Any text tokenises and decodes back unchanged, rare characters falling back to bytes.
    for text in (ENGLISH, HARD_TEXT):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert max(ids) < len(tokenizer)
        assert tokenizer.decode(ids) == text

    # BPE works word by word (GPT-2's pre-tokeniser splits the text first). Wherever GPT-2's
    # tokens for a word are all in the trimmed vocabulary, the ids are GPT-2's, renumbered.
    enc = gpt2_encoding()
    kept = set(gpt2_ids.tolist())
    words = regex.findall(GPT2_PATTERN, ENGLISH + " " + HARD_TEXT)
    compared = 0
    for word in words:
        reference = enc.encode_ordinary(word)
        if set(reference) <= kept:
            assert gpt2_ids[tokenizer(word, add_special_tokens=False)["input_ids"]].tolist() == reference, word
            compared += 1
    assert compared > 0.8 * len(words)


def test_image_tokens_shape_range_and_palette(igpt, fashion_test):
    tokens = image_tokens(fashion_test[:100], igpt)
    palette = json.loads((igpt / "palette.json").read_text())
    n_colors = len(palette["palette"])
    assert tokens.shape == (100, 784) and tokens.dtype == np.int64
    assert tokens.min() == 0 and tokens.max() <= n_colors - 1
    assert np.all(np.diff(palette["palette"]) > 0)
    # Black maps to the darkest entry and white to the brightest, in raster order.
    edges = np.zeros((1, 28, 28), dtype=np.uint8)
    edges[0, 0, 27] = 255
    assert image_tokens(edges, igpt)[0, 27] == n_colors - 1 and image_tokens(edges, igpt)[0, 28] == 0
    assert GPT2LMHeadModel.config_class.from_pretrained(igpt).bos_token_id == palette["start_token"] == n_colors
    with pytest.raises(ValueError):
        image_tokens(np.zeros((2, 32, 32), dtype=np.uint8), igpt)


TINY = dict(n_layer=1, n_embd=32, n_head=2, steps=3, batch_size=2, warmup_steps=1, eval_sequences=4, threads=1)


def test_tiny_language_model_saves_and_loads(tmp_path):
    cfg = LanguageConfig(**TINY, block_size=32, min_count=20, max_train_documents=100)
    card = pretrain_language(tmp_path, cfg, log=lambda _: None)
    model = GPT2LMHeadModel.from_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert model.dtype == torch.float32  # stored as float16, loaded for computation as float32
    assert model.config.n_layer == 1 and model.config.vocab_size == len(tokenizer) == card["architecture"]["vocab_size"]
    assert card["training"]["tokens_seen"] == 3 * 2 * 32
    assert json.loads((tmp_path / "card.json").read_text()) == card
    assert "dtsweep pretrain language" in (tmp_path / "README.md").read_text()
    # The loaded weights and tokenizer are the ones the card scored: same held-out loss.
    heldout = first_sequences(encode_documents(tokenizer, news_articles()[1]), 32, 4)
    assert mean_token_loss(model, heldout) == pytest.approx(card["evaluation"]["heldout_loss"], rel=1e-5)


def test_tiny_image_model_saves_and_loads(tmp_path, fashion_test):
    card = pretrain_image(tmp_path, ImageConfig(**TINY, n_colors=8, max_train_images=500), log=lambda _: None)
    model = GPT2LMHeadModel.from_pretrained(tmp_path)
    assert model.config.vocab_size == 9 and model.config.n_positions == 785
    tokens = image_tokens(fashion_test[:4], tmp_path)
    assert tokens.max() <= 7
    sequences = np.concatenate([np.full((4, 1), 8), tokens], axis=1)
    assert mean_token_loss(model, sequences) == pytest.approx(card["evaluation"]["heldout_loss"], rel=1e-5)


def test_shipped_language_model_prefers_real_english(chibit):
    model = load_model_dir(chibit)
    tokenizer = AutoTokenizer.from_pretrained(chibit)
    ids = np.asarray([tokenizer(ENGLISH, add_special_tokens=False)["input_ids"]])
    real = mean_token_loss(model, ids)
    shuffled = np.mean([mean_token_loss(model, shuffle_within_rows(ids, seed)) for seed in range(3)])
    assert real < shuffled - 1.5, (real, shuffled)  # 5.1 vs 8.0 shipped; an untrained model: no gap
    ev = json.loads((chibit / "card.json").read_text())["evaluation"]
    assert ev["heldout_loss"] < ev["unigram_loss"] - 0.5 and ev["heldout_loss"] < ev["shuffled_loss"] - 1.0


def test_shipped_image_model_prefers_real_images(igpt, fashion_test):
    model = load_model_dir(igpt)
    start = model.config.bos_token_id
    tokens = image_tokens(fashion_test[-32:], igpt)  # images the card's evaluation did not use
    sequences = np.concatenate([np.full((len(tokens), 1), start), tokens], axis=1)
    real = mean_token_loss(model, sequences)
    shuffled = mean_token_loss(model, shuffle_within_rows(sequences, seed=0, keep_first=True))
    assert real < shuffled - 1.0, (real, shuffled)  # 1.1 vs 2.9 shipped; an untrained model: 0.3
    ev = json.loads((igpt / "card.json").read_text())["evaluation"]
    assert ev["heldout_loss"] < ev["unigram_loss"] - 0.3 and ev["heldout_loss"] < ev["shuffled_loss"] - 0.5


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="would reach the network")
def test_wikitext_without_datasets_says_how_to_get_it(tmp_path):
    with pytest.raises(RuntimeError, match="--corpus news"):
        pretrain_language(tmp_path, LanguageConfig(corpus="wikitext-103"), log=lambda _: None)
    assert not any(tmp_path.iterdir())


def test_cli_arguments_build_configs():
    parser = argparse.ArgumentParser()
    add_arguments(parser.add_subparsers(dest="command").add_parser("pretrain"))
    args = parser.parse_args(["pretrain", "language", "--out", "x", "--steps", "5", "--corpus", "news"])
    assert config_from_args(LanguageConfig, args) == LanguageConfig(steps=5) and args.func is language.main
    args = parser.parse_args(["pretrain", "image", "--out", "y", "--n-colors", "8", "--max-minutes", "1.5"])
    assert config_from_args(ImageConfig, args) == ImageConfig(n_colors=8, max_minutes=1.5) and args.func is image.main
    with pytest.raises(SystemExit):
        parser.parse_args(["pretrain", "language", "--out", "x", "--corpus", "books"])


def test_assets_lists_shipped_models(chibit):
    assets = {a["name"]: a for a in list_assets()}
    assert assets["chibit"]["kind"] == "language" and assets["igpt-mini"]["kind"] == "image"
    for asset in assets.values():
        assert asset["kind"] in ("language", "image", "behaviour")
        assert (asset_path(asset["name"]) / "card.json").exists()
    assert asset_path("chibit") == chibit
    with pytest.raises(KeyError):
        asset_path("no-such-asset")
    total = sum(f.stat().st_size for name in ("chibit", "igpt-mini") for f in asset_path(name).iterdir())
    assert total < 10 * 2**20

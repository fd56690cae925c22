"""iGPT-style image pre-training: the same small GPT-2 trained to predict Fashion-MNIST pixels.

Following iGPT (Chen et al., 2020): pixel values are quantised to a small palette found by
k-means, each 28x28 image becomes a sequence of 784 palette indices in raster order, a start
token is prepended, and the model learns next-pixel prediction. Fashion-MNIST comes from the
Debian package `dataset-fashion-mnist` (files under /usr/share/datasets/fashion-mnist/).

Token ids: 0..n_colors-1 are palette entries sorted from dark to bright; n_colors is the
start token. The palette ships in the model directory (palette.json), so
`image_tokens(images, model_dir)` turns any uint8 image into the model's ids.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch

from dtsweep.pretrain import common

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
PALETTE_FILE = "palette.json"
SIDE = 28


@dataclasses.dataclass
class ImageConfig(common.TrainConfig):
    n_colors: int = 16  # palette size (k-means clusters over grey levels)
    data_dir: str = str(FASHION_MNIST_DIR)
    max_train_images: int = 0  # use only the first N training images (quick runs); 0 = all 60,000


def _read_idx(path: Path) -> np.ndarray:
    """An array from a gzipped IDX file (the MNIST format: big-endian dims, then uint8 data)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(split: str, data_dir: str | Path = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels uint8 [N]) of the "train" (60,000) or "test" (10,000) split."""
    prefix = {"train": "train", "test": "t10k"}[split]
    data_dir = Path(data_dir)
    images_path = data_dir / f"{prefix}-images-idx3-ubyte.gz"
    if not images_path.exists():
        raise FileNotFoundError(f"{images_path} not found: install Fashion-MNIST with `apt-get install dataset-fashion-mnist`")
    return _read_idx(images_path), _read_idx(data_dir / f"{prefix}-labels-idx1-ubyte.gz")


def fit_palette(images: np.ndarray, n_colors: int, seed: int) -> np.ndarray:
    """k-means palette of `n_colors` grey levels (float32, ascending) fitted to every pixel of
    `images` (uint8 [N, 28, 28]).

    Clustering the 256 grey levels weighted by how often each occurs is exactly k-means over all
    pixels, at the cost of a histogram.
    """
    try:
        from sklearn.cluster import KMeans
    except ImportError as e:
        raise ImportError("fitting the palette needs scikit-learn: pip install 'dtsweep[pretrain]'") from e

    counts = np.bincount(images.ravel(), minlength=256)
    levels = np.flatnonzero(counts)
    km = KMeans(n_clusters=n_colors, n_init=10, random_state=seed)
    km.fit(levels[:, None].astype(np.float64), sample_weight=counts[levels])
    return np.sort(km.cluster_centers_.ravel()).astype(np.float32)


def quantise(images: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Palette index of every pixel: uint8 [N, 28, 28] -> int64 [N, 784], raster order."""
    images = np.asarray(images)
    if images.ndim != 3 or images.shape[1:] != (SIDE, SIDE):
        raise ValueError(f"expected images of shape [N, {SIDE}, {SIDE}], got {images.shape}")
    # Nearest palette entry; with an ascending palette that is a search between midpoints.
    midpoints = (palette[1:] + palette[:-1]) / 2
    return np.searchsorted(midpoints, images.reshape(len(images), -1).astype(np.float32)).astype(np.int64)


def image_tokens(images_uint8: np.ndarray, model_dir: str | Path) -> np.ndarray:
    """The token ids a model in `model_dir` reads for uint8 images [N, 28, 28]: int64 [N, 784]
    in 0..n_colors-1, raster order, without the start token (config.bos_token_id)."""
    palette = np.asarray(json.loads((Path(model_dir) / PALETTE_FILE).read_text())["palette"], dtype=np.float32)
    return quantise(images_uint8, palette)


def _with_start(tokens: np.ndarray, start_id: int) -> np.ndarray:
    """[N, 784] pixel ids -> [N, 785] sequences beginning with the start token."""
    return np.concatenate([np.full((len(tokens), 1), start_id, dtype=tokens.dtype), tokens], axis=1)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pretrain_image(out_dir: str | Path, cfg: ImageConfig | None = None, log=common.log_line) -> dict:
    """Train an iGPT-style GPT-2 on Fashion-MNIST per `cfg` and save it to `out_dir`.

    `out_dir` becomes a Hugging Face GPT2LMHeadModel directory with palette.json, card.json and
    README.md. Returns the card (a dict; losses in nats per pixel).
    """
    cfg = cfg or ImageConfig()
    out_dir = Path(out_dir)
    wall_start = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    train_images, _ = load_fashion_mnist("train", cfg.data_dir)
    if cfg.max_train_images:
        train_images = train_images[: cfg.max_train_images]
    test_images, _ = load_fashion_mnist("test", cfg.data_dir)

    palette = fit_palette(train_images, cfg.n_colors, cfg.seed)
    start_id = cfg.n_colors
    train = torch.from_numpy(_with_start(quantise(train_images, palette), start_id))
    test = _with_start(quantise(test_images, palette), start_id)
    log(f"palette: {np.round(palette, 1).tolist()}; {len(train):,} training images of {SIDE * SIDE} pixels")

    model = common.gpt2_model(cfg, vocab_size=cfg.n_colors + 1, n_positions=SIDE * SIDE + 1, bos=start_id, eos=None)

    def sample_batch(rng: np.random.Generator) -> torch.Tensor:
        return train[rng.integers(0, len(train), size=cfg.batch_size)]

    result = common.train_causal_lm(model, sample_batch, cfg, log=log)

    common.save_model_dir(model, out_dir)
    (out_dir / PALETTE_FILE).write_text(
        json.dumps({"palette": palette.tolist(), "start_token": start_id, "order": "raster, row-major"}, indent=2) + "\n"
    )

    # Score the saved (float16-rounded) weights on the first test images.
    shipped = common.load_model_dir(out_dir)
    held = test[: cfg.eval_sequences]
    evaluation = {
        "heldout_loss": common.mean_token_loss(shipped, held),
        "unigram_loss": common.unigram_loss(np.bincount(train[:, 1:].numpy().ravel(), minlength=cfg.n_colors), held[:, 1:]),
        "shuffled_loss": common.mean_token_loss(shipped, common.shuffle_within_rows(held, cfg.seed, keep_first=True)),
        "heldout_targets": int(held[:, 1:].size),
        "heldout_description": f"the first {len(held)} Fashion-MNIST test images, every pixel",
    }
    log(
        f"held-out loss {evaluation['heldout_loss']:.3f}, unigram {evaluation['unigram_loss']:.3f}, "
        f"shuffled {evaluation['shuffled_loss']:.3f} nats/pixel"
    )
    data_dir = Path(cfg.data_dir)
    card = {
        "name": "igpt-mini",
        "kind": "image",
        "description": "An iGPT-style GPT-2 (Chen et al., 2020) pretrained by dtsweep on next-pixel "
        "prediction over k-means-quantised Fashion-MNIST, for initialising Decision Transformers offline.",
        "architecture": common.architecture(shipped),
        "corpus": {
            "name": "Fashion-MNIST",
            "source": "Debian dataset-fashion-mnist",
            "files": {p.name: _sha256(p) for p in sorted(data_dir.glob("*-images-idx3-ubyte.gz"))},
            "train_images": len(train_images),
            "train_tokens": int(train[:, 1:].numel()),
            "heldout_tokens": int(test[:, 1:].size),
            "heldout_rule": "the official test split",
        },
        "tokenizer": {
            "kind": "k-means grey-level palette, raster order, start token first",
            "n_colors": cfg.n_colors,
            "palette": palette.tolist(),
            "start_token": start_id,
            "file": PALETTE_FILE,
        },
        "training": {
            **dataclasses.asdict(cfg),
            **result,
            "images_seen": result["tokens_seen"] // (SIDE * SIDE + 1),
            "objective": "next-pixel prediction on whole images (start token + 784 pixels)",
            "wall_time_s": round(time.perf_counter() - wall_start, 1),
        },
        "evaluation": evaluation,
        "command": common.command_line("image", out_dir, cfg),
        "environment": common.environment(),
        "notes": [
            "Losses are nats per pixel token; the unigram baseline predicts every pixel from the training palette frequencies.",
            "Unlike ImageGPT, the LayerNorms are GPT-2's (with bias and mean subtraction), so the "
            "weights load into GPT-2 blocks unchanged.",
        ],
    }
    common.write_card(out_dir, card)
    return card


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `--out` and one flag per ImageConfig field to `parser`."""
    parser.add_argument("--out", required=True, type=Path, help="directory to write the model to")
    common.add_config_flags(parser, ImageConfig())
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """`dtsweep pretrain image`: train and save; prints the card's evaluation."""
    card = pretrain_image(args.out, common.config_from_args(ImageConfig, args))
    print(json.dumps(card["evaluation"], indent=2))
    return 0

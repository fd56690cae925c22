"""Initialisations of the DT's GPT-2 backbone: random, pretrained, and single-block swaps.

Every init resolves to a `transformers.GPT2Model` with float32 weights:

    random      GPT-2's architecture (GPT2Config() defaults: 12 layers, 768 wide, 12 heads,
                gelu_new), random weights (HF's GPT-2 initialisation).
    random-ref  the released reference code's random baseline: same depth and width, but
                1 head and ReLU. (Not GPT-2's architecture: the papers call it "random".)
    gpt2        Hugging Face "gpt2" (12 layers, 768 wide).
    igpt        Hugging Face "openai/imagegpt-small" (24 layers, 512 wide), mapped into GPT-2
                blocks (see `imagegpt_to_gpt2`).
    clip        the text encoder of Hugging Face "openai/clip-vit-base-patch32" (12 layers, 512
                wide, 8 heads, quick-GELU), mapped exactly into GPT-2 blocks (dtsweep.models.clip).
    chibit      small text model shipped in dtsweep/assets/models/chibit/ (HF directory).
    igpt-mini   small image model shipped in dtsweep/assets/models/igpt-mini/ (HF directory).
    <path>      any local Hugging Face directory whose config.json has model_type gpt2, imagegpt,
                clip or clip_text_model (e.g. the output of `hf download gpt2 --local-dir <path>`).
                The names above win over a directory of the same name: write ./gpt2 for it.

Two things differ from the checkpoints as published, on purpose:
- the token embedding `wte` is dropped (replaced by a 1-row table, vocab_size=1): the DT feeds
  `inputs_embeds` and never reads it, and it would add 38.6M dead parameters to GPT-2's
  checkpoints and parameter counts. Reid's auxiliary objectives (dtsweep.train.auxiliary) need the table:
  `token_table(init)` reads it from the source model;
- the dropout rates are the DT's (default resid 0.2, attn 0.1, embd 0.1), not the checkpoint's.

Building is reproducible: `build_backbone(..., seed=s)` draws all random weights from a torch
RNG seeded with s inside `torch.random.fork_rng`, so the caller's global RNG is untouched.
Loading pretrained weights draws nothing from that stream, so a swap model's random blocks
equal those of the plain random model with the same seed.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import torch
from transformers import CLIPTextModel, GPT2Config, GPT2Model, ImageGPTModel

from dtsweep.models.clip import clip_text_to_gpt2
from dtsweep.models.dt import DecisionTransformer

ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets" / "models"

# Random inits: GPT2Config keyword arguments on top of GPT2Config()'s defaults.
RANDOM_INITS: dict[str, dict] = {
    "random": {},
    "random-ref": {"n_head": 1, "activation_function": "relu"},
}
# Hugging Face Hub inits: (repo id, n_layer, n_embd), so depth and width need no download.
HUB_INITS: dict[str, tuple[str, int, int]] = {
    "gpt2": ("gpt2", 12, 768),
    "igpt": ("openai/imagegpt-small", 24, 512),
    "clip": ("openai/clip-vit-base-patch32", 12, 512),
}
# Inits shipped inside the package as Hugging Face model directories.
ASSET_INITS = ("chibit", "igpt-mini")
INITS = (*RANDOM_INITS, *HUB_INITS, *ASSET_INITS)

OVERRIDABLE = ("n_layer", "n_embd", "n_head", "activation_function", "n_positions")
SUPPORTED_MODEL_TYPES = ("gpt2", "imagegpt", "clip", "clip_text_model")
FREEZE = ("none", "blocks")  # what `freeze` may name: nothing, or the whole backbone (Reid Table 5)

# GPT2Config fields that define the backbone's architecture, copied from a source config.
ARCHITECTURE_FIELDS = (
    "n_layer",
    "n_embd",
    "n_head",
    "n_inner",
    "n_positions",
    "activation_function",
    "layer_norm_epsilon",
    "scale_attn_weights",
    "scale_attn_by_inverse_layer_idx",
    "reorder_and_upcast_attn",
    "initializer_range",
)


class InitError(ValueError):
    """An initialisation that cannot be resolved or loaded (unknown name, missing asset,
    Hub model not reachable offline, invalid overrides or swap)."""


class Dropout(NamedTuple):
    """Dropout probabilities of the backbone: residual, attention and embedding."""

    resid: float = 0.2
    attn: float = 0.1
    embd: float = 0.1


def _as_dropout(dropout) -> Dropout:
    if isinstance(dropout, Mapping):
        return Dropout(**dropout)
    return Dropout(*dropout)


# ----------------------------------------------------------------------------- resolving names


def is_random_init(init: str) -> bool:
    """Whether `init` draws all its weights at random (and so accepts overrides and swaps)."""
    return init in RANDOM_INITS


# init as written -> (local copy, source as the driver recorded it) of init directories the
# driver published to the sweep's storage (`dtsweep.inputs`); set by `use_local_copies`.
_LOCAL_COPIES: dict[str, tuple[Path, str]] = {}


@contextlib.contextmanager
def use_local_copies(copies: dict[str, tuple[Path, str]]):
    """Inside the block, an init naming a directory of the driver's machine reads this node's
    verified copy of it (`dtsweep.inputs.fetch_inits`); `init_source` still names the driver's
    directory, so the trial's provenance is the same on every node."""
    before = dict(_LOCAL_COPIES)
    _LOCAL_COPIES.update(copies)
    try:
        yield
    finally:
        _LOCAL_COPIES.clear()
        _LOCAL_COPIES.update(before)


def _init_dir(init: str) -> Path | None:
    """The Hugging Face directory an init names (asset or local path), None for Hub/random."""
    if init in RANDOM_INITS or init in HUB_INITS:
        return None
    if init in _LOCAL_COPIES:
        return _LOCAL_COPIES[init][0]
    if init in ASSET_INITS:
        path = ASSETS_DIR / init
        if not (path / "config.json").is_file():
            raise InitError(
                f"init {init!r}: the packaged model is missing ({path}/config.json not found); "
                "it is produced by dtsweep's pretraining step and shipped under "
                "dtsweep/assets/models/"
            )
        return path
    path = Path(init).expanduser()
    if not path.is_dir():
        raise InitError(f"unknown init {init!r}: expected one of {list(INITS)} or a local Hugging Face model directory")
    if not (path / "config.json").is_file():
        raise InitError(f"init {init!r} is a directory without config.json, not a HF model")
    return path


def _read_dir_config(path: Path) -> dict:
    cfg = json.loads((path / "config.json").read_text())
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise InitError(f"{path}: model_type {model_type!r} is not supported; expected one of {SUPPORTED_MODEL_TYPES}")
    return cfg


# dtsweep's pretraining writes card.json with a `kind`; the family of such a model is the
# shipped model of that kind (a retrained or copied ChibiT is still a ChibiT).
CARD_KIND_FAMILIES = {"language": "chibit", "image": "igpt-mini"}
MODEL_TYPE_FAMILIES = {"gpt2": "gpt2", "imagegpt": "igpt", "clip": "clip", "clip_text_model": "clip"}


def init_family(init: str) -> str:
    """What an init *is*, read from its config and card, not from how it is named.

    random / random-ref: themselves. Hub names: gpt2, igpt, clip. A directory (shipped or any
    local path): a dtsweep card.json decides by its `kind` (language -> "chibit", image ->
    "igpt-mini"); without one, config.json's model_type does (gpt2 -> "gpt2", imagegpt ->
    "igpt", clip / clip_text_model -> "clip"). So `init: /models/gpt2` holding Hugging Face's
    GPT-2 is "gpt2", and a directory holding a dtsweep ChibiT is "chibit" whatever its name.
    The rule reads no weights: a GPT-2-typed directory without a dtsweep card is "gpt2"
    whatever its size (distilgpt2 too). InitError if the init resolves to nothing.
    """
    if init in RANDOM_INITS:
        return init
    if init in HUB_INITS:
        return MODEL_TYPE_FAMILIES[_HUB_MODEL_TYPES[init]]
    path = _init_dir(init)
    model_type = _read_dir_config(path)["model_type"]
    card = path / "card.json"
    if card.is_file():
        try:
            kind = json.loads(card.read_text()).get("kind")
        except ValueError as e:
            raise InitError(f"init {init!r}: {card} is not valid JSON ({e})") from None
        if kind in CARD_KIND_FAMILIES:
            return CARD_KIND_FAMILIES[kind]
    return MODEL_TYPE_FAMILIES[model_type]


def init_source(init: str) -> str:
    """Where an init's weights come from: "none" (random inits), "hf:<repo id>" (Hub),
    "shipped:<name>" (dtsweep/assets/models/<name>) or the absolute path of a local directory."""
    if init in RANDOM_INITS:
        return "none"
    if init in HUB_INITS:
        return f"hf:{HUB_INITS[init][0]}"
    if init in ASSET_INITS:
        return f"shipped:{init}"
    if init in _LOCAL_COPIES:
        return _LOCAL_COPIES[init][1]
    return str(_init_dir(init).resolve())


def _check_overrides(init: str, overrides: Mapping | None) -> dict:
    if not overrides:
        return {}
    if not is_random_init(init):
        raise InitError(f"overrides {dict(overrides)} apply only to random inits {list(RANDOM_INITS)}, not {init!r}")
    unknown = set(overrides) - set(OVERRIDABLE)
    if unknown:
        raise InitError(f"cannot override {sorted(unknown)}; allowed: {list(OVERRIDABLE)}")
    return dict(overrides)


def _random_config(init: str, overrides: Mapping | None) -> GPT2Config:
    config = GPT2Config(**{**RANDOM_INITS[init], **_check_overrides(init, overrides)})
    if config.n_embd % config.n_head:
        raise InitError(f"{init!r}: n_embd={config.n_embd} is not divisible by n_head={config.n_head}")
    return config


def backbone_depth(init: str, overrides: Mapping | None = None) -> int:
    """Number of transformer blocks of `init`, without downloading anything."""
    return _shape(init, overrides)[0]


def backbone_width(init: str, overrides: Mapping | None = None) -> int:
    """Hidden size H of `init`, without downloading anything."""
    return _shape(init, overrides)[1]


def _shape(init: str, overrides: Mapping | None) -> tuple[int, int]:
    if is_random_init(init):
        cfg = _random_config(init, overrides)
        return cfg.n_layer, cfg.n_embd
    _check_overrides(init, overrides)
    if init in HUB_INITS:
        _, n_layer, n_embd = HUB_INITS[init]
        return n_layer, n_embd
    cfg = _read_dir_config(_init_dir(init))
    if cfg["model_type"] == "clip":  # a whole CLIP model: the text encoder's shape
        cfg = cfg.get("text_config") or {}
        cfg = {"num_hidden_layers": cfg.get("num_hidden_layers", 12), "hidden_size": cfg.get("hidden_size", 512)}
    return (
        cfg.get("n_layer", cfg.get("num_hidden_layers")),
        cfg.get("n_embd", cfg.get("hidden_size")),
    )


# ----------------------------------------------------------------------------- loading


def _gpt2_config_like(source_config, dropout: Dropout) -> GPT2Config:
    """A GPT2Config with `source_config`'s block architecture, the DT's dropout, vocab 1."""
    arch = {field: getattr(source_config, field) for field in ARCHITECTURE_FIELDS}
    return GPT2Config(
        **arch,
        vocab_size=1,  # wte is never read by the DT (it feeds inputs_embeds)
        bos_token_id=None,
        eos_token_id=None,
        resid_pdrop=dropout.resid,
        attn_pdrop=dropout.attn,
        embd_pdrop=dropout.embd,
    )


def imagegpt_to_gpt2(source: ImageGPTModel, dropout: Dropout = Dropout()) -> GPT2Model:
    """Load an ImageGPT model's weights into GPT-2 blocks, as the papers' code did.

    Every tensor keeps its name (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj, wpe) and
    ImageGPT's activation (quick_gelu) is kept in the GPT2Config, so attention and MLP compute
    the same function. The layer norms do not: ImageGPT's LayerNorm is
    `x / sqrt(mean(x²) + eps) * weight` (no mean subtraction, no bias), GPT-2's is
    `(x - mean(x)) / sqrt(var(x) + eps) * weight + bias`. Their `weight`s are copied into GPT-2's
    LayerNorms with bias 0, so each block normalises centred activations instead of raw ones:
    the result equals ImageGPT only where the activations have zero mean over the features.
    `wte` is dropped (see the module docstring).
    """
    config = _gpt2_config_like(source.config, dropout)
    with torch.random.fork_rng(devices=[]):  # the fresh weights are all overwritten below
        target = GPT2Model(config)
    src = source.state_dict()
    state = {}
    for name, tensor in target.state_dict().items():
        if name == "wte.weight":
            state[name] = tensor
        elif name in src:
            if src[name].shape != tensor.shape:
                raise InitError(f"ImageGPT tensor {name} has shape {tuple(src[name].shape)}, GPT-2 expects {tuple(tensor.shape)}")
            state[name] = src[name]
        elif name.endswith(("ln_1.bias", "ln_2.bias")) or name == "ln_f.bias":
            state[name] = torch.zeros_like(tensor)  # ImageGPT's LayerNorm has no bias
        else:
            raise InitError(f"ImageGPT checkpoint has no tensor for GPT-2's {name}")
    target.load_state_dict(state, strict=True)
    return target


def gpt2_to_dt_backbone(source: GPT2Model, dropout: Dropout = Dropout()) -> GPT2Model:
    """Copy a pretrained GPT2Model into a fresh float32 one with the DT's dropout and no wte."""
    with torch.random.fork_rng(devices=[]):
        target = GPT2Model(_gpt2_config_like(source.config, dropout))
    src = source.state_dict()
    state = {name: (tensor if name == "wte.weight" else src[name]) for name, tensor in target.state_dict().items()}
    target.load_state_dict(state, strict=True)
    return target


# The transformers class each source is loaded with (the model without its head).
_MODEL_CLASSES = {
    "gpt2": GPT2Model,
    "imagegpt": ImageGPTModel,
    "clip": CLIPTextModel,  # from a whole CLIP model: its text encoder only
    "clip_text_model": CLIPTextModel,
}
_HUB_MODEL_TYPES = {"gpt2": "gpt2", "igpt": "imagegpt", "clip": "clip"}


def source_dir(init: str) -> Path | None:
    """The local Hugging Face directory an init names (shipped asset or path); None for Hub
    and random inits. InitError if it names none."""
    return _init_dir(init)


def load_source(init: str):
    """The pretrained model an init names, as published: a GPT2Model, ImageGPTModel or
    CLIPTextModel (float32, token embedding included), loaded without an RNG side effect.
    The DT backbone is built from it (`build_backbone`); Reid's auxiliary objectives read its
    token table (dtsweep.train.auxiliary)."""
    path = _init_dir(init)
    if path is None:
        if init not in HUB_INITS:
            raise InitError(f"{init!r} is not a pretrained init")
        repo = HUB_INITS[init][0]
        model_cls = _MODEL_CLASSES[_HUB_MODEL_TYPES.get(init, "gpt2")]
        try:
            with torch.random.fork_rng(devices=[]):
                return model_cls.from_pretrained(repo, dtype=torch.float32)
        except OSError as err:
            raise InitError(
                f"cannot load {init!r} (Hugging Face {repo!r}): not reachable and not cached. On a "
                f"machine with internet run `hf download {repo} --local-dir /path/to/{init}` "
                f"(older huggingface_hub: `huggingface-cli download ...`) "
                f"and use `init: /path/to/{init}`."
            ) from err
    model_cls = _MODEL_CLASSES[_read_dir_config(path)["model_type"]]
    try:
        with torch.random.fork_rng(devices=[]):
            return model_cls.from_pretrained(path, dtype=torch.float32)
    except OSError as err:
        raise InitError(f"cannot load init {init!r} from {path}: {err}") from err


def _load_pretrained(init: str, dropout: Dropout) -> GPT2Model:
    """Load a pretrained init (Hub name, asset or local directory) as a DT backbone."""
    source = load_source(init)
    if isinstance(source, ImageGPTModel):
        return imagegpt_to_gpt2(source, dropout)
    if isinstance(source, CLIPTextModel):
        return clip_text_to_gpt2(source, tuple(dropout))
    return gpt2_to_dt_backbone(source, dropout)


def token_table(init: str) -> torch.Tensor:
    """The token-embedding table [V, H] (float32) of a pretrained init, read from its source
    model (the DT backbone drops it). InitError for random inits, which have none."""
    if is_random_init(init):
        raise InitError(f"init {init!r} has no token-embedding table (its weights are random)")
    return load_source(init).get_input_embeddings().weight.detach().clone()


def language_model_problem(init: str) -> str | None:
    """None if `init` is a language model whose text dtsweep can tokenise (needed by Reid's
    LM co-training), else why not, in a phrase. Reads no weights."""
    if is_random_init(init):
        return f"init {init!r} has random weights: it is not a language model"
    if init == "gpt2":
        return None  # GPT-2's BPE ships offline with openai-whisper (dtsweep.pretrain.language)
    if init in HUB_INITS:
        return f"init {init!r} is not a language model (no next-token head on text)"
    path = _init_dir(init)
    model_type = _read_dir_config(path)["model_type"]
    if model_type != "gpt2":
        return f"init {init!r} ({model_type}) is not a GPT-2 language model"
    card = path / "card.json"
    kind = json.loads(card.read_text()).get("kind") if card.is_file() else None
    if kind not in (None, "language"):
        return f"init {init!r} is not a language model (its card.json says kind {kind!r})"
    if not any((path / f).is_file() for f in ("tokenizer.json", "vocab.json")):
        return f"init {init!r} has no tokenizer in {path} (tokenizer.json or vocab.json + merges.txt)"
    return None


def _block_architecture(config: GPT2Config) -> dict:
    """The config fields that determine what one block computes."""
    return {
        "n_embd": config.n_embd,
        "n_head": config.n_head,
        "n_inner": config.n_inner or 4 * config.n_embd,  # None means 4 * n_embd
        "activation_function": config.activation_function,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "scale_attn_weights": config.scale_attn_weights,
        "scale_attn_by_inverse_layer_idx": config.scale_attn_by_inverse_layer_idx,
    }


def _swap_in_block(target: GPT2Model, source: GPT2Model, block: int, source_name: str) -> None:
    """Copy block `block`'s tensors from `source` into `target` (same architecture required)."""
    n_layer = target.config.n_layer
    if not 0 <= block < n_layer:
        raise InitError(f"swap_block={block} is out of range for a {n_layer}-block model")
    if block >= source.config.n_layer:
        raise InitError(f"swap_from {source_name!r} has only {source.config.n_layer} blocks, no block {block}")
    # Heads and activation change the block's function without changing any tensor shape.
    target_arch = _block_architecture(target.config)
    source_arch = _block_architecture(source.config)
    mismatched = {f: (target_arch[f], source_arch[f]) for f in target_arch if target_arch[f] != source_arch[f]}
    if mismatched:
        raise InitError(
            f"cannot swap block {block} of {source_name!r} into this random model: "
            f"architectures differ (target, source): {mismatched}"
        )
    target_state = target.h[block].state_dict()
    source_state = source.h[block].state_dict()
    for name, tensor in target_state.items():
        if source_state[name].shape != tensor.shape:
            raise InitError(
                f"swap block {block}: {name} has shape {tuple(source_state[name].shape)} "
                f"in {source_name!r}, {tuple(tensor.shape)} in the random model"
            )
    target.h[block].load_state_dict(source_state, strict=True)


def _build_backbone(init, dropout, overrides, swap_block, swap_from) -> GPT2Model:
    """`build_backbone` without its RNG handling: draws random weights from the global RNG."""
    dropout = _as_dropout(dropout)
    if swap_block is not None and not is_random_init(init):
        raise InitError(f"swap_block needs a random init {list(RANDOM_INITS)}, not {init!r}")
    if is_random_init(init):
        backbone = GPT2Model(_gpt2_config_like(_random_config(init, overrides), dropout))
    else:
        _check_overrides(init, overrides)
        backbone = _load_pretrained(init, dropout)
    if swap_block is not None:
        if is_random_init(swap_from):
            raise InitError(f"swap_from must be a pretrained init, not {swap_from!r}")
        _swap_in_block(backbone, _load_pretrained(swap_from, dropout), swap_block, swap_from)
    return backbone


def build_backbone(
    init: str,
    *,
    seed: int,
    dropout: Dropout | tuple | Mapping = Dropout(),
    overrides: Mapping | None = None,
    swap_block: int | None = None,
    swap_from: str = "gpt2",
) -> GPT2Model:
    """Build the GPT2Model backbone named by `init` (see the module docstring for the names).

    Args:
        init: an init name or a local Hugging Face model directory.
        seed: seeds every random weight (in a forked torch RNG; the global RNG is untouched).
        dropout: (resid, attn, embd) probabilities; they replace a pretrained config's.
        overrides: GPT2Config fields among n_layer, n_embd, n_head, activation_function,
            n_positions, for the random inits only (e.g. tiny models for a quickstart).
        swap_block: with a random init, replace block i (any i, 0 included) by block i of
            `swap_from`. The two models must have the same block architecture.
        swap_from: the pretrained init the swapped block comes from.
    Raises InitError (a ValueError) for anything that cannot be resolved or loaded.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _build_backbone(init, dropout, overrides, swap_block, swap_from)


def build_decision_transformer(
    init: str,
    *,
    state_dim: int,
    act_dim: int,
    seed: int,
    context_len: int,
    dropout: Dropout | tuple | Mapping = Dropout(),
    overrides: Mapping | None = None,
    swap_block: int | None = None,
    swap_from: str = "gpt2",
    max_ep_len: int = 1000,
    position_embeddings: bool = False,
    timestep_embedding: str = "after_ln",
    extend_positions: bool = False,
    freeze: str = "none",
) -> DecisionTransformer:
    """Build a DecisionTransformer whose epoch-0 weights depend only on the arguments.

    The backbone is built as by `build_backbone(init, seed=seed, ...)` (identical weights), then
    the DT's embeddings and action head draw the next numbers of the same seeded stream.
    `context_len` K is checked against the backbone: with position_embeddings=True the 3K
    tokens need 3K <= n_positions (1024 for gpt2 and igpt: K up to 341; chibit 256, clip 77).
    extend_positions: the backbone's position table serves as the timestep embedding
        (Reid et al. Table 6; see dtsweep.models.dt).
    freeze: "none", or "blocks": the whole backbone frozen, only the input embeddings and the
        action head train (Reid et al. Table 5; `DecisionTransformer.freeze_backbone`).
    """
    if context_len < 1:
        raise ValueError(f"context_len must be >= 1, got {context_len}")
    if freeze not in FREEZE:
        raise ValueError(f"freeze must be one of {FREEZE}, got {freeze!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = _build_backbone(init, dropout, overrides, swap_block, swap_from)
        n_positions = backbone.config.n_positions
        if position_embeddings and 3 * context_len > n_positions:
            raise InitError(
                f"context_len={context_len} needs {3 * context_len} positions, but {init!r} has n_positions={n_positions}"
            )
        model = DecisionTransformer(
            backbone,
            state_dim,
            act_dim,
            max_ep_len=max_ep_len,
            position_embeddings=position_embeddings,
            timestep_embedding=timestep_embedding,
            extend_positions=extend_positions,
        )
    if freeze == "blocks":
        model.freeze_backbone()
    return model


def backbone_config_dict(model: DecisionTransformer) -> dict:
    """JSON-serialisable architecture of `model` (backbone GPT2Config + DT options).

    Stored with a checkpoint, `DecisionTransformer.from_config_dict(d, state_dim, act_dim)`
    rebuilds the same modules without any download, ready for `load_state_dict`.
    """
    return model.config_dict()

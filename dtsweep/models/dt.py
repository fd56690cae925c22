"""The Decision Transformer over a Hugging Face `GPT2Model`, readable top to bottom.

One trajectory window of K timesteps becomes 3K tokens, interleaved per timestep:

    R̂_1, s_1, a_1, R̂_2, s_2, a_2, ..., R̂_K, s_K, a_K

Returns-to-go, states and actions each get their own linear embedding; every token of
timestep t also gets a learned timestep embedding (the episode step, 0..max_ep_len-1). A
causal GPT-2 stack runs over the 3K tokens, and the action a_t is predicted from the final
hidden state of the state token s_t (which sees R̂_≤t, s_≤t, a_<t but not a_t).

Reference details reproduced (Chen et al.'s DT, Reid et al.'s and Takagi's code) and how:

- Position embeddings: the reference vendored a copy of HF's GPT-2 with the addition of `wpe`
  commented out, so the token stream carried only the timestep embedding. `GPT2Model` always
  adds `wpe`; with `position_embeddings=False` (the default) the DT swaps `transformer.wpe`
  for `NoPositionEmbedding`, which returns zeros and keeps the loaded table as its `.weight`
  (same state-dict key, same tensor, frozen unless reused as below).
- Position reuse (`extend_positions=True`, Reid et al. Table 6): the backbone's position table
  *is* the timestep embedding (one shared, trained Parameter under both `transformer.wpe.weight`
  and `embed_timestep.weight`), as in Reid's code, where `embed_timestep = transformer.wpe`.
  A table shorter than max_ep_len (ChibiT's 256 positions, CLIP's 77) is extended by tiling:
  row t is the pretrained row t mod n_positions. (Reid's code kept rows 0-1 out of the
  repetition, a RoBERTa/Longformer habit that means nothing for GPT-2's table.) The default,
  a fresh randomly initialised timestep table, is Reid's "rand. pos. emb." ablation.
- Frozen backbone (`freeze_backbone()`, Reid et al. Table 5): every backbone tensor is frozen;
  the return/state/action/timestep embeddings, `embed_ln` and the action head train. (Reid's
  code froze the blocks `transformer.h` only and so also trained `ln_f`: 2H numbers.)
- Timestep embedding: added after the embedding LayerNorm (`"after_ln"`, Reid's code, which
  Takagi follows) or before it (`"before_ln"`, the original DT).
- Parameter names match the reference DT (`transformer.*`, `embed_timestep`, `embed_return`,
  `embed_state`, `embed_action`, `embed_ln`, `predict_action.0`), minus its unused state and
  return heads.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from transformers import GPT2Config, GPT2Model

TIMESTEP_EMBEDDINGS = ("after_ln", "before_ln")

# The internal activations of a GPT-2 block that Takagi's CKA analysis compares, in the order
# the block computes them. `mlp.act` is an nn.Module in transformers (ACT2FN builds a fresh
# activation module per block), so it can be hooked like the others.
BLOCK_ACTIVATIONS = (
    "ln_1",
    "attn.c_attn",
    "attn.c_proj",
    "attn.resid_dropout",
    "ln_2",
    "mlp.c_fc",
    "mlp.act",
    "mlp.c_proj",
    "mlp.dropout",
)


class NoPositionEmbedding(nn.Module):
    """Stands in for `GPT2Model.wpe` so that no position embedding is added to the tokens.

    `forward(position_ids [..., T]) -> zeros [..., T, H]`. The backbone's position table is
    kept as `.weight` (state-dict key `transformer.wpe.weight`, exactly as with the real
    embedding). It is frozen (`frozen=True`) when nothing reads it; the DT passes
    `frozen=False` when the table serves as its timestep embedding (`extend_positions`).
    """

    def __init__(self, weight: nn.Parameter, *, frozen: bool = True):
        super().__init__()
        self.weight = weight
        self.weight.requires_grad_(not frozen)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return self.weight.new_zeros(*position_ids.shape, self.weight.shape[-1])

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, outputs zeros"


def _tiled_positions(table: torch.Tensor, rows: int) -> torch.Tensor:
    """`table` [n, H] extended to at least `rows` rows: row t is table[t mod n]. A table of
    `rows` rows or more is returned as it is (a copy)."""
    n = table.shape[0]
    if n >= rows:
        return table.clone()
    return table[torch.arange(rows) % n].clone()


@dataclass
class DTOutput:
    """What `DecisionTransformer.forward` returns (B batch, K timesteps, H width, A actions).

    action_preds:  [B, K, A] predicted actions in (-1, 1), one per timestep, from the state token.
    last_hidden:   [B, 3K, H] final hidden states (after the backbone's ln_f), token order
                   R̂_1, s_1, a_1, R̂_2, ...
    token_embeddings: [B, 3K, H] the return/state/action embeddings after `embed_ln`, before
                   the timestep embedding is added ("after_ln"; with "before_ln" the timestep
                   is inside the LayerNorm's input): what Reid's cosine loss compares with
                   the language embeddings (`dtsweep.train.auxiliary`).
    hidden_states: with output_hidden_states, n_layer + 1 tensors [B, 3K, H]: the input of
                   block 0 (embeddings after embd dropout), then each block's output, the last
                   one after ln_f; else None.
    attentions:    with output_attentions, n_layer tensors [B, heads, 3K, 3K] of attention
                   probabilities (rows sum to 1). A padded query token has no key it may
                   attend to, and its row comes out uniform over all 3K keys: exclude padded
                   query rows from attention statistics. Valid queries never attend to padding.
    """

    action_preds: torch.Tensor
    last_hidden: torch.Tensor
    token_embeddings: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@contextmanager
def eager_attention(backbone: GPT2Model):
    """Run `backbone` with eager attention inside the block, then restore its implementation.

    SDPA (the default, used for training) does not return attention probabilities; transformers
    reads `config._attn_implementation` at every forward, so switching is cheap and exact.
    """
    previous = backbone.config._attn_implementation
    if previous == "eager":
        yield
        return
    backbone.set_attn_implementation("eager")
    try:
        yield
    finally:
        backbone.set_attn_implementation(previous)


class DecisionTransformer(nn.Module):
    """Decision Transformer (Chen et al., 2021) over a `transformers.GPT2Model` backbone.

    Args:
        backbone: a GPT2Model (see `dtsweep.models.build_backbone`); the DT takes ownership and,
            with position_embeddings=False, replaces its `wpe` by `NoPositionEmbedding`.
        state_dim, act_dim: S and A, the sizes of one observation and one action.
        max_ep_len: size of the timestep embedding table; timesteps must lie in [0, max_ep_len).
        position_embeddings: False (the reference DT) adds no backbone position embedding to the
            tokens; True keeps `GPT2Model`'s addition of `wpe` (then 3K must be <= n_positions).
        timestep_embedding: "after_ln" adds the timestep embedding after `embed_ln` (Reid et al.,
            Takagi); "before_ln" adds it before (the original DT).
        extend_positions: the backbone's position table becomes the timestep embedding,
            tiled to max_ep_len rows when shorter (see the module docstring). Needs
            position_embeddings=False: the table would otherwise be added twice.
    """

    def __init__(
        self,
        backbone: GPT2Model,
        state_dim: int,
        act_dim: int,
        *,
        max_ep_len: int = 1000,
        position_embeddings: bool = False,
        timestep_embedding: str = "after_ln",
        extend_positions: bool = False,
    ):
        super().__init__()
        if not isinstance(backbone, GPT2Model):
            raise TypeError(f"backbone must be a transformers.GPT2Model, got {type(backbone).__name__}")
        if timestep_embedding not in TIMESTEP_EMBEDDINGS:
            raise ValueError(f"timestep_embedding must be one of {TIMESTEP_EMBEDDINGS}, got {timestep_embedding!r}")
        if extend_positions and position_embeddings:
            raise ValueError(
                "extend_positions reuses the backbone's position table as the timestep embedding; "
                "with position_embeddings=True it would be added twice"
            )
        self.state_dim = state_dim
        self.act_dim = act_dim
        self.max_ep_len = max_ep_len
        self.position_embeddings = position_embeddings
        self.timestep_embedding = timestep_embedding
        self.extend_positions = extend_positions
        hidden = backbone.config.n_embd
        self.hidden_size = hidden

        if extend_positions:
            table = _tiled_positions(backbone.wpe.weight.detach(), max_ep_len)
            backbone.config.n_positions = table.shape[0]  # so that from_config_dict rebuilds it
            backbone.wpe = NoPositionEmbedding(nn.Parameter(table), frozen=False)
        elif not position_embeddings and not isinstance(backbone.wpe, NoPositionEmbedding):
            backbone.wpe = NoPositionEmbedding(backbone.wpe.weight)
        if position_embeddings and isinstance(backbone.wpe, NoPositionEmbedding):
            raise ValueError("backbone.wpe was already neutralised; build a fresh backbone")
        # Windows are always fed whole; a KV cache would only cost memory.
        backbone.config.use_cache = False
        self.transformer = backbone

        self.embed_timestep = nn.Embedding(max_ep_len, hidden)
        if extend_positions:
            # Drawn above all the same, so that the other heads' initial weights do not depend
            # on this option: the ablation changes the timestep table only.
            self.embed_timestep.weight = backbone.wpe.weight
        self.embed_return = nn.Linear(1, hidden)
        self.embed_state = nn.Linear(state_dim, hidden)
        self.embed_action = nn.Linear(act_dim, hidden)
        self.embed_ln = nn.LayerNorm(hidden)
        self.predict_action = nn.Sequential(nn.Linear(hidden, act_dim), nn.Tanh())

    def forward(
        self,
        states: torch.Tensor,
        actions: torch.Tensor,
        returns_to_go: torch.Tensor,
        timesteps: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> DTOutput:
        """Predict the action of every timestep of a batch of windows.

        Args:
            states:         [B, K, S] float, normalised observations.
            actions:        [B, K, A] float, actions in [-1, 1] (padding value is the caller's).
            returns_to_go:  [B, K, 1] float, scaled returns-to-go.
            timesteps:      [B, K] long, episode step of each timestep, in [0, max_ep_len).
            attention_mask: [B, K], 1 for valid timesteps, 0 for padding (None: all valid).
                Each timestep's mask covers its 3 tokens; padded tokens are never attended to.
            output_attentions: also return attention probabilities (runs eager attention).
            output_hidden_states: also return every block's hidden states.
        """
        batch, k = states.shape[:2]
        hidden = self.hidden_size

        time = self.embed_timestep(timesteps)[:, :, None]  # [B, K, 1, H], shared by the 3 tokens
        returns = self.embed_return(returns_to_go)
        tokens = torch.stack((returns, self.embed_state(states), self.embed_action(actions)), dim=2)
        # tokens: [B, K, 3, H], the order R̂_t, s_t, a_t within each timestep
        if self.timestep_embedding == "before_ln":
            tokens = token_embeddings = self.embed_ln(tokens + time)
        else:
            token_embeddings = self.embed_ln(tokens)  # what Reid's cosine loss sees
            tokens = token_embeddings + time
        tokens = tokens.reshape(batch, 3 * k, hidden)

        if attention_mask is None:
            attention_mask = torch.ones(batch, k, dtype=torch.bool, device=states.device)
        token_mask = attention_mask.to(torch.bool).repeat_interleave(3, dim=1)  # [B, 3K]

        with eager_attention(self.transformer) if output_attentions else nullcontext():
            out = self.transformer(
                inputs_embeds=tokens,
                attention_mask=token_mask,
                use_cache=False,
                output_attentions=output_attentions,
                output_hidden_states=output_hidden_states,
            )

        last_hidden = out.last_hidden_state  # [B, 3K, H]
        state_tokens = last_hidden.reshape(batch, k, 3, hidden)[:, :, 1]  # [B, K, H]
        return DTOutput(
            action_preds=self.predict_action(state_tokens),
            last_hidden=last_hidden,
            token_embeddings=token_embeddings.reshape(batch, 3 * k, hidden),
            hidden_states=out.hidden_states if output_hidden_states else None,
            attentions=out.attentions if output_attentions else None,
        )

    def activation_modules(self) -> dict[str, nn.Module]:
        """The 9 internal activations per block that Takagi's CKA analysis compares.

        Returns an insertion-ordered dict, block by block, of names relative to the backbone
        ("h.0.ln_1", "h.0.attn.c_attn", ..., "h.{n-1}.mlp.dropout"; 9 × n_layer entries) to the
        modules whose forward outputs are those activations ([B, 3K, H], except attn.c_attn
        [B, 3K, 3H] and mlp.c_fc / mlp.act [B, 3K, n_inner]). In eval mode the dropout
        modules output their input (attn.resid_dropout == attn.c_proj, mlp.dropout == mlp.c_proj),
        as in the reference analysis.
        """
        modules = dict(self.transformer.named_modules())
        return {
            f"h.{i}.{name}": modules[f"h.{i}.{name}"]
            for i in range(self.transformer.config.n_layer)
            for name in BLOCK_ACTIVATIONS
        }

    def freeze_backbone(self) -> None:
        """Freeze the backbone (blocks, ln_f, position table): Reid et al.'s frozen setting.

        Afterwards only the input embeddings (return, state, action, timestep, `embed_ln`) and
        the action head have requires_grad; with extend_positions the position table is the
        timestep embedding and keeps training.
        """
        for p in self.transformer.parameters():
            p.requires_grad_(False)
        if self.extend_positions:
            self.embed_timestep.weight.requires_grad_(True)

    def config_dict(self) -> dict:
        """JSON-serialisable description of the architecture; see `from_config_dict`."""
        return {
            "gpt2_config": self.transformer.config.to_dict(),
            "max_ep_len": self.max_ep_len,
            "position_embeddings": self.position_embeddings,
            "timestep_embedding": self.timestep_embedding,
            "extend_positions": self.extend_positions,
        }

    @classmethod
    def from_config_dict(cls, d: dict, state_dim: int, act_dim: int) -> DecisionTransformer:
        """Rebuild the architecture described by `config_dict()` with no download.

        The weights are freshly initialised (drawn in a forked RNG, so the caller's global
        torch RNG is untouched); load a checkpoint's state dict into the result.
        """
        with torch.random.fork_rng(devices=[]):
            backbone = GPT2Model(GPT2Config.from_dict(d["gpt2_config"]))
            return cls(
                backbone,
                state_dim,
                act_dim,
                max_ep_len=d["max_ep_len"],
                position_embeddings=d["position_embeddings"],
                timestep_embedding=d["timestep_embedding"],
                extend_positions=d.get("extend_positions", False),  # absent before issue 9
            )

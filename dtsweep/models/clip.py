"""CLIP's text encoder as a GPT-2 backbone: Reid et al.'s `clip` initialisation.

Reid et al. initialise the DT with the text encoder of `openai/clip-vit-base-patch32`
(12 layers, 512 wide, 8 heads, quick-GELU, causal attention; the image encoder is discarded).
CLIP's text encoder layer and GPT-2's block compute the same function:

    x = x + out_proj(attention(layer_norm1(x)))        x = x + c_proj(attention(ln_1(x)))
    x = x + fc2(quick_gelu(fc1(layer_norm2(x))))       x = x + c_proj(act(c_fc(ln_2(x))))

with causal self-attention scaled by 1/sqrt(head_dim) on both sides, and LayerNorms that
subtract the mean and have a bias on both sides (unlike ImageGPT's, see `imagegpt_to_gpt2`).
So the weights map one to one and the mapping is exact (equal outputs up to float rounding):

    CLIPTextModel                                   GPT2Model
    embeddings.token_embedding      [V, H]          dropped (wte has 1 row; the DT feeds
                                                    inputs_embeds); dtsweep.train.auxiliary reads it from
                                                    the source model when it needs it
    embeddings.position_embedding   [77, H]         wpe (n_positions = 77)
    encoder.layers.i.layer_norm1                    h.i.ln_1
    encoder.layers.i.self_attn.{q,k,v}_proj         h.i.attn.c_attn: the three nn.Linear weights
                                                    transposed (Conv1D stores [in, out]) and
                                                    concatenated q | k | v, biases likewise
    encoder.layers.i.self_attn.out_proj             h.i.attn.c_proj (transposed)
    encoder.layers.i.layer_norm2                    h.i.ln_2
    encoder.layers.i.mlp.fc1, mlp.fc2               h.i.mlp.c_fc, h.i.mlp.c_proj (transposed)
    final_layer_norm                                ln_f

Config: n_layer, n_embd, n_head, n_inner, layer_norm_epsilon and n_positions are CLIP's
num_hidden_layers, hidden_size, num_attention_heads, intermediate_size, layer_norm_eps and
max_position_embeddings; activation_function is CLIP's hidden_act (quick_gelu). Dropout is
the DT's (CLIP has attention dropout 0 and no residual dropout).

CLIP's 77 positions are few for a DT: with `position_embeddings=True` the 3K tokens must fit
(K <= 25); the default (no position embeddings) and `extend_positions` (the table tiled to the
episode length) have no such limit.
"""

from __future__ import annotations

import torch
from transformers import CLIPTextModel, GPT2Config, GPT2Model


def clip_text_to_gpt2(source: CLIPTextModel, dropout: tuple[float, float, float] = (0.2, 0.1, 0.1)) -> GPT2Model:
    """A float32 GPT2Model computing what `source`'s encoder computes (see the module docstring).

    Args:
        source: a CLIPTextModel (e.g. `CLIPTextModel.from_pretrained("openai/clip-vit-base-patch32")`).
        dropout: (resid, attn, embd) probabilities of the returned model.
    Returns a GPT2Model with CLIP's blocks, position table and final LayerNorm, and a 1-row wte.
    """
    c = source.config
    resid, attn, embd = dropout
    config = GPT2Config(
        vocab_size=1,  # wte is never read by the DT (it feeds inputs_embeds)
        n_positions=c.max_position_embeddings,
        n_embd=c.hidden_size,
        n_layer=c.num_hidden_layers,
        n_head=c.num_attention_heads,
        n_inner=c.intermediate_size,
        activation_function=c.hidden_act,
        layer_norm_epsilon=c.layer_norm_eps,
        bos_token_id=None,
        eos_token_id=None,
        resid_pdrop=resid,
        attn_pdrop=attn,
        embd_pdrop=embd,
    )
    with torch.random.fork_rng(devices=[]):  # every fresh weight is overwritten below
        target = GPT2Model(config)

    src = {name: t.detach().float() for name, t in source.state_dict().items()}
    state = {
        "wte.weight": target.wte.weight.detach(),
        "wpe.weight": src["embeddings.position_embedding.weight"],
        "ln_f.weight": src["final_layer_norm.weight"],
        "ln_f.bias": src["final_layer_norm.bias"],
    }
    for i in range(c.num_hidden_layers):
        layer, block = f"encoder.layers.{i}.", f"h.{i}."
        qkv = [f"{layer}self_attn.{p}_proj" for p in "qkv"]
        state.update(
            {
                f"{block}ln_1.weight": src[f"{layer}layer_norm1.weight"],
                f"{block}ln_1.bias": src[f"{layer}layer_norm1.bias"],
                f"{block}attn.c_attn.weight": torch.cat([src[f"{p}.weight"].T for p in qkv], dim=1),
                f"{block}attn.c_attn.bias": torch.cat([src[f"{p}.bias"] for p in qkv]),
                f"{block}attn.c_proj.weight": src[f"{layer}self_attn.out_proj.weight"].T,
                f"{block}attn.c_proj.bias": src[f"{layer}self_attn.out_proj.bias"],
                f"{block}ln_2.weight": src[f"{layer}layer_norm2.weight"],
                f"{block}ln_2.bias": src[f"{layer}layer_norm2.bias"],
                f"{block}mlp.c_fc.weight": src[f"{layer}mlp.fc1.weight"].T,
                f"{block}mlp.c_fc.bias": src[f"{layer}mlp.fc1.bias"],
                f"{block}mlp.c_proj.weight": src[f"{layer}mlp.fc2.weight"].T,
                f"{block}mlp.c_proj.bias": src[f"{layer}mlp.fc2.bias"],
            }
        )
    target.load_state_dict({k: v.contiguous() for k, v in state.items()}, strict=True)
    return target

"""The DT model layer on tiny real models: GPT-2 and ImageGPT directories written with
save_pretrained, random inits with overrides. Offline, a few seconds on one CPU thread."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import shutil

import huggingface_hub.constants
import pytest
import torch
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPT2Model,
    ImageGPTConfig,
    ImageGPTForCausalImageModeling,
    ImageGPTModel,
)

from dtsweep.models import (
    BLOCK_ACTIVATIONS,
    DecisionTransformer,
    InitError,
    NoPositionEmbedding,
    backbone_config_dict,
    backbone_depth,
    backbone_width,
    backbones,
    build_backbone,
    build_decision_transformer,
)

torch.set_num_threads(1)

TINY = {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 64}
S, A, B, K = 5, 3, 4, 6


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A tiny pretrained-style GPT-2 LM directory, as the chibit asset will be shipped."""
    path = tmp_path_factory.mktemp("tiny-gpt2")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        GPT2LMHeadModel(GPT2Config(vocab_size=50, **TINY)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def igpt_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-igpt")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(321)
        model = ImageGPTForCausalImageModeling(ImageGPTConfig(vocab_size=17, **TINY))
        # Non-trivial LayerNorm weights, so the mapping test can tell tensors apart.
        for name, p in model.named_parameters():
            if "ln_" in name:
                p.data.uniform_(0.5, 1.5)
        model.save_pretrained(path)
    return path


def tiny_dt(init="random", seed=0, **kwargs):
    kwargs.setdefault("overrides", TINY if init in ("random", "random-ref") else None)
    kwargs.setdefault("context_len", K)
    return build_decision_transformer(init, state_dim=S, act_dim=A, seed=seed, **kwargs).eval()


def batch(k=K, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "states": torch.randn(B, k, S, generator=g),
        "actions": torch.rand(B, k, A, generator=g) * 2 - 1,
        "returns_to_go": torch.randn(B, k, 1, generator=g),
        "timesteps": torch.arange(k).repeat(B, 1) + 10,
        "attention_mask": torch.ones(B, k, dtype=torch.long),
    }


def block_tensors(model: GPT2Model, i: int) -> dict:
    return {n: t.clone() for n, t in model.h[i].state_dict().items()}


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# ---------------------------------------------------------------------------- inits


def test_random_inits_have_their_architectures():
    gpt2_like = build_backbone("random", seed=0, overrides=TINY)
    assert (gpt2_like.config.n_head, gpt2_like.config.activation_function) == (2, "gelu_new")
    assert type(gpt2_like.h[0].mlp.act).__name__ == "NewGELUActivation"
    ref = build_backbone("random-ref", seed=0, overrides={"n_layer": 2, "n_embd": 32})
    assert (ref.config.n_layer, ref.config.n_embd, ref.config.n_head) == (2, 32, 1)
    assert isinstance(ref.h[0].mlp.act, nn.ReLU)
    # The DT's dropout, and the unused token embedding reduced to one row.
    assert (ref.config.resid_pdrop, ref.config.attn_pdrop, ref.config.embd_pdrop) == (0.2, 0.1, 0.1)
    assert ref.h[1].attn.resid_dropout.p == 0.2 and ref.h[1].attn.attn_dropout.p == 0.1
    assert ref.wte.weight.shape == (1, 32)
    custom = build_backbone("random", seed=0, overrides=TINY, dropout=(0.0, 0.05, 0.3))
    assert (custom.config.resid_pdrop, custom.config.attn_pdrop, custom.config.embd_pdrop) == (0.0, 0.05, 0.3)


def test_depth_and_width_without_download(gpt2_dir, igpt_dir):
    assert (backbone_depth("random"), backbone_width("random")) == (12, 768)
    assert (backbone_depth("random-ref"), backbone_width("random-ref")) == (12, 768)
    assert (backbone_depth("gpt2"), backbone_width("gpt2")) == (12, 768)
    assert (backbone_depth("igpt"), backbone_width("igpt")) == (24, 512)
    assert backbone_depth("random", {"n_layer": 3}) == 3
    assert (backbone_depth(str(gpt2_dir)), backbone_width(str(gpt2_dir))) == (2, 32)
    assert (backbone_depth(str(igpt_dir)), backbone_width(str(igpt_dir))) == (2, 32)


def test_invalid_inits_and_overrides_are_rejected(gpt2_dir, tmp_path):
    with pytest.raises(InitError, match="only to random inits"):
        build_backbone(str(gpt2_dir), seed=0, overrides={"n_layer": 1})
    with pytest.raises(InitError, match="only to random inits"):
        backbone_depth("gpt2", {"n_layer": 1})
    with pytest.raises(InitError, match="cannot override"):
        build_backbone("random", seed=0, overrides={"vocab_size": 3})
    with pytest.raises(InitError, match="not divisible"):
        backbone_depth("random", {"n_embd": 30, "n_head": 4})
    with pytest.raises(InitError, match="unknown init"):
        build_backbone("gtp2", seed=0)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(InitError, match="model_type 'bert'"):
        build_backbone(str(tmp_path), seed=0)
    assert issubclass(InitError, ValueError)


def test_gpt2_directory_loads_its_weights(gpt2_dir):
    backbone = build_backbone(str(gpt2_dir), seed=0)
    saved = GPT2Model.from_pretrained(gpt2_dir).state_dict()
    for name, tensor in backbone.state_dict().items():
        if name != "wte.weight":
            assert torch.equal(tensor, saved[name]), name
    assert backbone.wte.weight.shape == (1, 32)
    assert backbone.config.resid_pdrop == 0.2  # the DT's, not the checkpoint's 0.1


def test_imagegpt_weights_land_in_gpt2_blocks(igpt_dir):
    backbone = build_backbone(str(igpt_dir), seed=0).eval()
    source = ImageGPTModel.from_pretrained(igpt_dir).eval()
    assert backbone.config.activation_function == "quick_gelu"
    assert (backbone.config.n_layer, backbone.config.n_head) == (2, 2)
    src = source.state_dict()
    for i in range(2):
        for name in (
            "ln_1.weight",
            "ln_2.weight",
            "attn.c_attn.weight",
            "attn.c_attn.bias",
            "attn.c_proj.weight",
            "mlp.c_fc.weight",
            "mlp.c_proj.bias",
        ):
            assert torch.equal(backbone.state_dict()[f"h.{i}.{name}"], src[f"h.{i}.{name}"])
        assert torch.count_nonzero(backbone.h[i].ln_1.bias) == 0
        assert torch.count_nonzero(backbone.h[i].ln_2.bias) == 0
    assert torch.equal(backbone.ln_f.weight, source.ln_f.weight)
    assert torch.equal(backbone.wpe.weight, source.wpe.weight)

    # What the docstring says changes: ImageGPT's LayerNorm does not centre, GPT-2's does.
    x = torch.randn(4, 32) + 3.0
    gpt2_ln, igpt_ln = backbone.h[0].ln_1, source.h[0].ln_1
    assert not torch.allclose(gpt2_ln(x), igpt_ln(x), atol=1e-3)
    centred = x - x.mean(-1, keepdim=True)
    torch.testing.assert_close(gpt2_ln(centred), igpt_ln(centred), atol=1e-5, rtol=1e-5)
    # Attention and MLP are the same function in both.
    h = torch.randn(1, 5, 32)
    torch.testing.assert_close(backbone.h[0].mlp(h), source.h[0].mlp(h))


def test_packaged_assets_load_or_say_they_are_missing(gpt2_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(backbones, "ASSETS_DIR", tmp_path)
    with pytest.raises(InitError, match="packaged model is missing"):
        build_backbone("chibit", seed=0)
    with pytest.raises(InitError, match="packaged model is missing"):
        backbone_depth("igpt-mini")
    shutil.copytree(gpt2_dir, tmp_path / "chibit")
    assert backbone_depth("chibit") == 2
    assert build_backbone("chibit", seed=0).config.n_embd == 32


def test_unreachable_hub_model_says_how_to_use_a_local_directory(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setitem(backbones.HUB_INITS, "gpt2", ("dtsweep-tests/never-cached", 12, 768))
    with pytest.raises(InitError, match="--local-dir /path/to/gpt2"):
        build_backbone("gpt2", seed=0)


# ---------------------------------------------------------------------------- forward


def test_output_shapes_and_context_lengths():
    dt = tiny_dt()
    for k in (1, K):
        out = dt(**batch(k))
        assert out.action_preds.shape == (B, k, A)
        assert out.last_hidden.shape == (B, 3 * k, 32)
        assert out.hidden_states is None and out.attentions is None
        assert out.action_preds.abs().max() < 1
    out = dt(**batch(), output_hidden_states=True)
    assert len(out.hidden_states) == 3 and torch.equal(out.hidden_states[-1], out.last_hidden)
    # K = 60 (180 tokens) beyond n_positions = 64: fine without position embeddings...
    assert tiny_dt(context_len=60)(**batch(60)).action_preds.shape == (B, 60, A)
    # ...but not with them.
    with pytest.raises(InitError, match="n_positions=64"):
        tiny_dt(context_len=60, position_embeddings=True)
    assert tiny_dt(context_len=21, position_embeddings=True)(**batch(21)).action_preds.shape == (B, 21, A)


def test_future_tokens_do_not_change_past_predictions():
    dt = tiny_dt()
    x = batch()
    before = dt(**x).action_preds
    x["states"][:, 3] += 5.0  # s_3 affects predictions from timestep 3 on
    x["actions"][:, 2] += 1.0  # a_2 comes after s_2: affects timesteps 3 onwards only
    after = dt(**x).action_preds
    torch.testing.assert_close(after[:, :3], before[:, :3], rtol=0, atol=1e-6)
    assert not torch.allclose(after[:, 3:], before[:, 3:], atol=1e-3)


def test_padded_timesteps_are_ignored():
    dt = tiny_dt()
    x = batch()
    x["attention_mask"][:, :2] = 0  # left padding, as in training
    before = dt(**x).action_preds
    for key in ("states", "actions", "returns_to_go"):
        x[key][:, :2] = torch.randn_like(x[key][:, :2]) * 10
    x["timesteps"][:, :2] = 0
    after = dt(**x).action_preds
    torch.testing.assert_close(after[:, 2:], before[:, 2:], rtol=0, atol=1e-6)
    # Without the mask the same change is seen.
    x.pop("attention_mask")
    assert not torch.allclose(dt(**x).action_preds[:, 2:], before[:, 2:], atol=1e-3)


@pytest.mark.parametrize("position_embeddings", [False, True])
def test_position_embeddings_option(position_embeddings):
    dt = tiny_dt(position_embeddings=position_embeddings)
    assert isinstance(dt.transformer.wpe, NoPositionEmbedding) != position_embeddings
    assert "transformer.wpe.weight" in dt.state_dict()  # the table is kept either way
    x = batch()
    before = dt(**x).action_preds
    with torch.no_grad():
        dt.transformer.wpe.weight.add_(torch.randn_like(dt.transformer.wpe.weight))
    after = dt(**x).action_preds
    assert torch.equal(after, before) != position_embeddings


def test_timestep_embedding_placement():
    x = batch()
    after = tiny_dt(timestep_embedding="after_ln")
    before = tiny_dt(timestep_embedding="before_ln")
    before.load_state_dict(after.state_dict())
    assert not torch.allclose(after(**x).action_preds, before(**x).action_preds, atol=1e-4)
    with pytest.raises(ValueError, match="timestep_embedding"):
        tiny_dt(timestep_embedding="none")


def test_attentions_are_causal_probabilities():
    dt = tiny_dt()
    x = batch()
    x["attention_mask"][0, :2] = 0
    sdpa = dt(**x)
    out = dt(**x, output_attentions=True)
    assert dt.transformer.config._attn_implementation == "sdpa"  # restored for training
    assert len(out.attentions) == 2
    for attn in out.attentions:
        assert attn.shape == (B, 2, 3 * K, 3 * K)
        torch.testing.assert_close(attn.sum(-1), torch.ones(B, 2, 3 * K))
        assert torch.all(attn[1:].triu(diagonal=1) == 0)
        assert torch.all(attn[0, :, 6:].triu(diagonal=1 + 6) == 0)
        assert torch.all(attn[0, :, 6:, :6] == 0)  # valid queries never look at padding
        # A padded query has nothing to attend to: HF's eager softmax makes its row uniform.
        torch.testing.assert_close(attn[0, :, :6], torch.full((2, 6, 3 * K), 1 / (3 * K)))
    torch.testing.assert_close(out.action_preds[:, 2:], sdpa.action_preds[:, 2:], rtol=1e-5, atol=1e-5)


def test_activation_modules_cover_nine_activations_per_block():
    dt = tiny_dt()
    modules = dt.activation_modules()
    assert len(modules) == 9 * 2
    assert list(modules)[:9] == [f"h.0.{n}" for n in BLOCK_ACTIVATIONS]
    assert list(modules)[-1] == "h.1.mlp.dropout"
    assert len({id(m) for m in modules.values()}) == 18
    seen = {}
    handles = [m.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o.shape)) for n, m in modules.items()]
    dt(**batch())
    for h in handles:
        h.remove()
    assert seen.keys() == modules.keys()
    assert seen["h.1.ln_2"] == (B, 3 * K, 32)
    assert seen["h.0.attn.c_attn"] == (B, 3 * K, 96)
    assert seen["h.1.mlp.act"] == (B, 3 * K, 128)


def test_training_step_with_padding_has_finite_gradients():
    dt = tiny_dt().train()
    x = batch()
    x["attention_mask"][:2, :3] = 0  # fully masked query rows must not poison the backward
    x["actions"][:2, :3] = -10.0
    out = dt(**x)
    valid = x["attention_mask"].bool()
    ((out.action_preds - x["actions"]) ** 2)[valid].mean().backward()
    grads = [p.grad for p in dt.parameters() if p.grad is not None]
    assert all(torch.isfinite(g).all() for g in grads)
    assert dt.transformer.wpe.weight.grad is None  # position table disabled: untouched
    assert dt.transformer.h[0].ln_1.weight.grad is not None
    assert dt.embed_timestep.weight.grad is not None


# ---------------------------------------------------------------------------- swap, seeds, rebuild


@pytest.mark.parametrize("block", [0, 1])
def test_swap_block_copies_exactly_one_block(gpt2_dir, block):
    swapped = build_backbone("random", seed=7, overrides=TINY, swap_block=block, swap_from=str(gpt2_dir))
    plain = build_backbone("random", seed=7, overrides=TINY)
    source = GPT2Model.from_pretrained(gpt2_dir)
    other = 1 - block
    assert_same(block_tensors(swapped, block), block_tensors(source, block))
    assert_same(block_tensors(swapped, other), block_tensors(plain, other))
    assert not torch.equal(plain.h[block].attn.c_attn.weight, source.h[block].attn.c_attn.weight)
    assert torch.equal(swapped.ln_f.weight, plain.ln_f.weight)


def test_invalid_swaps_are_rejected(gpt2_dir):
    with pytest.raises(InitError, match="out of range"):
        build_backbone("random", seed=0, overrides=TINY, swap_block=2, swap_from=str(gpt2_dir))
    with pytest.raises(InitError, match="needs a random init"):
        build_backbone(str(gpt2_dir), seed=0, swap_block=0, swap_from=str(gpt2_dir))
    with pytest.raises(InitError, match="architectures differ"):
        build_backbone("random", seed=0, overrides={**TINY, "n_embd": 48}, swap_block=0, swap_from=str(gpt2_dir))
    # Same tensor shapes, different function (1 head, ReLU): refused too.
    with pytest.raises(InitError, match="n_head"):
        build_backbone("random-ref", seed=0, overrides={"n_layer": 2, "n_embd": 32}, swap_block=0, swap_from=str(gpt2_dir))


def test_building_is_seeded_and_leaves_the_global_rng_alone(gpt2_dir):
    rng = torch.get_rng_state()
    a, b, c = tiny_dt(seed=3).state_dict(), tiny_dt(seed=3).state_dict(), tiny_dt(seed=4).state_dict()
    assert torch.equal(torch.get_rng_state(), rng)
    assert_same(a, b)
    assert not torch.equal(a["transformer.h.0.attn.c_attn.weight"], c["transformer.h.0.attn.c_attn.weight"])
    assert not torch.equal(a["embed_state.weight"], c["embed_state.weight"])
    # The DT's backbone is exactly build_backbone's; pretrained DTs differ by seed only in the heads.
    backbone = build_backbone("random", seed=3, overrides=TINY).state_dict()
    for name, tensor in backbone.items():
        if name != "wpe.weight":
            assert torch.equal(a[f"transformer.{name}"], tensor), name
    p3, p4 = tiny_dt(str(gpt2_dir), seed=3).state_dict(), tiny_dt(str(gpt2_dir), seed=4).state_dict()
    assert torch.equal(p3["transformer.h.1.mlp.c_fc.weight"], p4["transformer.h.1.mlp.c_fc.weight"])
    assert not torch.equal(p3["embed_action.weight"], p4["embed_action.weight"])


@pytest.mark.parametrize("init", ["random", "igpt"])
def test_config_dict_rebuilds_the_architecture(init, igpt_dir):
    dt = tiny_dt(init if init == "random" else str(igpt_dir), timestep_embedding="before_ln", max_ep_len=50)
    d = json.loads(json.dumps(backbone_config_dict(dt)))
    rebuilt = DecisionTransformer.from_config_dict(d, S, A).eval()
    rebuilt.load_state_dict(dt.state_dict(), strict=True)
    assert isinstance(rebuilt.transformer.wpe, NoPositionEmbedding)
    assert rebuilt.transformer.config.activation_function == dt.transformer.config.activation_function
    x = batch()
    x["timesteps"] = x["timesteps"] % 50
    torch.testing.assert_close(rebuilt(**x).action_preds, dt(**x).action_preds, rtol=0, atol=0)

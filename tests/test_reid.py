"""Reid et al.'s techniques and the CLIP init on tiny real models, offline: the spec syntax and
trial ids, CLIP's exact mapping into GPT-2 blocks, position reuse, context 60 for every kind of
init, frozen blocks and the auxiliary objectives in a real TrialRunner step, and the plan of
sweeps/reid.yaml."""

import copy
import hashlib
import json
import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
import yaml
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2Model,
)

from dtsweep import cli
from dtsweep.models import (
    DecisionTransformer,
    InitError,
    NoPositionEmbedding,
    backbone_depth,
    backbone_width,
    backbones,
    build_backbone,
    build_decision_transformer,
)
from dtsweep.spec import Aux, KMeansCosine, LMCotrain, SpecError, Trial, load_spec, parse_spec

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
CHIBIT = backbones.ASSETS_DIR / "chibit"
TINY = {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 64}
CLIP_TEXT = {"vocab_size": 99, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
             "num_attention_heads": 4, "max_position_embeddings": 40, "bos_token_id": 0, "eos_token_id": 2,
             "pad_token_id": 1}  # fmt: skip
S, A, B = 11, 3, 4


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A tiny GPT-2 language model with chibit's tokenizer (7680 tokens), 32 positions."""
    path = tmp_path_factory.mktemp("tiny-gpt2")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        GPT2LMHeadModel(GPT2Config(vocab_size=7680, n_layer=2, n_embd=16, n_head=2, n_positions=32,
                                   bos_token_id=7679, eos_token_id=7679)).save_pretrained(path)  # fmt: skip
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(CHIBIT / name, path / name)
    return path


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny CLIPTextModel directory, LayerNorms and biases made non-trivial so that a wrong
    mapping shows."""
    path = tmp_path_factory.mktemp("tiny-clip-text")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(12)
        model = CLIPTextModel(CLIPTextConfig(**CLIP_TEXT))
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.data.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.data.normal_(0, 0.1)
        model.save_pretrained(path)
    return path


def dt_batch(k, seed=0, pad=2):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, k)
    mask[0, :pad] = 0
    return {
        "states": torch.randn(B, k, S, generator=g),
        "actions": torch.rand(B, k, A, generator=g) * 2 - 1,
        "returns_to_go": torch.randn(B, k, 1, generator=g),
        "timesteps": torch.randint(0, 1000, (B, 1), generator=g).clamp(max=1000 - k) + torch.arange(k),
        "attention_mask": mask,
    }


def train_one_step(dt, k):
    """One AdamW step on the masked action MSE of a K=k batch; returns (loss, parameters before)."""
    dt.train()
    before = {n: p.detach().clone() for n, p in dt.named_parameters()}
    opt = torch.optim.AdamW([p for p in dt.parameters() if p.requires_grad], lr=1e-3)
    x = dt_batch(k)
    mask = x["attention_mask"][..., None]
    loss = (((dt(**x).action_preds - x["actions"]) ** 2) * mask).sum() / (mask.sum() * A)
    loss.backward()
    opt.step()
    return loss, before


# ---------------------------------------------------------------------------- spec


def spec_with(**study):
    return {"name": "t", "storage": "runs",
            "studies": [{"name": "a", "dataset": "hopper-medium", "seed": [0], **study}]}  # fmt: skip


# Trial ids of a spec without Reid's techniques, computed by the code before they existed
# (commit df928c2). Adding the fields must not change them.
PINNED = {
    "name": "pin",
    "studies": [
        {"name": "a", "init": ["random", "gpt2", "chibit"], "dataset": ["hopper-medium", "walker2d-medium"],
         "context_len": [1, 20], "seed": [0, 3]},
        {"name": "b", "init": "random", "dataset": "halfcheetah-random", "swap_block": [0, 5], "seed": [1],
         "train": {"epochs": 10, "warmup_steps": 5000, "grad_clip": "off", "position_embeddings": True,
                   "dropout": 0.1}},
    ],
}  # fmt: skip
PINNED_FIRST = ["871730e8309dce14", "e3939d7d515a8c77", "3281ae898829f4ae"]
PINNED_DIGEST = "0c10087893098618"  # sha256 of all 26 ids joined, first 16 hex digits


def digest(trials):
    return hashlib.sha256("".join(t.trial_id for t in trials).encode()).hexdigest()[:16]


def test_spec_syntax_for_reids_techniques():
    t = parse_spec(spec_with(init="chibit", train={
        "freeze": "blocks", "extend_positions": True,
        "aux": {"kmeans_cosine": {"weight": 0.2, "clusters": 500, "anneal_steps": 1000}, "lm_cotrain": 0.4},
    })).trials()[0]  # fmt: skip
    assert (t.train.freeze, t.train.extend_positions) == ("blocks", True)
    assert t.train.aux == Aux(KMeansCosine(weight=0.2, clusters=500, anneal_steps=1000), LMCotrain(weight=0.4))
    assert Trial.from_dict(json.loads(json.dumps(t.to_dict()))) == t

    defaults = parse_spec(spec_with(init="gpt2", train={"aux": {"kmeans_cosine": True, "lm_cotrain": "off"}}))
    assert defaults.trials()[0].train.aux == Aux(kmeans_cosine=KMeansCosine(0.1, 1000, 5000))
    lm = parse_spec(spec_with(init="chibit", train={"aux": {"lm_cotrain": {"corpus": "wikitext-103", "seq_len": 128,
                                                                           "batch_size": 4, "documents": 100}}}))  # fmt: skip
    assert lm.trials()[0].train.aux.lm_cotrain == LMCotrain(corpus="wikitext-103", seq_len=128, batch_size=4,
                                                            documents=100)  # fmt: skip


def test_trial_ids_of_existing_specs_are_unchanged():
    trials = parse_spec(PINNED).trials()
    assert [t.trial_id for t in trials[:3]] == PINNED_FIRST and digest(trials) == PINNED_DIGEST
    # The new fields written out at their defaults change nothing either.
    explicit = copy.deepcopy(PINNED)
    for st in explicit["studies"]:
        st.setdefault("train", {}).update(freeze="none", extend_positions=False,
                                          aux={"kmeans_cosine": None, "lm_cotrain": "off"})  # fmt: skip
    assert digest(parse_spec(explicit).trials()) == PINNED_DIGEST
    # A trial dict written before the fields existed (trials.parquet of an old sweep) keeps its id.
    d = trials[0].to_dict()
    for key in ("freeze", "extend_positions", "aux"):
        del d["train"][key]
    assert Trial.from_dict(d).trial_id == trials[0].trial_id == PINNED_FIRST[0]

    ids = {t.trial_id for t in parse_spec(spec_with(init="chibit")).trials()}
    for train in ({"freeze": "blocks"}, {"extend_positions": True}, {"aux": {"kmeans_cosine": 0.1}},
                  {"aux": {"kmeans_cosine": 0.2}}, {"aux": {"lm_cotrain": True}}):  # fmt: skip
        changed = {t.trial_id for t in parse_spec(spec_with(init="chibit", train=train)).trials()}
        assert changed.isdisjoint(ids), train


@pytest.mark.parametrize(
    "study, needle",
    [
        ({"init": ["gpt2", "random"], "train": {"aux": {"kmeans_cosine": 0.1}}},
         "studies[0].train.aux.kmeans_cosine: init 'random' has no token-embedding table to cluster"),
        ({"init": ["chibit", "igpt"], "train": {"aux": {"lm_cotrain": True}}},
         "train.aux.lm_cotrain: init 'igpt' is not a language model"),
        ({"init": "clip", "train": {"aux": {"lm_cotrain": 0.2}}}, "init 'clip' is not a language model"),
        ({"init": "igpt-mini", "train": {"aux": {"lm_cotrain": 0.2}}}, "its card.json says kind 'image'"),
        ({"init": "random-ref", "train": {"aux": {"lm_cotrain": 0.2}}}, "init 'random-ref' has random weights"),
        ({"init": "chibit", "train": {"freeze": "all"}}, "train.freeze: 'all' is not valid; expected 'none' or 'blocks'"),
        ({"init": "chibit", "train": {"extend_positions": True, "position_embeddings": True}},
         "train.extend_positions: true is not valid with position_embeddings: true"),
        ({"init": "chibit", "train": {"aux": {"kmeans_cosine": {"weight": 0}}}},
         "aux.kmeans_cosine.weight: 0 is not valid; expected a number > 0.0"),
        ({"init": "chibit", "train": {"aux": {"kmeans_cosine": {"clusters": 0}}}}, "clusters: 0 is not valid"),
        ({"init": "chibit", "train": {"aux": {"lm_cotrain": {"corpus": "wikitext"}}}}, "did you mean 'wikitext-103'?"),
        ({"init": "chibit", "train": {"aux": {"kmeans": 0.1}}}, "aux.kmeans: unknown key; did you mean 'kmeans_cosine'?"),
        ({"init": "chibit", "train": {"aux": {"lm_cotrain": "yes"}}}, "expected a mapping of its settings"),
    ],
)  # fmt: skip
def test_techniques_are_refused_where_they_cannot_apply(study, needle):
    with pytest.raises(SpecError) as e:
        parse_spec(spec_with(**study))
    assert needle in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------- CLIP


def test_clip_text_encoder_maps_exactly_into_gpt2_blocks(clip_dir):
    clip = CLIPTextModel.from_pretrained(clip_dir).eval()
    backbone = build_backbone(str(clip_dir), seed=0).eval()
    c = backbone.config
    assert (c.n_layer, c.n_embd, c.n_head, c.n_inner, c.n_positions) == (2, 32, 4, 48, 40)
    assert c.activation_function == "quick_gelu" and backbone.wte.weight.shape == (1, 32)
    assert (backbone_depth(str(clip_dir)), backbone_width(str(clip_dir))) == (2, 32)
    g = torch.Generator().manual_seed(0)
    for length in (40, 7):
        ids = torch.randint(3, 99, (3, length), generator=g)
        expected = clip(input_ids=ids).last_hidden_state
        got = backbone(inputs_embeds=clip.embeddings.token_embedding(ids)).last_hidden_state
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_whole_clip_model_directory_gives_its_text_encoder(tmp_path):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(13)
        vision = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 4,
                  "image_size": 32, "patch_size": 16}  # fmt: skip
        whole = CLIPModel(CLIPConfig(text_config=CLIP_TEXT, vision_config=vision))
        whole.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "clip"
    assert (backbone_depth(str(tmp_path)), backbone_width(str(tmp_path))) == (2, 32)
    backbone = build_backbone(str(tmp_path), seed=0)
    assert torch.equal(backbone.h[1].mlp.c_fc.weight, whole.text_model.encoder.layers[1].mlp.fc1.weight.T)


def test_clip_offline_says_how_to_use_a_local_directory(monkeypatch):
    assert (backbone_depth("clip"), backbone_width("clip")) == (12, 512)  # no download needed
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setitem(backbones.HUB_INITS, "clip", ("dtsweep-tests/never-cached-clip", 12, 512))
    with pytest.raises(InitError, match="hf download dtsweep-tests/never-cached-clip --local-dir /path/to/clip"):
        build_backbone("clip", seed=0)


# ---------------------------------------------------------------------------- context 60, position reuse


@pytest.mark.parametrize("extend_positions", [False, True])
@pytest.mark.parametrize("init", ["random", "gpt2_dir", "clip_dir"])
def test_context_60_builds_and_trains_for_every_kind_of_init(init, extend_positions, request):
    """Reid's Table 4: K=60 is 180 tokens, beyond the 32, 40 and 64 positions of these models."""
    name = str(request.getfixturevalue(init)) if init.endswith("_dir") else init
    dt = build_decision_transformer(name, state_dim=S, act_dim=A, seed=0, context_len=60,
                                    overrides=TINY if init == "random" else None,
                                    extend_positions=extend_positions)  # fmt: skip
    loss, before = train_one_step(dt, 60)
    assert torch.isfinite(loss)
    after = dict(dt.named_parameters())
    for key in ("transformer.h.0.attn.c_attn.weight", "embed_state.weight", "predict_action.0.weight"):
        assert not torch.equal(after[key], before[key]), key
    timestep_table = "transformer.wpe.weight" if extend_positions else "embed_timestep.weight"
    assert not torch.equal(after[timestep_table], before[timestep_table])
    assert dt(**dt_batch(60)).action_preds.shape == (B, 60, A)


def test_extend_positions_makes_the_position_table_the_timestep_embedding(gpt2_dir):
    source = GPT2Model.from_pretrained(gpt2_dir).wpe.weight.detach()  # [32, 16]
    dt = build_decision_transformer(str(gpt2_dir), state_dim=S, act_dim=A, seed=4, context_len=5,
                                    max_ep_len=100, extend_positions=True).eval()  # fmt: skip
    table = dt.transformer.wpe.weight
    assert dt.embed_timestep.weight is table and table.requires_grad
    assert isinstance(dt.transformer.wpe, NoPositionEmbedding)  # not added as positions on the DT path
    assert table.shape == (100, 16) and dt.transformer.config.n_positions == 100
    assert torch.equal(table, source[torch.arange(100) % 32])  # tiled: row t is row t mod 32
    assert sum(p is table for p in dt.parameters()) == 1  # one tensor for the optimizer

    # The ablation ("rand. pos. emb."): a fresh timestep table, every other weight identical.
    ablation = build_decision_transformer(str(gpt2_dir), state_dim=S, act_dim=A, seed=4, context_len=5,
                                          max_ep_len=100).eval()  # fmt: skip
    for name, tensor in ablation.state_dict().items():
        if name not in ("transformer.wpe.weight", "embed_timestep.weight"):
            assert torch.equal(tensor, dt.state_dict()[name]), name
    assert not torch.equal(ablation.embed_timestep.weight, table)
    assert not ablation.transformer.wpe.weight.requires_grad

    # A checkpoint rebuilds offline with the table still shared.
    d = json.loads(json.dumps(dt.config_dict()))
    rebuilt = DecisionTransformer.from_config_dict(d, S, A).eval()
    rebuilt.load_state_dict(dt.state_dict(), strict=True)
    assert rebuilt.embed_timestep.weight is rebuilt.transformer.wpe.weight
    x = dt_batch(5)
    x["timesteps"] = x["timesteps"] % 95
    torch.testing.assert_close(rebuilt(**x).action_preds, dt(**x).action_preds, rtol=0, atol=0)
    with pytest.raises(ValueError, match="added twice"):
        build_decision_transformer(str(gpt2_dir), state_dim=S, act_dim=A, seed=0, context_len=5,
                                   position_embeddings=True, extend_positions=True)  # fmt: skip


def test_freeze_blocks_leaves_only_embeddings_and_head_trainable(gpt2_dir):
    for extend in (False, True):
        dt = build_decision_transformer(str(gpt2_dir), state_dim=S, act_dim=A, seed=0, context_len=5,
                                        freeze="blocks", extend_positions=extend)  # fmt: skip
        trainable = {n for n, p in dt.named_parameters() if p.requires_grad}
        expected = {f"{m}.{w}" for m in ("embed_return", "embed_state", "embed_action", "embed_ln", "predict_action.0")
                    for w in ("weight", "bias")}  # fmt: skip
        expected.add("transformer.wpe.weight" if extend else "embed_timestep.weight")  # the timestep table
        assert trainable == expected
    with pytest.raises(ValueError, match="freeze must be one of"):
        build_decision_transformer(str(gpt2_dir), state_dim=S, act_dim=A, seed=0, context_len=5, freeze="all")


# ---------------------------------------------------------------------------- a real training step


def test_frozen_backbone_and_objectives_in_a_trial_runner_step(gpt2_dir, data_cache, tmp_path, monkeypatch):
    """One TrialRunner epoch of 2 steps with everything on: frozen backbone tensors unchanged,
    the embeddings, head and shared timestep table changed, the LM token table trained; and the
    objectives' state survives a resume."""
    from dtsweep.store import Store
    from dtsweep.train.loop import TrialRunner

    monkeypatch.setenv("DTSWEEP_CACHE_DIR", str(tmp_path / "cache"))
    raw = spec_with(
        init=str(gpt2_dir), dataset="hopper-random", context_len=5,
        data={"steps": 3000, "seed": 0}, eval={"action_error_samples": 16},
        train={"epochs": 1, "steps_per_epoch": 2, "batch_size": 8, "warmup_steps": 1, "freeze": "blocks",
               "extend_positions": True,
               "aux": {"kmeans_cosine": {"clusters": 16}, "lm_cotrain": {"documents": 20, "batch_size": 2}}},
    )  # fmt: skip
    (trial,) = parse_spec(raw).trials()
    store = Store(str(tmp_path / "sweep"))
    runner = TrialRunner(trial, store, device=torch.device("cpu"))
    in_optimizer = {id(p) for group in runner.optimizer.param_groups for p in group["params"]}
    assert id(runner.model.transformer.h[0].attn.c_attn.weight) not in in_optimizer
    assert id(runner.aux.language.wte) in in_optimizer

    before = {n: p.detach().clone() for n, p in runner.model.named_parameters()}
    wte = runner.aux.language.wte.detach().clone()
    loss = runner.train_epoch()
    assert 0 < loss < 10  # the action MSE alone (actions in [-1, 1])
    for name, p in runner.model.named_parameters():
        frozen = name.startswith("transformer.") and name != "transformer.wpe.weight"
        assert torch.equal(p, before[name]) == frozen, name
    assert not torch.equal(runner.aux.language.wte, wte)

    state = runner.resume_state()
    again = TrialRunner(trial, store, device=torch.device("cpu"))
    again.load_resume_state(state)
    assert torch.equal(again.aux.language.wte, runner.aux.language.wte)
    assert torch.equal(again.aux.language.sample(), runner.aux.language.sample())  # same text next


# ---------------------------------------------------------------------------- the sweep


def test_reid_plan_lists_every_condition(capsys):
    assert (CHIBIT / "config.json").is_file()  # a shipped asset
    spec = load_spec(ROOT / "sweeps" / "reid.yaml")
    trials = spec.trials()
    cond = {}
    for t in trials:
        aux = t.train.aux
        key = (t.init, t.env, t.context_len, t.train.freeze, t.train.extend_positions,
               aux.kmeans_cosine and aux.kmeans_cosine.weight, aux.lm_cotrain and aux.lm_cotrain.weight)  # fmt: skip
        cond.setdefault(key, set()).add(t.seed)
    assert all(seeds == set(range(5)) for seeds in cond.values())
    envs = ("hopper", "halfcheetah", "walker2d")
    full = ("none", True, 0.1, 0.2)
    expected = (
        {(i, e, 20, *full) for i in ("chibit", "gpt2") for e in envs}  # Table 2
        | {(i, e, 20, "none", True, 0.1, None) for i in ("clip", "igpt") for e in envs}
        | {("random-ref", e, k, "none", False, None, None) for e in envs for k in (20, 60)}  # Tables 2, 4
        | {("chibit", e, 60, *full) for e in envs}  # Table 4
        | {("chibit", e, 20, "blocks", True, 0.1, 0.2) for e in envs}  # Table 5
        | {("chibit", e, 20, "none", True, None, 0.2) for e in envs}  # Table 6: w/o L_cos
        | {("chibit", e, 20, "none", True, 0.1, None) for e in envs}  # w/o L_LM
        | {("chibit", e, 20, "none", False, 0.1, 0.2) for e in envs}  # rand. pos. emb.
    )
    assert set(cond) == expected and len(trials) == 5 * len(expected) == 165
    assert all(t.dataset.endswith("-medium") for t in trials)
    assert {t.model.get("n_embd") for t in trials if t.init == "random-ref"} == {128}

    assert cli.main(["plan", str(ROOT / "sweeps" / "reid.yaml"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["total_trials"] == 165 and {r["trial_id"] for r in out["trials"]} == {t.trial_id for t in trials}
    assert out["studies"] == {"language": 30, "clip-igpt": 30, "dt": 30, "chibit-k60": 15, "chibit-frozen": 15,
                              "chibit-no-cos": 15, "chibit-no-lm": 15, "chibit-rand-pos": 15}  # fmt: skip
    assert yaml.safe_load((ROOT / "sweeps" / "reid.yaml").read_text())["name"] == "reid"

"""Reid et al.'s auxiliary objectives (dtsweep.train.auxiliary) on real tiny models and the real offline
corpus: the cosine loss against a direct computation and within memory, the anneal, k-means
and its cache, and LM co-training as the language model's own loss."""

import json
import multiprocessing
import resource
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from dtsweep.models import InitError, build_backbone, build_decision_transformer
from dtsweep.models.backbones import ASSETS_DIR
from dtsweep.spec import Aux, KMeansCosine, LMCotrain
from dtsweep.train import auxiliary as aux
from dtsweep.train.auxiliary import (
    AuxiliaryObjectives,
    LanguageCotraining,
    anneal,
    build_auxiliary,
    kmeans_cosine_loss,
    language_tokens,
    spherical_kmeans,
    table_centers,
)

torch.set_num_threads(1)

CHIBIT = ASSETS_DIR / "chibit"
VOCAB = 7680  # chibit's tokenizer, reused by the tiny language model below


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DTSWEEP_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    """A tiny GPT-2 language model with chibit's tokenizer (so it reads the real corpus)."""
    path = tmp_path_factory.mktemp("tiny-lm")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_layer=2, n_embd=16, n_head=2, n_positions=32,
                                   bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)).save_pretrained(path)  # fmt: skip
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(CHIBIT / name, path / name)
    return path


def direct_loss(e, c, mask=None):
    """Eq. 8 spelled out: normalise, every pairwise cosine, max over centres, masked mean, negate."""
    e = e / e.norm(dim=-1, keepdim=True)
    c = c / c.norm(dim=-1, keepdim=True)
    cos = torch.einsum("btd,cd->btc", e, c)
    best = cos.max(dim=-1).values
    if mask is None:
        return -best.mean()
    return -(best * mask).sum() / mask.sum()


# ---------------------------------------------------------------------------- the cosine loss


def test_kmeans_cosine_loss_equals_the_direct_computation():
    g = torch.Generator().manual_seed(0)
    e = torch.randn(3, 7, 16, generator=g, requires_grad=True)
    c = (torch.randn(5, 16, generator=g) * 3).requires_grad_()  # unnormalised centres
    mask = torch.ones(3, 7)
    mask[0, :4] = 0
    for m in (None, mask):
        ours = kmeans_cosine_loss(e, c, m)
        ref = direct_loss(e, c, m)
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
        g_ours = torch.autograd.grad(ours, (e, c))
        g_ref = torch.autograd.grad(ref, (e, c))
        for a, b in zip(g_ours, g_ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # Masked tokens do not count: changing them changes nothing.
    e2 = e.detach().clone()
    e2[0, :4] = torch.randn(4, 16)
    torch.testing.assert_close(kmeans_cosine_loss(e2, c, mask), kmeans_cosine_loss(e, c, mask))
    # Embeddings on a centre's direction give the minimum, -1.
    assert kmeans_cosine_loss(c.detach()[None, :3] * 2.5, c.detach()).item() == pytest.approx(-1.0, abs=1e-6)


def _peak_memory_of_loss(conn):
    """In a forked child: bytes that one forward + backward at Reid's scale adds to the peak RSS."""
    e = torch.randn(64, 60, 768, requires_grad=True)
    c = torch.randn(1000, 768)
    mask = torch.ones(64, 60)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kmeans_cosine_loss(e, c, mask).backward()
    conn.send((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)  # Linux: KiB


def test_kmeans_cosine_loss_memory_at_reid_scale():
    """B=64, T=60, C=1000, D=768 forward and backward on CPU: the 4-D tensor of Reid's code
    would be 64·60·1000·768·4 B = 11.8 GB. Peak RSS measured in a forked process."""
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_peak_memory_of_loss, args=(child,))
    proc.start()
    peak = parent.recv()
    proc.join(timeout=60)
    print(f"peak memory added by forward+backward: {peak / 2**20:.1f} MiB")
    assert proc.exitcode == 0
    assert peak < 256 * 2**20  # the [3840, 1000] similarities (15 MB) and their gradient, not 11.8 GB


# ---------------------------------------------------------------------------- the anneal


def test_anneal_schedule():
    assert anneal(0) > 0.99 and anneal(0) == pytest.approx(0.9933, abs=1e-4)
    assert anneal(2500) == pytest.approx(0.5)
    assert anneal(5000) < 0.01
    assert anneal(10_000) < 1e-6
    values = [anneal(s) for s in range(0, 10_001, 500)]
    assert values == sorted(values, reverse=True)
    assert anneal(500, steps=1000) == pytest.approx(0.5)  # the schedule scales with anneal_steps

    objectives = AuxiliaryObjectives(KMeansCosine(weight=0.2), torch.randn(4, 8))
    for step, expected in ((0, 0.2 * 0.99331), (2500, 0.1), (5000, 0.2 * 0.0066929)):
        assert objectives.weights(step)["kmeans_cosine"] == pytest.approx(expected, rel=1e-4)


# ---------------------------------------------------------------------------- k-means


def test_spherical_kmeans_finds_directions_not_magnitudes():
    g = torch.Generator().manual_seed(1)
    directions = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    labels = torch.arange(4).repeat_interleave(50)
    # Points near each direction, with magnitudes from 0.1 to 10: cosine k-means ignores them.
    points = (directions[labels] + 0.05 * torch.randn(200, 8, generator=g)) * torch.logspace(-1, 1, 200)[:, None]
    centers = spherical_kmeans(points, 4, seed=0)
    assert centers.shape == (4, 8)
    torch.testing.assert_close(centers.norm(dim=-1), torch.ones(4))
    match = (centers @ directions.T).max(dim=0).values  # each true direction has a centre on it
    assert (match > 0.99).all()
    assign = (F.normalize(points, dim=-1) @ centers.T).argmax(1)
    assert all(len(set(assign[labels == i].tolist())) == 1 for i in range(4))
    # No more rows than clusters: the normalised table itself (Eq. 8 exactly).
    torch.testing.assert_close(spherical_kmeans(points[:10], 16), F.normalize(points[:10], dim=-1))


def test_centers_are_cached_per_table(cache, monkeypatch):
    table = torch.randn(300, 8, generator=torch.Generator().manual_seed(2))
    first = table_centers(table, 20)
    files = list((cache / "kmeans").glob("*.safetensors"))
    assert len(files) == 1 and files[0].name.endswith("-k20-s0.safetensors")

    def never(*args, **kwargs):
        raise AssertionError("k-means ran again although its result is cached")

    monkeypatch.setattr(aux, "spherical_kmeans", never)
    assert torch.equal(table_centers(table.clone(), 20), first)
    with pytest.raises(AssertionError, match="ran again"):
        table_centers(table + 1e-3, 20)  # another table: another key


def test_build_auxiliary_clusters_the_source_token_table(lm_dir):
    objectives = build_auxiliary(str(lm_dir), Aux(kmeans_cosine=KMeansCosine(clusters=32)), seed=0)
    assert objectives.centers.shape == (32, 16) and objectives.language is None
    assert list(objectives.parameters()) == [] and objectives.state_dict() == {}  # centres are derived, not saved
    table = GPT2LMHeadModel.from_pretrained(lm_dir).transformer.wte.weight.detach()
    torch.testing.assert_close(objectives.centers, table_centers(table, 32))
    assert build_auxiliary(str(lm_dir), Aux(), seed=0) is None
    with pytest.raises(InitError, match="no token-embedding table"):
        build_auxiliary("random", Aux(kmeans_cosine=KMeansCosine()), seed=0)
    with pytest.raises(InitError, match="not a language model"):
        build_auxiliary("igpt-mini", Aux(lm_cotrain=LMCotrain()), seed=0)


# ---------------------------------------------------------------------------- LM co-training


def test_language_tokens_are_the_corpus_in_the_init_tokenizer(lm_dir, cache):
    from transformers import AutoTokenizer

    from dtsweep.pretrain.language import news_articles

    stream = language_tokens(str(lm_dir), "news", documents=3)
    tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    eot = tokenizer.eos_token_id
    assert stream.dtype == np.int32 and (stream == eot).sum() == 3 and stream[-1] == eot
    first = stream[: int(np.flatnonzero(stream == eot)[0])]
    assert tokenizer.decode(first) == news_articles()[0][0]
    assert len(list((cache / "lm").glob("*-news-3.npy"))) == 1
    assert np.array_equal(language_tokens(str(lm_dir), "news", documents=3), stream)


def test_language_path_is_the_language_models_own_loss(lm_dir):
    """Through the DT's backbone (position embeddings neutralised on the DT path), the language
    path adds the positions itself and ties the head to the token table: it computes exactly
    the pretrained GPT2LMHeadModel's loss."""
    source = GPT2LMHeadModel.from_pretrained(lm_dir).eval()
    dt = build_decision_transformer(str(lm_dir), state_dim=3, act_dim=2, seed=0, context_len=4).eval()
    stream = np.arange(1, 500, dtype=np.int32) % 7000
    language = LanguageCotraining(source.transformer.wte.weight, stream, seq_len=32, batch_size=2, seed=0)
    ids = language.sample()
    assert ids.shape == (2, 32)
    expected = source(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(language(dt.transformer, ids), expected, rtol=1e-5, atol=1e-5)


def test_lm_cotraining_changes_the_loss_on_the_lambda2_schedule(lm_dir):
    objectives = build_auxiliary(str(lm_dir), Aux(lm_cotrain=LMCotrain(weight=0.4, documents=5)), seed=3)
    dt = build_decision_transformer(str(lm_dir), state_dim=3, act_dim=2, seed=0, context_len=4).eval()
    language = objectives.language
    assert language.seq_len == 32  # the source's n_positions
    g = torch.Generator().manual_seed(0)
    batch = {"states": torch.randn(2, 4, 3, generator=g), "actions": torch.rand(2, 4, 2, generator=g),
             "returns_to_go": torch.randn(2, 4, 1, generator=g), "timesteps": torch.arange(4).repeat(2, 1),
             "attention_mask": torch.ones(2, 4)}  # fmt: skip
    out = dt(**batch)
    for step in (0, 2500, 5000):
        rng = language.get_extra_state()
        term = objectives(step, dt, out, batch["attention_mask"])
        language.set_extra_state(rng)  # the same text batch again
        lm_loss = language(dt.transformer)
        assert lm_loss.item() > 1.0  # next-token cross-entropy in nats over a 7680-token vocabulary
        torch.testing.assert_close(term, 0.4 * anneal(step) * lm_loss)
    assert objectives(10_000, dt, out, batch["attention_mask"]).item() == 0.0  # annealed away: not computed

    # The LM term's gradient reaches the shared blocks and the (trained) token table.
    dt.zero_grad()
    objectives(0, dt, out, batch["attention_mask"]).backward()
    assert dt.transformer.h[0].attn.c_attn.weight.grad.abs().sum() > 0
    assert language.wte.grad.abs().sum() > 0
    # Its state (token table, sampler position) is saved for resumption.
    state = objectives.state_dict()
    assert set(state) == {"language.wte", "language._extra_state"}
    assert json.loads(state["language._extra_state"]["rng"])["bit_generator"] == "PCG64"


def test_lm_cotraining_follows_the_dt_backbone_it_is_given(lm_dir):
    """With extend_positions the position table is trained as the timestep embedding; the
    language path reads the same (shared) table."""
    dt = build_decision_transformer(str(lm_dir), state_dim=3, act_dim=2, seed=0, context_len=4,
                                    extend_positions=True).eval()  # fmt: skip
    backbone = build_backbone(str(lm_dir), seed=0).eval()
    table = GPT2LMHeadModel.from_pretrained(lm_dir).transformer.wte.weight
    language = LanguageCotraining(table, np.arange(200, dtype=np.int32), seq_len=32, batch_size=1, seed=0)
    ids = language.sample()
    plain = language(backbone, ids)  # GPT2Model adds its own wpe
    torch.testing.assert_close(language(dt.transformer, ids), plain)
    with torch.no_grad():
        dt.embed_timestep.weight[:32] += torch.randn(32, 16)
    assert not torch.allclose(language(dt.transformer, ids), plain)

"""Reid et al.'s auxiliary objectives for fine-tuning a language-pretrained DT (section 3.2).

    L = L_MSE + λ1(step) · L_cos + λ2(step) · L_LM                          (their Eq. 9)

L_cos pulls the DT's input token embeddings towards the pretrained model's language embeddings:

    L_cos = − mean over valid input tokens i of  max over centres c of  cos(I_i, E_c)

where I_i are the return/state/action embeddings (after `embed_ln`, before the timestep
embedding, as in Reid's code: `DTOutput.token_embeddings`) and E_c are the centres of a
k-means clustering, under cosine distance, of the pretrained token-embedding table (1000
clusters by default; a table with no more rows than clusters is used as it is, which is Eq. 8
exactly). Reid's released code computes something else: an elementwise product over the
features (no dot product, no sum over the width) maxed over the clusters, through a
batch × tokens × clusters × width tensor (about 12 GB at B=64, K=20, 1000 clusters, width 768).
`kmeans_cosine_loss` takes the dot products as one matmul: the largest tensor is
[tokens, clusters]. Padded tokens are left out of the mean (Reid's code averaged them in).

L_LM is next-token cross-entropy on text (Reid's "LM co-training"): language batches from the
pretraining corpus run through the same backbone with its position embeddings added and a
language-model head tied to the source's token table; the DT path runs without position
embeddings (dtsweep.models.dt). The token table is a trained parameter of the objective, not of
the DT, so DT checkpoints keep their keys; the training loop saves it in its resume state.

Both weights anneal with Reid's sigmoid, λ(step) = weight · σ(10 · (S − step) / S − 5) with
S = anneal_steps (5000): 0.993 · weight at step 0, 0.5 · weight at S/2, 0.0067 · weight at S.
`step` counts the updates already made (0 for the first). A term is no longer computed from
step 2S on, where λ < 3.1e-7 · weight.

Caches (per machine, `$DTSWEEP_CACHE_DIR`, default ~/.cache/dtsweep):
    kmeans/<table sha256>-k<clusters>-s<seed>.safetensors   the centres of one token table
    lm/<tokenizer sha256>-<corpus>-<documents>.npy           a tokenised corpus (int32)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from dtsweep.models.backbones import InitError, is_random_init, language_model_problem, load_source, source_dir
from dtsweep.models.dt import DecisionTransformer, DTOutput, NoPositionEmbedding
from dtsweep.spec import Aux, KMeansCosine, LMCotrain

KMEANS_SEED = 0
KMEANS_MAX_ITERS = 50
ANNEAL_CUTOFF = 2  # terms stop being computed at ANNEAL_CUTOFF × anneal_steps


def cache_dir() -> Path:
    """dtsweep's cache for derived data: $DTSWEEP_CACHE_DIR or ~/.cache/dtsweep."""
    return Path(os.environ.get("DTSWEEP_CACHE_DIR", "~/.cache/dtsweep")).expanduser()


def anneal(step: int, steps: int = 5000) -> float:
    """Reid's annealing factor in (0, 1): σ(10 · (steps − step) / steps − 5).

    0.993 at step 0, 0.5 at steps / 2, 0.0067 at `steps`, 3.1e-7 at 2 · steps.
    """
    z = 10.0 * (steps - step) / steps - 5.0
    return 1.0 / (1.0 + math.exp(-z))


# --------------------------------------------------------------------------- k-means cosine loss


def kmeans_cosine_loss(embeddings: torch.Tensor, centers: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Reid's L_cos: minus the mean over tokens of the best cosine similarity to any centre.

    Args:
        embeddings: [B, T, D] input token embeddings.
        centers:    [C, D] cluster centres (need not be normalised).
        mask:       [B, T], nonzero for the tokens to average over (None: all).
    Returns a scalar in [-1, 1]. Memory: the [B·T, C] similarities, never [B, T, C, D].
    """
    e = F.normalize(embeddings, dim=-1)
    c = F.normalize(centers.to(e.dtype), dim=-1)
    best = (e @ c.T).max(dim=-1).values  # [B, T]
    if mask is None:
        return -best.mean()
    m = mask.to(best.dtype)
    return -(best * m).sum() / m.sum().clamp_min(1.0)


def spherical_kmeans(points: torch.Tensor, k: int, *, seed: int = KMEANS_SEED, max_iters: int = KMEANS_MAX_ITERS,
                     chunk: int = 8192) -> torch.Tensor:  # fmt: skip
    """k-means under cosine distance (1 − cos): [V, D] points -> [k, D] unit-norm centres.

    k-means++ seeding (under 1 − cos, which is half the squared distance between unit vectors),
    then Lloyd iterations on the unit sphere: assign each point to its most similar centre,
    move each centre to the normalised mean of its points, until no assignment changes or
    `max_iters`. An empty cluster is re-seeded with the point worst served by its centre.
    With k >= V every point is its own centre: the normalised points are returned.
    """
    x = F.normalize(points.detach().float().cpu(), dim=-1)
    n = x.shape[0]
    if k >= n:
        return x.clone()
    g = torch.Generator().manual_seed(seed)

    chosen = [int(torch.randint(n, (1,), generator=g))]
    dist = (1 - x @ x[chosen[0]]).clamp_min(0)
    for _ in range(1, k):
        weights = dist if dist.sum() > 0 else torch.ones(n)  # all points on chosen centres
        chosen.append(int(torch.multinomial(weights, 1, generator=g)))
        dist = torch.minimum(dist, (1 - x @ x[chosen[-1]]).clamp_min(0))
    centers = x[chosen]

    assign = None
    for _ in range(max_iters):
        new = torch.cat([(x[i : i + chunk] @ centers.T).argmax(dim=1) for i in range(0, n, chunk)])
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        sums = torch.zeros_like(centers).index_add_(0, assign, x)
        empty = torch.bincount(assign, minlength=k) == 0
        if empty.any():
            served = (x * centers[assign]).sum(dim=1)
            sums[empty] = x[served.argsort()[: int(empty.sum())]]
        centers = F.normalize(sums, dim=-1)
    return centers


def _atomic_write(path: Path, write) -> None:
    """Call write(tmp_path) and move the result to `path` (concurrent trials may race here)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def table_centers(table: torch.Tensor, clusters: int, *, seed: int = KMEANS_SEED) -> torch.Tensor:
    """`spherical_kmeans(table, clusters)`, cached on disk under a hash of the table's values."""
    table = table.detach().float().cpu().contiguous()
    digest = hashlib.sha256(table.numpy().tobytes()).hexdigest()[:16]
    path = cache_dir() / "kmeans" / f"{digest}-k{clusters}-s{seed}.safetensors"
    if path.is_file():
        return load_file(path)["centers"]
    centers = spherical_kmeans(table, clusters, seed=seed).contiguous()
    meta = {"rows": str(table.shape[0]), "clusters": str(clusters), "seed": str(seed), "distance": "cosine"}
    _atomic_write(path, lambda tmp: save_file({"centers": centers}, tmp, metadata=meta))
    return centers


# --------------------------------------------------------------------------- LM co-training


def _tokenizer_for(init: str):
    """(encode: list[str] -> list[list[int]], eot id, identity bytes for the cache key)."""
    if init == "gpt2":
        # GPT-2's own BPE, exactly: openai-whisper ships its vocabulary (no download).
        from dtsweep.pretrain.language import GPT2_EOT_ID, gpt2_encoding, gpt2_tiktoken_path

        enc = gpt2_encoding()
        return enc.encode_ordinary_batch, GPT2_EOT_ID, gpt2_tiktoken_path().read_bytes()
    from transformers import AutoTokenizer

    path = source_dir(init)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    files = sorted(f for f in ("tokenizer.json", "vocab.json", "merges.txt") if (path / f).is_file())
    identity = b"".join((path / f).read_bytes() for f in files)
    return (lambda docs: tokenizer(docs, add_special_tokens=False)["input_ids"]), tokenizer.eos_token_id, identity


def _corpus_documents(corpus: str) -> list[str]:
    from dtsweep.pretrain import language

    if corpus == "news":
        return language.news_articles()[0]
    if corpus == "wikitext-103":
        return language.wikitext103()[0]
    raise ValueError(f"unknown corpus {corpus!r}; choose from {language.CORPORA}")


def language_tokens(init: str, corpus: str = "news", documents: int = 0) -> np.ndarray:
    """The training split of `corpus` tokenised with `init`'s tokenizer: one int32 stream, each
    document followed by end-of-text. `documents` > 0 keeps the first N documents. Cached."""
    encode, eot, identity = _tokenizer_for(init)
    key = hashlib.sha256(identity).hexdigest()[:16]
    path = cache_dir() / "lm" / f"{key}-{corpus}-{documents or 'all'}.npy"
    if path.is_file():
        return np.load(path)
    docs = _corpus_documents(corpus)
    if documents:
        docs = docs[:documents]
    stream = np.concatenate([np.append(ids, eot) for ids in encode(docs)]).astype(np.int32)
    _atomic_write(path, lambda tmp: np.save(tmp, stream))
    return stream


class LanguageCotraining(nn.Module):
    """Next-token prediction on text through the DT's backbone, with a tied LM head.

    Holds the source's token table as a trained parameter `wte` [V, H] and a seeded sampler of
    random `seq_len`-token windows of a token stream. `forward(backbone)` -> mean cross-entropy
    (nats/token) of one batch [batch_size, seq_len].
    """

    def __init__(self, token_table: torch.Tensor, stream: np.ndarray, *, seq_len: int, batch_size: int, seed: int):
        super().__init__()
        if len(stream) <= seq_len:
            raise ValueError(f"the language corpus has {len(stream)} tokens, fewer than seq_len={seq_len}")
        if int(stream.max()) >= token_table.shape[0]:
            raise ValueError(f"token id {int(stream.max())} is outside the {token_table.shape[0]}-row token table")
        self.wte = nn.Parameter(token_table.detach().float().clone())
        self.stream = torch.from_numpy(stream.astype(np.int64))
        self.seq_len, self.batch_size = seq_len, batch_size
        self.rng = np.random.default_rng([seed, 0x4C4D])  # its own stream: the DT sampler's is untouched

    def sample(self) -> torch.Tensor:
        """int64 [batch_size, seq_len] token ids: random windows of the stream."""
        starts = torch.from_numpy(self.rng.integers(0, len(self.stream) - self.seq_len + 1, size=self.batch_size))
        return self.stream[starts[:, None] + torch.arange(self.seq_len)]

    def forward(self, backbone: nn.Module, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Mean next-token cross-entropy of `ids` (default: a fresh batch) through `backbone`."""
        ids = (self.sample() if ids is None else ids).to(self.wte.device)
        hidden = F.embedding(ids, self.wte)
        if isinstance(backbone.wpe, NoPositionEmbedding):
            # The DT path adds no positions; the language path does, as the pretrained model did.
            hidden = hidden + backbone.wpe.weight[: ids.shape[1]]
        out = backbone(inputs_embeds=hidden, use_cache=False).last_hidden_state
        logits = out @ self.wte.T  # the LM head tied to the token table, as GPT-2's
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())

    def get_extra_state(self) -> dict:
        return {"rng": json.dumps(self.rng.bit_generator.state)}

    def set_extra_state(self, state: dict) -> None:
        self.rng.bit_generator.state = json.loads(state["rng"])


# --------------------------------------------------------------------------- both, for the training loop


class AuxiliaryObjectives(nn.Module):
    """The auxiliary terms of one trial. `forward(step, model, out, attention_mask)` returns
    Σ λ_i(step) · L_i (a scalar tensor; zero once every term has annealed away)."""

    def __init__(self, kmeans: KMeansCosine | None = None, centers: torch.Tensor | None = None,
                 lm: LMCotrain | None = None, language: LanguageCotraining | None = None):  # fmt: skip
        super().__init__()
        if (kmeans is None) != (centers is None) or (lm is None) != (language is None):
            raise ValueError("each term needs both its settings and its data")
        self.kmeans, self.lm, self.language = kmeans, lm, language
        self.register_buffer("centers", centers, persistent=False)  # derived from the source: not saved

    def weights(self, step: int) -> dict[str, float]:
        """λ of each configured term at `step` ({"kmeans_cosine": λ1, "lm_cotrain": λ2})."""
        out = {}
        if self.kmeans is not None:
            out["kmeans_cosine"] = self.kmeans.weight * anneal(step, self.kmeans.anneal_steps)
        if self.lm is not None:
            out["lm_cotrain"] = self.lm.weight * anneal(step, self.lm.anneal_steps)
        return out

    def forward(self, step: int, model: DecisionTransformer, out: DTOutput, attention_mask: torch.Tensor):
        """Σ λ_i(step) · L_i, a float32 scalar. Args: the number of updates made so far, the DT,
        its output on the batch and the batch's [B, K] attention mask (1 = valid timestep)."""
        total = out.action_preds.new_zeros((), dtype=torch.float32)
        if self.kmeans is not None and step < ANNEAL_CUTOFF * self.kmeans.anneal_steps:
            token_mask = attention_mask.repeat_interleave(3, dim=1)  # [B, 3K]: R̂, s, a of each timestep
            loss = kmeans_cosine_loss(out.token_embeddings, self.centers, token_mask)
            total = total + self.weights(step)["kmeans_cosine"] * loss.float()
        if self.lm is not None and step < ANNEAL_CUTOFF * self.lm.anneal_steps:
            total = total + self.weights(step)["lm_cotrain"] * self.language(model.transformer)
        return total


def build_auxiliary(init: str, aux: Aux, *, seed: int) -> AuxiliaryObjectives | None:
    """The auxiliary objectives `aux` asks for with `init`'s backbone, or None if none.

    Loads the source model once for its token table (and, for LM co-training, its positions),
    clusters the table (cached), and tokenises the corpus (cached). Raises InitError for an
    init that lacks what a term needs (spec validation refuses those earlier).
    """
    if aux.kmeans_cosine is None and aux.lm_cotrain is None:
        return None
    if is_random_init(init):
        raise InitError(f"init {init!r} has no token-embedding table; Reid's auxiliary objectives need a pretrained init")
    source = load_source(init)
    table = source.get_input_embeddings().weight.detach().float()
    centers = language = None
    if aux.kmeans_cosine is not None:
        centers = table_centers(table, aux.kmeans_cosine.clusters)
    if aux.lm_cotrain is not None:
        problem = language_model_problem(init)
        if problem:
            raise InitError(f"LM co-training: {problem}")
        lm = aux.lm_cotrain
        n_positions = source.config.n_positions
        seq_len = lm.seq_len or min(n_positions, 1024)
        if seq_len > n_positions:
            raise InitError(f"lm_cotrain.seq_len={seq_len} exceeds {init!r}'s {n_positions} positions")
        stream = language_tokens(init, lm.corpus, lm.documents)
        language = LanguageCotraining(table, stream, seq_len=seq_len, batch_size=lm.batch_size, seed=seed)
    return AuxiliaryObjectives(aux.kmeans_cosine, centers, aux.lm_cotrain, language)

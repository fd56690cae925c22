"""What the language and the image pre-training share: the GPT-2 model, the training loop,
the held-out measurements and the Hugging Face directory with its model card.

Both models are `transformers.GPT2LMHeadModel`s trained on next-token prediction; only the
tokens differ (GPT-2 BPE ids of English text, or palette indices of Fashion-MNIST pixels).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import shlex
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel

WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "card.json"


@dataclasses.dataclass
class TrainConfig:
    """Architecture and optimisation shared by both pre-training commands.

    The defaults are ChibiT's shape (Reid et al.: 3 layers, 128 wide, 1 head) and a budget that
    trains in about 20 minutes on one CPU thread.
    """

    n_layer: int = 3
    n_embd: int = 128
    n_head: int = 1
    steps: int = 3000
    batch_size: int = 8  # sequences per step
    lr: float = 2e-3  # peak learning rate; a model this small tolerates a large one
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    weight_decay: float = 0.1  # on matrices only, as in nanoGPT
    grad_clip: float = 1.0
    seed: int = 0
    threads: int = 1  # torch intra-op threads; the machines this ships from are shared
    max_minutes: float = 0.0  # training time budget; 0 = none. The lr schedule follows whichever of
    # steps and minutes runs out first, so the result depends on the machine's speed when set.
    eval_sequences: int = 256  # held-out sequences scored for the card


def gpt2_model(cfg: TrainConfig, *, vocab_size: int, n_positions: int, bos: int, eos: int | None) -> GPT2LMHeadModel:
    """A randomly initialised GPT-2 with `cfg`'s shape and tied input/output embeddings.

    Dropout is off: each model sees its corpus about once, so it has nothing to regularise, and
    the Decision Transformer sets its own dropout when it loads the backbone.
    """
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=bos,
        eos_token_id=eos,
        tie_word_embeddings=True,
    )
    torch.manual_seed(cfg.seed)
    return GPT2LMHeadModel(config)


def _lr_factor(step: int, progress: float, cfg: TrainConfig) -> float:
    """Linear warm-up over `warmup_steps`, then cosine decay from 1 to `min_lr_ratio` as
    `progress` (the share of the budget used, 0..1) goes to 1."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def log_line(message: str) -> None:
    """Default progress logger: one line to stdout, flushed so redirected logs stay current."""
    print(message, flush=True)


def train_causal_lm(
    model: GPT2LMHeadModel,
    sample_batch: Callable[[np.random.Generator], torch.Tensor],
    cfg: TrainConfig,
    log: Callable[[str], None] = log_line,
) -> dict:
    """Train `model` on next-token prediction over batches drawn by `sample_batch(rng)`.

    `sample_batch` returns int64 token ids [batch, seq]; every position after the first is a
    target. Returns {"steps" (taken), "steps_planned", "tokens_seen" (input tokens), "train_loss"
    (nats/token, mean of the last 50 steps), "train_wall_time_s", "stopped_early"}.
    """
    torch.set_num_threads(cfg.threads)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    rng = np.random.default_rng(cfg.seed)
    model.train()
    losses: list[float] = []
    tokens_seen = 0
    start = time.perf_counter()
    stopped_early = False
    step = 0
    for step in range(1, cfg.steps + 1):
        # With a time limit the budget is whichever runs out first, steps or minutes, so the
        # learning rate still anneals fully when a busy machine makes the steps slow.
        progress = (step - 1) / cfg.steps
        if cfg.max_minutes:
            progress = max(progress, (time.perf_counter() - start) / (60 * cfg.max_minutes))
        lr = cfg.lr * _lr_factor(step - 1, progress, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        ids = sample_batch(rng)
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        losses.append(loss.item())
        tokens_seen += ids.numel()
        elapsed = time.perf_counter() - start
        if step % 50 == 0 or step == cfg.steps:
            log(
                f"step {step}/{cfg.steps}  loss {np.mean(losses[-50:]):.3f}  "
                f"lr {lr:.2e}  {tokens_seen / elapsed:.0f} tok/s  {elapsed / 60:.1f} min"
            )
        if cfg.max_minutes and elapsed > 60 * cfg.max_minutes and step < cfg.steps:
            log(f"stopping after {step} of {cfg.steps} steps: --max-minutes {cfg.max_minutes} reached")
            stopped_early = True
            break
    model.eval()
    return {
        "steps": step,
        "steps_planned": cfg.steps,
        "tokens_seen": tokens_seen,
        "train_loss": float(np.mean(losses[-50:])),
        "train_wall_time_s": round(time.perf_counter() - start, 1),
        "stopped_early": stopped_early,
    }


@torch.no_grad()
def mean_token_loss(model: GPT2LMHeadModel, ids: np.ndarray | torch.Tensor, batch_size: int = 32) -> float:
    """Mean next-token cross-entropy (nats/token) of `model` on int token ids [N, seq].

    Every position after the first of each row is a target, weighted equally.
    """
    ids = torch.as_tensor(ids, dtype=torch.long)
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(ids), batch_size):
        batch = ids[i : i + batch_size]
        logits = model(input_ids=batch).logits[:, :-1].float()
        targets = batch[:, 1:]
        total += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
        ).item()
        count += targets.numel()
    return total / count


def shuffle_within_rows(ids: np.ndarray, seed: int, keep_first: bool = False) -> np.ndarray:
    """The same tokens as `ids` [N, seq], each row permuted at random (the first kept if asked).

    Shuffling keeps the unigram statistics and destroys the order, so a model that learned
    only token frequencies scores the same on both, and one that learned structure does not.
    """
    rng = np.random.default_rng(seed)
    out = ids.copy()
    start = 1 if keep_first else 0
    for row in out:
        rng.shuffle(row[start:])
    return out


def unigram_loss(train_counts: np.ndarray, targets: np.ndarray) -> float:
    """Cross-entropy (nats/token) of `targets` under add-one-smoothed training frequencies.

    `train_counts` [vocab] counts each token id in the training split; `targets` is any int
    array of held-out target ids. The baseline a next-token model must beat.
    """
    probs = (train_counts + 1.0) / (train_counts.sum() + len(train_counts))
    return float(-np.log(probs[np.asarray(targets).ravel()]).mean())


def save_model_dir(model: GPT2LMHeadModel, out_dir: Path) -> None:
    """Save `model` as a Hugging Face directory with its weights stored in float16.

    float16 keeps the shipped directories small; config.json keeps `dtype: float32`, so
    `GPT2LMHeadModel.from_pretrained(out_dir)` loads float32 weights (the fp16 values, widened).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    path = out_dir / WEIGHTS_FILE
    tensors = {name: t.to(torch.float16).contiguous() for name, t in load_file(path).items()}
    save_file(tensors, path, metadata={"format": "pt"})


def load_model_dir(model_dir: str | Path) -> GPT2LMHeadModel:
    """Load a directory written by `save_model_dir` (float32, eval mode)."""
    return GPT2LMHeadModel.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def command_line(kind: str, out_dir: Path, cfg) -> str:
    """The `dtsweep pretrain` command that reproduces a run of `cfg` (a dataclass)."""
    args = ["dtsweep", "pretrain", kind, "--out", str(out_dir)]
    for f in dataclasses.fields(cfg):
        args += ["--" + f.name.replace("_", "-"), str(getattr(cfg, f.name))]
    return shlex.join(args)


def environment() -> dict:
    """Versions and machine recorded in every card."""
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": f"{platform.machine()} {platform.processor() or platform.system()}",
    }


def write_card(out_dir: Path, card: dict) -> None:
    """Write card.json and a README.md model card rendered from it."""
    (out_dir / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
    ev = card["evaluation"]
    lines = [
        f"# {card['name']}",
        "",
        card["description"],
        "",
        f"- Kind: {card['kind']}",
        f"- Architecture: GPT-2, {card['architecture']['n_layer']} layers, {card['architecture']['n_embd']} wide, "
        f"{card['architecture']['n_head']} head(s), vocabulary {card['architecture']['vocab_size']}, "
        f"{card['architecture']['n_positions']} positions, {card['architecture']['n_params']:,} parameters",
        f"- Corpus: {card['corpus']['name']} ({card['corpus']['source']})",
        f"- Training tokens available: {card['corpus']['train_tokens']:,}; "
        f"tokens seen: {card['training']['tokens_seen']:,} "
        f"({card['training']['steps']} steps)",
        f"- Seed: {card['training']['seed']}",
        f"- Wall time: {card['training']['wall_time_s'] / 60:.1f} min ({card['environment']['machine']}, "
        f"{card['training']['threads']} thread(s))",
        "",
        "## Held-out evaluation (nats per predicted token)",
        "",
        "| model on held-out data | unigram baseline | model on the same tokens shuffled |",
        "|---|---|---|",
        f"| {ev['heldout_loss']:.3f} | {ev['unigram_loss']:.3f} | {ev['shuffled_loss']:.3f} |",
        "",
        f"Scored on {ev['heldout_targets']:,} held-out target tokens ({ev['heldout_description']}). "
        "The unigram baseline uses add-one-smoothed training frequencies; shuffling each "
        "sequence keeps its tokens and destroys their order."
        + (f" In bits per byte of text: {ev['heldout_bits_per_byte']:.3f}." if "heldout_bits_per_byte" in ev else ""),
        "",
        "## Reproduce",
        "",
        "```",
        card["command"],
        "```",
        "",
        "Weights are stored in float16; `GPT2LMHeadModel.from_pretrained` loads them as float32.",
    ]
    notes = list(card.get("notes", []))
    if card["training"].get("stopped_early"):
        notes.append(
            f"Training stopped at its --max-minutes budget after {card['training']['steps']} of "
            f"{card['training']['steps_planned']} planned steps, the learning-rate schedule following the time budget; "
            "a rerun on a machine of a different speed stops at a different step."
        )
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    (out_dir / "README.md").write_text("\n".join(lines) + "\n")


def architecture(model: GPT2LMHeadModel) -> dict:
    c = model.config
    return {
        "model_type": "gpt2",
        "n_layer": c.n_layer,
        "n_embd": c.n_embd,
        "n_head": c.n_head,
        "vocab_size": c.vocab_size,
        "n_positions": c.n_positions,
        "n_params": sum(p.numel() for p in model.parameters()),
    }


def add_config_flags(parser: argparse.ArgumentParser, defaults, choices: dict | None = None) -> None:
    """One `--field-name` flag per field of the dataclass instance `defaults`, typed and
    defaulted from it; `choices` maps field names to their allowed values."""
    for f in dataclasses.fields(defaults):
        value = getattr(defaults, f.name)
        extra = {"choices": choices[f.name]} if choices and f.name in choices else {}
        parser.add_argument("--" + f.name.replace("_", "-"), type=type(value), default=value, help=f"default: {value}", **extra)


def config_from_args(cls, args: argparse.Namespace):
    """The dataclass `cls` filled from the flags `add_config_flags` added."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})

"""The seven findings of Takagi's poster, each as a measurable comparison across seeds.

Every comparison is oriented so that the paper's claim reads "A > B": its effect is
mean(A) - mean(B) of a per-trial number, averaged over the envs both groups have, with a
95% stratified bootstrap CI (seeds resampled within each group and env) and the
probability that a run of A beats a run of B. `dtsweep.stats.verdict` turns the CI into
supported / contradicted / inconclusive (inconclusive below 3 seeds). A finding's verdict
combines its *primary* comparisons (`stats.combine_verdicts`); the others are context.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pandas as pd

from dtsweep.report import measures as M
from dtsweep.report.inputs import (
    ATTENTION_EPOCH,
    MAIN_K,
    NO_CONTEXT_K,
    MissingData,
    Sweep,
    by_env,
    no_swap,
    pick_context_len,
)
from dtsweep.stats import INCONCLUSIVE, Effect, combine_verdicts, compare_groups, verdict

NO_DATA = "not measured"


@dataclass
class Comparison:
    label: str  # "CKA(random) - CKA(gpt2)": the claim says this is > 0
    primary: bool
    effect: Effect | None = None
    verdict: str = NO_DATA
    missing: str | None = None
    per_env: list[tuple[str, Effect, str]] = field(default_factory=list)


@dataclass
class Finding:
    number: int
    poster: str  # the finding as the poster words it
    claim: str  # the measurable comparison
    figures: list[str]
    comparisons: list[Comparison] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        primary = [c for c in self.comparisons if c.primary]
        measured = [c.verdict for c in primary if c.effect is not None]
        if not measured:
            return NO_DATA
        # A primary comparison without data leaves the claim partly untested.
        return combine_verdicts(measured + ([INCONCLUSIVE] if len(measured) < len(primary) else []))


class _Comparer:
    """Builds Comparisons from a per-trial table with a `value` column."""

    def __init__(self, n_boot: int, seed: int):
        self.n_boot, self.seed = n_boot, seed

    def __call__(self, label: str, per_trial: pd.DataFrame, a: dict, b: dict, primary: bool = True) -> Comparison:
        c = Comparison(label, primary)
        a_env, b_env = by_env(per_trial, "value", **a), by_env(per_trial, "value", **b)
        lacking = [_describe(f) for f, d in ((a, a_env), (b, b_env)) if not d]
        if not lacking and not set(a_env) & set(b_env):
            lacking = [f"{_describe(a)} and {_describe(b)} on a common env"]
        if lacking:
            c.missing = "needs " + " and ".join(lacking)
            return c
        c.effect = compare_groups(a_env, b_env, self.n_boot, 0.95, self.seed)
        c.verdict = verdict(c.effect.low, c.effect.high, c.effect.n_seeds)
        if len(c.effect.tasks) > 1:
            for env in c.effect.tasks:
                e = compare_groups({env: a_env[env]}, {env: b_env[env]}, self.n_boot, 0.95, self.seed)
                c.per_env.append((env, e, verdict(e.low, e.high, e.n_seeds)))
        return c


def _describe(filters: dict) -> str:
    return "trials with " + ", ".join(f"{k}={v}" for k, v in filters.items())


# ---- the findings


def f1_representation(sweep: Sweep, cmp: _Comparer, f: Finding) -> None:
    cka, k = M.runs_at(sweep.diag("cka"), MAIN_K)
    token = "state" if (cka["token"] == "state").any() else None
    per_trial = M.trial_scalar(cka if token is None else cka[cka["token"] == token], "cka")
    f.notes.append(f"K={k}; CKA averaged over every measured layer of the {token or 'all'} token(s).")
    f.comparisons += [
        cmp("mean CKA(random) - mean CKA(gpt2)", per_trial, {"init": "random"}, {"init": "gpt2"}),
        cmp("mean CKA(random) - mean CKA(igpt)", per_trial, {"init": "random"}, {"init": "igpt"}, primary=False),
    ]


def f2_information(sweep: Sweep, cmp: _Comparer, f: Finding) -> None:
    mine, k = M.runs_at(sweep.diag("mine"), MAIN_K)
    mid = M.mine_middle(mine)
    mids = ", ".join(f"{init} block {b}" for init, b in M.middle_blocks(mine).items())
    f.notes.append(f"K={k}; middle measured block: {mids}; mean over token positions and types.")
    for which in ("X", "Y"):
        per_trial = M.trial_scalar(mid[mid["which"] == which], "mi_nats")
        f.comparisons += [
            cmp(f"I({which};T)(random) - I({which};T)(gpt2)", per_trial, {"init": "random"}, {"init": "gpt2"}),
            cmp(f"I({which};T)(random) - I({which};T)(igpt)", per_trial, {"init": "random"}, {"init": "igpt"},
                primary=False),  # fmt: skip
        ]


def f3_parameters(sweep: Sweep, cmp: _Comparer, f: Finding) -> None:
    params, k = M.runs_at(sweep.diag("params"), MAIN_K)
    l2, cos = M.trial_scalar(params, "l2"), M.trial_scalar(params, "cosine")
    f.notes.append(f"K={k}; means over every transformer-block tensor.")
    f.comparisons += [
        cmp("mean L2(random) - mean L2(gpt2)", l2, {"init": "random"}, {"init": "gpt2"}),
        cmp("mean cosine(gpt2) - mean cosine(random)", cos, {"init": "gpt2"}, {"init": "random"}),
        cmp("mean L2(random) - mean L2(igpt)", l2, {"init": "random"}, {"init": "igpt"}, primary=False),
        cmp("mean cosine(igpt) - mean cosine(random)", cos, {"init": "igpt"}, {"init": "random"}, primary=False),
    ]


def f4_gradients(sweep: Sweep, cmp: _Comparer, f: Finding) -> None:
    grads, k = M.runs_at(sweep.diag("gradients"), MAIN_K)
    clipped = M.clipped_fraction(grads)
    f.notes.append(f"K={k}; epoch-1 gradients; 'clipped' is the fraction of samples whose norm clipping shortened.")
    f.comparisons += [
        cmp("clipped(igpt) - clipped(random)", clipped, {"init": "igpt"}, {"init": "random"}),
        cmp("clipped(igpt) - clipped(gpt2)", clipped, {"init": "igpt"}, {"init": "gpt2"}),
    ]
    try:
        conf = M.confusion(grads)
        f.comparisons += [
            cmp("confusion(random) - confusion(gpt2)", conf, {"init": "random"}, {"init": "gpt2"}, primary=False),
            cmp("confusion(random) - confusion(igpt)", conf, {"init": "random"}, {"init": "igpt"}, primary=False),
        ]
        ln = M.first_ln_share(grads)
        f.comparisons += [
            cmp("first-LN share(igpt) - first-LN share(random)", ln, {"init": "igpt"}, {"init": "random"}, primary=False),
        ]
    except MissingData as e:
        f.missing.append(str(e))


def f5_no_context(sweep: Sweep, cmp: _Comparer, f: Finding) -> None:
    m = no_swap(sweep.require_metrics())
    k1 = m[m["context_len"] == NO_CONTEXT_K]
    if k1.empty:
        raise MissingData(f"needs trials with context_len={NO_CONTEXT_K} (no swap): add a K=1 study to the sweep")
    others = m[m["context_len"] != NO_CONTEXT_K]
    k_main = pick_context_len(others, MAIN_K) if not others.empty else None
    evaluated = m[m["normalized_score"].notna()]
    ks = [NO_CONTEXT_K] + ([k_main] if k_main is not None else [])
    last = int(evaluated[evaluated["context_len"].isin(ks)].groupby("trial_id")["epoch"].max().min())
    auc = M.curve_mean(m, "normalized_score", 1, last)
    f.notes.append(f"'AUC' is the mean normalised score over epochs 1..{last} (the epochs every compared run has).")
    f.comparisons.append(
        cmp(f"AUC K={NO_CONTEXT_K}: gpt2 - random", auc, {"init": "gpt2", "context_len": NO_CONTEXT_K},
            {"init": "random", "context_len": NO_CONTEXT_K})  # fmt: skip
    )
    if k_main is None:
        f.comparisons.append(Comparison("slowdown(random) - slowdown(gpt2)", True, missing=f"needs K={MAIN_K} trials"))
        return
    # Slowdown from removing context, per (init, env, seed): AUC at K_main - AUC at K=1.
    wide = auc.pivot_table(index=["init", "env", "seed"], columns="context_len", values="value")
    if NO_CONTEXT_K in wide and k_main in wide:
        slow = (wide[k_main] - wide[NO_CONTEXT_K]).dropna().rename("value").reset_index()
    else:
        slow = pd.DataFrame(columns=["init", "env", "seed", "value"])
    f.notes.append(f"'slowdown' is AUC(K={k_main}) - AUC(K={NO_CONTEXT_K}) of the same init, env and seed.")
    f.comparisons.append(cmp("slowdown(random) - slowdown(gpt2)", slow, {"init": "random"}, {"init": "gpt2"}))


def f6_block_swap(sweep: Sweep, cmp: _Comparer, f: Finding) -> None:
    swaps, base, k = M.swap_runs(sweep.require_metrics())
    last = int(swaps["epoch"].max())
    base = base[base["init"] == "random"]
    if base.empty:
        raise MissingData(f"needs init=random trials at context_len={k} without a swap: the block swaps' baseline")
    arms = pd.concat([
        swaps.assign(arm="swap", block=swaps["swap_block"].astype(int)),
        base.assign(arm="random", block=-1),
    ])  # fmt: skip
    f.notes.append(
        f"K={k}; curve means over epochs 1..{last} (the swap runs' length); "
        "'any swap' pools the trials of every swapped block, each one a run."
    )
    for value, name, better in (("action_error", "action error", "lower"), ("normalized_score", "score", "higher")):
        per_trial = M.curve_mean(arms, value, 1, last).merge(
            arms.drop_duplicates("trial_id")[["trial_id", "arm", "block"]], on="trial_id"
        )
        swap, rand = {"arm": "swap"}, {"arm": "random"}
        if better == "lower":
            f.comparisons.append(cmp(f"{name}(random) - {name}(any swap)", per_trial, rand, swap))
        else:
            f.comparisons.append(cmp(f"{name}(any swap) - {name}(random)", per_trial, swap, rand))
        for b in sorted(swaps["swap_block"].astype(int).unique()):
            one = {"arm": "swap", "block": b}
            a_, b_ = (rand, one) if better == "lower" else (one, rand)
            label = f"{name}(random) - {name}(block {b})" if better == "lower" else f"{name}(block {b}) - {name}(random)"
            f.comparisons.append(cmp(label, per_trial, a_, b_, primary=False))


def f7_attention(sweep: Sweep, cmp: _Comparer, f: Finding) -> None:
    att, k = M.runs_at(sweep.diag("attention"), NO_CONTEXT_K)
    gaps, epoch = M.attention_gaps(att, ATTENTION_EPOCH)
    per_trial = M.trial_scalar(gaps, "gap")
    f.notes.append(f"K={k}; gap |d(epoch {epoch}) - d(epoch 0)| of the head-mean attention distance, mean over blocks.")
    f.comparisons += [
        cmp("gap(random) - gap(gpt2)", per_trial, {"init": "random"}, {"init": "gpt2"}),
        cmp("gap(random) - gap(igpt)", per_trial, {"init": "random"}, {"init": "igpt"}, primary=False),
    ]
    per_block = gaps.rename(columns={"gap": "value"})
    shared = set(gaps.loc[gaps["init"] == "random", "block"]) & set(gaps.loc[gaps["init"] == "gpt2", "block"])
    for b in sorted(shared):
        f.comparisons.append(
            cmp(f"block {b}: gap(random) - gap(gpt2)", per_block, {"init": "random", "block": b},
                {"init": "gpt2", "block": b}, primary=False)  # fmt: skip
        )


FINDINGS: list[tuple[int, str, str, list[str], Callable]] = [
    (1, "Feature reuse may not be the cause: pre-trained models changed their representations more.",
     "The CKA between epoch 0 and the final epoch (K=20, state token, mean over layers) is lower for gpt2 "
     "than for random, i.e. CKA(random) - CKA(gpt2) > 0.", ["cka_layers"], f1_representation),
    (2, "Better fitting to data may not be the cause: pre-trained models contain less information of data.",
     "MINE estimates at the middle block (mean over token positions) are lower for gpt2 than for random, "
     "for both I(X;T) and I(Y;T).", ["mine_positions"], f2_information),
    (3, "Some unchanged parameters may be the cause: pre-trained models don't change parameters so much.",
     "Per-tensor L2 distance between epoch 0 and the final epoch is smaller, and cosine similarity larger, "
     "for gpt2 than for random.", ["params_l2", "params_cosine"], f3_parameters),
    (4, "Large gradient with gradient clipping may degrade the performance: iGPT's gradient norms collapse by clipping.",
     "At epoch 1 a larger fraction of iGPT's per-sample gradients is clipped at 0.25 than of random's and "
     "of gpt2's.", ["gradients", "gradient_share"], f4_gradients),
    (5, "Pre-trained models learn efficiently even without context.",
     "With K=1, gpt2's normalised score averaged over epochs is higher than random's; and removing the "
     "context (K=20 -> K=1) costs random more than gpt2.", ["return_curves"], f5_no_context),
    (6, "Even a single pre-trained block improves training efficiency.",
     "K=1 random models with one GPT-2 block have a lower mean action error and a higher mean score over "
     "the first epochs than random models without one.", ["block_swap"], f6_block_swap),
    (7, "A pre-acquired way to use context is a cause of the success.",
     "The attention-distance gap between epoch 0 and epoch 4 (K=1, mean over blocks) is smaller for gpt2 "
     "than for random.", ["attention_gap"], f7_attention),
]  # fmt: skip


def evaluate_findings(sweep: Sweep, n_boot: int = 2000, seed: int = 0) -> list[Finding]:
    """All seven findings; one whose data is missing carries the reason in `missing`."""
    cmp = _Comparer(n_boot, seed)
    out = []
    for number, poster, claim, figures, build in FINDINGS:
        f = Finding(number, poster, claim, figures)
        try:
            build(sweep, cmp, f)
        except MissingData as e:
            f.missing.append(str(e))
        f.missing += [f"{c.label}: {c.missing}" for c in f.comparisons if c.missing and c.primary]
        out.append(f)
    return out


def findings_frame(findings: list[Finding]) -> pd.DataFrame:
    """One row per (finding, comparison, scope): scope 'all envs' or one env. For findings.csv."""
    rows = []
    for f in findings:
        for c in f.comparisons:
            scopes = ([("all envs", c.effect, c.verdict)] if c.effect else []) + c.per_env
            for scope, e, v in scopes:
                rows.append({
                    "finding": f.number, "comparison": c.label, "primary": c.primary, "scope": scope,
                    "effect": e.point, "ci_low": e.low, "ci_high": e.high, "prob_improvement": e.poi,
                    "n_seeds_a": e.n_a, "n_seeds_b": e.n_b, "verdict": v,
                })  # fmt: skip
            if c.effect is None:
                rows.append({"finding": f.number, "comparison": c.label, "primary": c.primary,
                             "scope": "all envs", "verdict": NO_DATA})  # fmt: skip
    return pd.DataFrame(rows, columns=["finding", "comparison", "primary", "scope", "effect", "ci_low", "ci_high",
                                       "prob_improvement", "n_seeds_a", "n_seeds_b", "verdict"])  # fmt: skip

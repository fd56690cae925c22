"""The seven findings of Takagi's poster, each as measurable comparisons across seeds.

What is compared is what an init *is*, not its name: a comparison sets conditions of one
modality (`inputs.MODALITY`: language = gpt2, chibit, clip; image = igpt, igpt-mini; none =
random, random-ref) against another. Only conditions that differ in nothing but the init are
compared (same `match` key: the full configuration without the init, see `Sweep.keys`), and
every such pair is its own comparison; nothing else is pooled. The families trained offline
by dtsweep (chibit, igpt-mini) are "mini scale" and decided apart from the paper-scale ones.

Each comparison is `dtsweep.stats.compare(treatment, control, claimed=...)` on one per-trial
number, stratified by dataset (one per env). A finding has a verdict per scale: `combine`
(Holm) over its primary comparisons at that scale; the other comparisons are context.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

import pandas as pd

from dtsweep.report import measures as M
from dtsweep.report.inputs import (
    ATTENTION_EPOCH,
    DATA_ERRORS,
    MAIN_K,
    MINI_FAMILIES,
    MODALITY,
    NO_CONTEXT_K,
    MissingData,
    Sweep,
    by_stratum,
    no_swap,
    pick_context_len,
)
from dtsweep.stats import INCONCLUSIVE, SUPPORTED, Decision, combine, compare, holm, probability_of_improvement

NO_DATA = "not measured"
PAPER, MINI = "paper scale", "mini scale"


@dataclass
class Comparison:
    """One test: `treatment` against `control` conditions, claim "treatment - control `claim` 0"."""

    label: str  # "CKA: language (gpt2) vs none (random), paper scale"
    primary: bool
    spec: str  # the finding's comparison this instantiates, e.g. "CKA: language vs none"
    scale: str | None = None
    conditions: str = ""  # the two conditions compared, "gpt2 K=20 [study] vs random K=20 [study]"
    claimed: str = "greater"
    decision: Decision | None = None
    poi: float | None = None  # P(a treatment seed beats a control seed), averaged over strata
    p_holm: float | None = None  # Holm-adjusted p within its finding and scale (primary only)
    part_verdict: str | None = None  # verdict on p_holm (primary only)
    per_stratum: list[tuple[str, Decision]] = field(default_factory=list)
    missing: str | None = None

    @property
    def verdict(self) -> str:
        if self.decision is None:
            return NO_DATA
        return self.part_verdict if self.part_verdict is not None else self.decision.verdict


@dataclass
class Finding:
    number: int
    poster: str  # the finding as the poster words it
    claim: str  # the measurable comparison
    figures: list[str]
    comparisons: list[Comparison] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    verdicts: dict[str, str] = field(default_factory=dict)  # scale -> combined verdict
    primary_specs: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        """ "paper scale: supported; mini scale: inconclusive", or NO_DATA."""
        if not self.verdicts:
            return NO_DATA
        return "; ".join(f"{scale}: {v}" for scale, v in self.verdicts.items())


def _scale(*families: str) -> str:
    return MINI if any(f in MINI_FAMILIES for f in families) else PAPER


class _Comparer:
    """Builds Comparisons of matched conditions from a per-trial table with a `value` column
    (and measures.TRIAL_KEYS)."""

    def __init__(self, sweep: Sweep):
        self.sweep = sweep

    def roles(
        self, f: Finding, metric: str, per_trial: pd.DataFrame, treatment: str, control: str,
        claimed: str, primary: bool = True, where: dict | None = None,
    ) -> list[Comparison]:  # fmt: skip
        """One Comparison per pair of conditions, `treatment` modality against `control`,
        with the same `match` key (differ only in the init). Two pretrained modalities are
        compared at the same scale only. `where`: column filters applied to both sides."""
        spec = f"{metric}: {treatment} vs {control}"
        if primary and spec not in f.primary_specs:
            f.primary_specs.append(spec)
        sel = per_trial
        for col, val in (where or {}).items():
            sel = sel[sel[col] == val]
        sel = sel[sel["init_family"].map(MODALITY).notna()]
        out = []
        conds = sel.drop_duplicates("variant").set_index("variant")
        for _match, g in conds.groupby("match", sort=True):
            a_side = g[g["init_family"].map(MODALITY) == treatment]
            b_side = g[g["init_family"].map(MODALITY) == control]
            for va, a in a_side.iterrows():
                for vb, b in b_side.iterrows():
                    pretrained = {treatment, control} - {"none"}
                    if len(pretrained) == 2 and _scale(a["init_family"]) != _scale(b["init_family"]):
                        continue
                    scale = _scale(a["init_family"], b["init_family"])
                    label = f"{metric}: {treatment} ({a['init_family']}) vs {control} ({b['init_family']}), {scale}"
                    c = self.pair(label, spec, sel, {"variant": va}, {"variant": vb}, claimed, primary)
                    c.scale, c.conditions = scale, f"{a['condition']} vs {b['condition']}"
                    out.append(c)
        if not out:
            f.missing.append(
                f"{spec}: needs {treatment}-modality and {control}-modality conditions that differ only in the init "
                "(e.g. both inits in one study)" + (" (context only)" if not primary else "")
            )
        f.comparisons += out
        return out

    def pair(self, label: str, spec: str, per_trial: pd.DataFrame, a: dict, b: dict, claimed: str,
             primary: bool) -> Comparison:  # fmt: skip
        """Compare the rows of `per_trial` selected by filters `a` (treatment) and `b` (control)."""
        c = Comparison(label, primary, spec, claimed=claimed)
        a_s, b_s = by_stratum(per_trial, "value", **a), by_stratum(per_trial, "value", **b)
        shared = sorted(set(a_s) & set(b_s))
        if not shared:
            c.missing = "the two conditions share no dataset"
            return c
        a_s, b_s = {k: a_s[k] for k in shared}, {k: b_s[k] for k in shared}
        c.decision = compare(a_s, b_s, claimed=claimed)
        c.poi = probability_of_improvement(a_s, b_s)
        if len(shared) > 1:
            c.per_stratum = [(k, compare({k: a_s[k]}, {k: b_s[k]}, claimed=claimed)) for k in shared]
        return c


def _decide(f: Finding) -> None:
    """Per scale: Holm over the primary comparisons (stats.combine), and a scale whose finding
    lacks one of its primary comparisons is at best inconclusive (the claim is partly untested)."""
    scales = [s for s in (PAPER, MINI) if any(c.primary and c.decision and c.scale == s for c in f.comparisons)]
    for scale in scales:
        parts = [c for c in f.comparisons if c.primary and c.decision is not None and c.scale == scale]
        verdict, per_part = combine([c.decision for c in parts])
        for c, v, p in zip(parts, per_part, holm([c.decision.p_value for c in parts])):
            c.part_verdict, c.p_holm = v, float(p)
        untested = [s for s in f.primary_specs if not any(c.spec == s and c.scale == scale for c in parts)]
        if untested:
            f.notes.append(f"{scale}: not measured — {'; '.join(untested)}.")
            if verdict == SUPPORTED:
                verdict = INCONCLUSIVE
        f.verdicts[scale] = verdict


# ---- the findings


def f1_representation(sweep: Sweep, cmp: _Comparer, f: Finding) -> None:
    cka, k = M.runs_at(sweep.diag("cka"), MAIN_K)
    token = "state" if (cka["token"] == "state").any() else None
    sel = cka if token is None else cka[cka["token"] == token]
    f.notes.append(
        f"K={k}; CKA averaged over every measured layer of the {token or 'all'} token(s). The verdict uses the "
        "debiased CKA (unbiased HSIC): plug-in CKA is biased upwards at these widths and sample sizes, and is "
        "shown beside it as context."
    )
    if "cka_debiased" in sel.columns and sel["cka_debiased"].notna().any():
        debiased = M.trial_scalar(sel[sel["cka_debiased"].notna()], "cka_debiased")
        cmp.roles(f, "debiased CKA", debiased, "language", "none", "less")
        cmp.roles(f, "debiased CKA", debiased, "image", "none", "less", primary=False)
    else:
        f.missing.append("diagnostics/cka.parquet has no cka_debiased values: rerun "
                         f"`dtsweep diagnose {sweep.root} --kinds cka`")  # fmt: skip
    plugin = M.trial_scalar(sel, "cka")
    cmp.roles(f, "plug-in CKA", plugin, "language", "none", "less", primary=False)
    cmp.roles(f, "plug-in CKA", plugin, "image", "none", "less", primary=False)


def f2_information(sweep: Sweep, cmp: _Comparer, f: Finding) -> None:
    mine, k = M.runs_at(sweep.diag("mine"), MAIN_K)
    mid = M.mine_middle(mine)
    f.notes.append(f"K={k}; middle measured block of each condition; mean over token positions and types.")
    # The estimator's size bounds what it can see: a reduced MINE is stated, never implied.
    settings = [c for c in ("hidden", "n", "steps") if c in mine.columns]
    if settings and "depth" in mine.columns:
        first = mine.iloc[0]
        depths = ", ".join(sorted(mine["depth"].dropna().unique()))
        stop = f", median stop step {mine['stop_step'].median():.0f}" if "stop_step" in mine.columns else ""
        f.notes.append(f"MINE as measured: 3-layer critics {first.get('hidden')} wide, {first.get('n')} windows, "
                       f"at most {first.get('steps')} steps{stop}; blocks measured: {depths}.")  # fmt: skip
    for which in ("X", "Y"):
        per_trial = M.trial_scalar(mid[mid["which"] == which], "mi_nats")
        cmp.roles(f, f"I({which};T)", per_trial, "language", "none", "less")
        cmp.roles(f, f"I({which};T)", per_trial, "image", "none", "less", primary=False)


def f3_parameters(sweep: Sweep, cmp: _Comparer, f: Finding) -> None:
    params, k = M.runs_at(sweep.diag("params"), MAIN_K)
    l2, cos = M.trial_scalar(params, "l2"), M.trial_scalar(params, "cosine")
    f.notes.append(f"K={k}; means over every measured transformer-block tensor.")
    cmp.roles(f, "mean L2", l2, "language", "none", "less")
    cmp.roles(f, "mean cosine", cos, "language", "none", "greater")
    cmp.roles(f, "mean L2", l2, "image", "none", "less", primary=False)
    cmp.roles(f, "mean cosine", cos, "image", "none", "greater", primary=False)


def f4_gradients(sweep: Sweep, cmp: _Comparer, f: Finding) -> None:
    grads, k = M.runs_at(sweep.diag("gradients"), MAIN_K)
    clipped = M.clipped_fraction(grads)
    f.notes.append(f"K={k}; epoch-1 gradients; 'clipped' is the fraction of samples whose norm clipping shortened.")
    cmp.roles(f, "clipped fraction", clipped, "image", "none", "greater")
    cmp.roles(f, "clipped fraction", clipped, "image", "language", "greater")
    if clipped["value"].nunique() == 1:
        f.notes.append(f"every trial's clipped fraction is {clipped['value'].iloc[0]:.2f}: the measure saturates "
                       "(per-sample gradient norms all above the clip), so the mean norm below is the informative one.")  # fmt: skip
    norms = M.trial_scalar(grads[grads["grad_norm"].notna()], "grad_norm")
    cmp.roles(f, "mean per-sample gradient norm", norms, "image", "none", "greater", primary=False)
    cmp.roles(f, "mean per-sample gradient norm", norms, "image", "language", "greater", primary=False)
    try:
        conf = M.confusion(grads)
        cmp.roles(f, "confusion", conf, "language", "none", "less", primary=False)
        cmp.roles(f, "confusion", conf, "image", "none", "less", primary=False)
        ln = M.first_ln_share(grads)
        cmp.roles(f, "first-LN share", ln, "image", "none", "greater", primary=False)
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
    cmp.roles(f, f"AUC K={NO_CONTEXT_K}", auc, "language", "none", "greater", where={"context_len": NO_CONTEXT_K})
    if k_main is None:
        f.missing.append(f"slowdown: needs K={MAIN_K} trials")
        f.primary_specs.append("slowdown: none vs language")
        return
    # Slowdown from removing context, per (condition without K, dataset, seed): AUC at K_main
    # minus AUC at K=1 of two trials that differ only in K.
    auc = sweep.keys(auc[auc["context_len"].isin([NO_CONTEXT_K, k_main])], drop=("context_len",))
    wide = auc.pivot_table(index=["variant", "dataset", "seed"], columns="context_len", values="value")
    if NO_CONTEXT_K in wide and k_main in wide:
        slow = (wide[k_main] - wide[NO_CONTEXT_K]).dropna().rename("value").reset_index()
    else:
        slow = pd.DataFrame(columns=["variant", "dataset", "seed", "value"])
    info = auc.drop_duplicates("variant").set_index("variant")[["match", "init_family", "init"]]
    slow = slow.join(info, on="variant")
    slow["condition"] = slow["init"].astype(str) + f" K={k_main} minus K={NO_CONTEXT_K}"
    f.notes.append(f"'slowdown' is AUC(K={k_main}) - AUC(K={NO_CONTEXT_K}) of the same seed in two conditions that "
                   "differ only in K.")  # fmt: skip
    if not sweep.from_config:
        f.notes.append("without config_json the K=1 and K=20 conditions can only be matched within one study.")
    cmp.roles(f, "slowdown", slow, "none", "language", "greater")


SWAP_DROP = ("swap_block", "swap_from", "train.epochs")


def f6_block_swap(sweep: Sweep, cmp: _Comparer, f: Finding) -> None:
    swaps, base, k = M.swap_runs(sweep.require_metrics())
    last = int(swaps["epoch"].max())
    base = base[base["init_family"] == "random"]
    if base.empty:
        raise MissingData(f"needs init_family=random trials at context_len={k} without a swap: the block swaps' baseline")
    arms = pd.concat([swaps, base])
    f.notes.append(
        f"K={k}; curve means over epochs 1..{last} (the swap runs' length). Each swapped block is its own condition "
        "and comparison, against the unswapped random condition that differs only in the swap (and in its number "
        "of epochs; only the first epochs are compared)."
    )
    for value, name, claimed in (("action_error", "action error", "less"), ("normalized_score", "score", "greater")):
        per_trial = M.curve_mean(arms, value, 1, last)
        per_trial = sweep.keys(per_trial, drop=SWAP_DROP, variant=False)
        info = arms.drop_duplicates("trial_id").set_index("trial_id")["swap_block"]
        per_trial["swap"] = per_trial["trial_id"].map(info)
        controls = per_trial[per_trial["swap"].isna()].drop_duplicates("variant")
        treated = per_trial[per_trial["swap"].notna()].drop_duplicates("variant")
        spec = f"{name}: block swap vs random"
        if spec not in f.primary_specs:
            f.primary_specs.append(spec)
        for _, t in treated.sort_values("swap").iterrows():
            source = json.loads(sweep.identity.get(t["trial_id"], {}).get("swap_from", "null") or "null")
            for _, c in controls[controls["match"] == t["match"]].iterrows():
                scale = _scale(str(source))
                label = f"{name}: random with block {int(t['swap'])} of {source or 'a pretrained model'} vs random, {scale}"
                comp = cmp.pair(label, spec, per_trial, {"variant": t["variant"]}, {"variant": c["variant"]}, claimed, True)
                comp.scale, comp.conditions = scale, f"{t['condition']} vs {c['condition']}"
                f.comparisons.append(comp)
    if not any(c.spec.endswith("block swap vs random") for c in f.comparisons):
        f.missing.append("needs unswapped random trials that differ from the swap trials only in the swap")


def f7_attention(sweep: Sweep, cmp: _Comparer, f: Finding) -> None:
    att, k = M.runs_at(sweep.diag("attention"), NO_CONTEXT_K)
    gaps, epoch = M.attention_gaps(att, ATTENTION_EPOCH)
    per_trial = M.trial_scalar(gaps, "gap")
    f.notes.append(f"K={k}; gap |d(epoch {epoch}) - d(epoch 0)| of the head-mean attention distance, mean over blocks.")
    cmp.roles(f, "attention gap", per_trial, "language", "none", "less")
    cmp.roles(f, "attention gap", per_trial, "image", "none", "less", primary=False)
    per_block = gaps.rename(columns={"gap": "value"})
    for b in sorted(per_block["block"].unique()):
        cmp.roles(f, f"block {b} attention gap", per_block, "language", "none", "less", primary=False, where={"block": b})
    f.missing[:] = [m for m in f.missing if not m.startswith("block ")]  # per-block context: absence said once above


FINDINGS: list[tuple[int, str, str, list[str], Callable]] = [
    (1, "Feature reuse may not be the cause: pre-trained models changed their representations more.",
     "The debiased CKA between epoch 0 and the final epoch (K=20, state token, mean over layers) is lower for a "
     "language-pretrained init than for a random one with the same settings.", ["cka_layers"], f1_representation),
    (2, "Better fitting to data may not be the cause: pre-trained models contain less information of data.",
     "MINE estimates at the middle block (mean over token positions) are lower for a language-pretrained init than "
     "for random, for both I(X;T) and I(Y;T).", ["mine_positions"], f2_information),
    (3, "Some unchanged parameters may be the cause: pre-trained models don't change parameters so much.",
     "Per-tensor L2 distance between epoch 0 and the final epoch is smaller, and cosine similarity larger, "
     "for a language-pretrained init than for random.", ["params_l2", "params_cosine"], f3_parameters),
    (4, "Large gradient with gradient clipping may degrade the performance: iGPT's gradient norms collapse by clipping.",
     "At epoch 1 a larger fraction of an image-pretrained init's per-sample gradients is clipped at 0.25 than of "
     "random's and of a language-pretrained init's.", ["gradients", "gradient_share"], f4_gradients),
    (5, "Pre-trained models learn efficiently even without context.",
     "With K=1, a language-pretrained init's normalised score averaged over epochs is higher than random's; and "
     "removing the context (K=20 -> K=1) costs random more than it.", ["return_curves"], f5_no_context),
    (6, "Even a single pre-trained block improves training efficiency.",
     "K=1 random models with one pretrained block have a lower mean action error and a higher mean score over "
     "the first epochs than random models without one, for every swapped block.", ["block_swap"], f6_block_swap),
    (7, "A pre-acquired way to use context is a cause of the success.",
     "The attention-distance gap between epoch 0 and epoch 4 (K=1, mean over blocks) is smaller for a "
     "language-pretrained init than for random.", ["attention_gap"], f7_attention),
]  # fmt: skip


def evaluate_findings(sweep: Sweep) -> list[Finding]:
    """All seven findings; one whose data is missing or unreadable carries the reason in
    `missing` (never raises on bad data)."""
    cmp = _Comparer(sweep)
    out = []
    for number, poster, claim, figures, build in FINDINGS:
        f = Finding(number, poster, claim, figures)
        try:
            build(sweep, cmp, f)
        except MissingData as e:
            f.missing.append(str(e))
        except DATA_ERRORS as e:
            f.missing.append(f"could not be computed from this sweep's data ({type(e).__name__}: {e})")
        f.missing += [f"{c.label}: {c.missing}" for c in f.comparisons if c.missing and c.primary]
        _decide(f)
        out.append(f)
    return out


FINDINGS_COLUMNS = [
    "finding", "scale", "comparison", "conditions", "primary", "scope", "claim", "effect", "ci_low", "ci_high",
    "p_value", "p_holm", "test", "n_treatment", "n_control", "prob_improvement", "verdict",
]  # fmt: skip


def findings_frame(findings: list[Finding]) -> pd.DataFrame:
    """One row per (finding, comparison, scope) for findings.csv: scope "all" (the comparison,
    stratified by dataset) or one dataset. effect = mean(treatment) - mean(control) with its
    95% CI (Welch); claim "> 0" or "< 0"; p_holm and verdict of a primary comparison are
    Holm-corrected within its finding and scale; per-dataset rows are uncorrected context."""
    rows = []
    for f in findings:
        for c in f.comparisons:
            base = {"finding": f.number, "scale": c.scale, "comparison": c.label, "conditions": c.conditions,
                    "primary": c.primary, "claim": "> 0" if c.claimed == "greater" else "< 0"}  # fmt: skip
            if c.decision is None:
                rows.append(base | {"scope": "all", "verdict": NO_DATA})
                continue
            scopes = [("all", c.decision, c.p_holm, c.verdict, c.poi)]
            scopes += [(k, d, None, d.verdict, None) for k, d in c.per_stratum]
            for scope, d, p_holm, verdict, poi in scopes:
                rows.append(base | {
                    "scope": scope, "effect": d.effect, "ci_low": d.ci_low, "ci_high": d.ci_high,
                    "p_value": d.p_value, "p_holm": p_holm, "test": d.test, "n_treatment": d.n_treatment,
                    "n_control": d.n_control, "prob_improvement": poi, "verdict": verdict,
                })  # fmt: skip
    return pd.DataFrame(rows, columns=FINDINGS_COLUMNS)


def fewest_seeds(f: Finding, scale: str) -> int | None:
    n = [min(c.decision.n_treatment, c.decision.n_control) for c in f.comparisons
         if c.primary and c.decision is not None and c.scale == scale]  # fmt: skip
    return min(n) if n else None

"""The report's figures: each function draws one PNG with bands across seeds.

Bands are 95% percentile-bootstrap intervals of the mean over seeds (whole curves are
resampled). Every function returns (Figure, caption) or raises MissingData. matplotlib's
object API (Figure, not pyplot) keeps rendering headless and free of global state.

One line, bar or row per *condition* (the trial's configuration without its seed, labelled
"init K=k [study]"), one panel per dataset: conditions that differ in anything but the seed
are never drawn as one.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure

from dtsweep.report import measures as M
from dtsweep.report.inputs import GRAD_CLIP, MAIN_K, NO_CONTEXT_K, MissingData, Sweep, no_swap
from dtsweep.stats import bootstrap_band

TOKEN_MARKERS = {"return": "^", "state": "o", "action": "x"}  # Takagi's Fig. 2 markers
EMA_ALPHA = 0.5  # smoothing of the block-swap curves (the paper does not give its factor)
N_BOOT_BAND = 1000


def _palette(conditions) -> dict[str, str]:
    """One colour per condition, the same in every panel of a figure."""
    names = sorted(set(conditions))
    cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {n: cmap(i % cmap.N) for i, n in enumerate(names)}


def _grid(nrows: int, ncols: int, w: float = 4.4, h: float = 3.2, sharey: bool = False) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(w * ncols, h * nrows), layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False, sharey=sharey)


def _band(ax, x, curves: np.ndarray, label: str, col: str, ls: str = "-", marker: str | None = None) -> None:
    """Mean over seeds with its bootstrap band; curves [n_seeds, len(x)]."""
    mean, low, high = bootstrap_band(curves, n_boot=N_BOOT_BAND)
    ax.plot(x, mean, ls=ls, color=col, marker=marker, ms=4, label=f"{label} (n={len(curves)})")
    if len(curves) > 1:
        ax.fill_between(x, low, high, color=col, alpha=0.2, lw=0)


def _seed_curves(df: pd.DataFrame, x: str, value: str) -> tuple[np.ndarray, np.ndarray]:
    """(x values, [n_trials, n_x]) keeping only x values every trial has."""
    wide = df.pivot_table(index="trial_id", columns=x, values=value, aggfunc="mean").dropna(axis=1)
    return wide.columns.to_numpy(), wide.to_numpy(float)


def _datasets(df: pd.DataFrame) -> list[str]:
    """The panels of a figure: one per dataset (an env trained on two datasets is two tasks)."""
    return sorted(df["dataset"].unique())


def _legend(axes: np.ndarray) -> None:
    for ax in axes.flat:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)


# ---- metrics


def final_scores_bars(table: pd.DataFrame) -> tuple[Figure, str]:
    """Final-epoch normalised score per condition and dataset with 95% CIs (final_scores.csv)."""
    if table.empty:
        raise MissingData("no finished trial without a block swap")
    datasets = _datasets(table)
    n_bars = max(len(table[table["dataset"] == d]) for d in datasets)
    fig, axes = _grid(1, len(datasets), w=max(4.4, 0.6 * n_bars + 1.5), h=3.6)
    for ax, dataset in zip(axes[0], datasets):
        t = table[table["dataset"] == dataset].reset_index(drop=True)
        labels = [f"{r.init} K={r.context_len}\n[{r.study}]" for r in t.itertuples()]
        err = np.vstack([t["mean"] - t["ci_low"], t["ci_high"] - t["mean"]])
        ax.bar(np.arange(len(t)), t["mean"], 0.7, yerr=err, capsize=3, color=[f"C{i % 10}" for i in range(len(t))])
        ax.set_xticks(np.arange(len(t)), labels, rotation=35, ha="right", fontsize=7)
        ax.set_title(dataset)
        ax.set_ylabel("normalised score (final epoch)")
    return fig, "Final-epoch D4RL normalised score per condition, mean over seeds with 95% bootstrap CI."


def _curves(sweep: Sweep, value: str, ylabel: str) -> Figure:
    m = no_swap(sweep.require_metrics())
    m = m[m[value].notna()]  # epoch 0 has an action error but no evaluation
    if m.empty:
        raise MissingData(f"no {value} values in the metrics")
    datasets = _datasets(m)
    fig, axes = _grid(1, len(datasets))
    styles = ["-", "--", ":", "-."]
    ks = sorted(m["context_len"].unique())
    colors = _palette(m["condition"])
    for ax, dataset in zip(axes[0], datasets):
        for cond, g in m[m["dataset"] == dataset].groupby("condition"):
            x, c = _seed_curves(g, "epoch", value)
            _band(ax, x, c, cond, colors[cond], styles[ks.index(g["context_len"].iloc[0]) % len(styles)])
        ax.set_title(dataset)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
    _legend(axes)
    return fig


def return_curves(sweep: Sweep) -> tuple[Figure, str]:
    fig = _curves(sweep, "normalized_score", "normalised score")
    caption = (f"Normalised score during fine-tuning per init and context length (Takagi Fig. 8 compares "
               f"K={NO_CONTEXT_K} with K={MAIN_K}); bands are 95% bootstrap CIs across seeds.")  # fmt: skip
    return fig, caption


def action_error_curves(sweep: Sweep) -> tuple[Figure, str]:
    fig = _curves(sweep, "action_error", "action error (MSE)")
    return fig, "Action prediction error during fine-tuning per init and K; bands are 95% bootstrap CIs across seeds."


def block_swap(sweep: Sweep) -> tuple[Figure, str]:
    swaps, base, k = M.swap_runs(sweep.require_metrics())
    datasets = _datasets(swaps)
    fig, axes = _grid(len(datasets), 2)
    swap_conds = sorted(swaps["condition"].unique(), key=lambda c: (len(c), c))
    base_styles = ["--", ":", "-.", (0, (1, 4))]
    for row, dataset in zip(axes, datasets):
        for ax, value in zip(row, ("action_error", "normalized_score")):
            for i, cond in enumerate(swap_conds):
                one = swaps[(swaps["dataset"] == dataset) & (swaps["condition"] == cond)]
                _smoothed_curve(ax, one, value, cond, _viridis(i, len(swap_conds)), "-")
            for j, (cond, g) in enumerate(base[base["dataset"] == dataset].groupby("condition")):
                _smoothed_curve(ax, g, value, f"{cond} (no swap)", "black", base_styles[j % len(base_styles)])
            ax.set_title(f"{dataset}: {'action error' if value == 'action_error' else 'normalised score'} (EMA {EMA_ALPHA})")
            ax.set_xlabel("epoch")
    _legend(axes)
    caption = (f"Block swap (Takagi Fig. 9), K={k}: a random model with block i taken from a pretrained one, against the "
               f"unswapped conditions at K={k}; curves smoothed by an EMA (alpha {EMA_ALPHA}) per seed before averaging.")  # fmt: skip
    return fig, caption


def _smoothed_curve(ax, trials: pd.DataFrame, value: str, label: str, col, ls: str) -> None:
    """EMA-smoothed curve of `value` per seed, then their mean and band."""
    rows = trials[trials[value].notna()]  # epoch 0 has an action error but no evaluation
    if not rows.empty:
        x, curves = _seed_curves(rows, "epoch", value)
        _band(ax, x, M.ema(curves, EMA_ALPHA), label, col, ls)


def _viridis(i: int, n: int):
    return colormaps["viridis"](i / max(n - 1, 1))


# ---- diagnostics


def cka_layers(sweep: Sweep) -> tuple[Figure, str]:
    cka, k = M.runs_at(sweep.diag("cka"), MAIN_K)
    value = "cka_debiased" if "cka_debiased" in cka.columns and cka["cka_debiased"].notna().any() else "cka"
    datasets, tokens = _datasets(cka), [t for t in TOKEN_MARKERS if t in set(cka["token"])]
    fig, axes = _grid(len(datasets), len(tokens))
    colors = _palette(cka["condition"])
    for row, dataset in zip(axes, datasets):
        sel = cka[cka["dataset"] == dataset]
        conds = sorted(sel["condition"].unique())
        n_layers = {c: sel[sel["condition"] == c]["layer"].nunique() for c in conds}
        gpt2 = [c for c in conds if (sel.loc[sel["condition"] == c, "init_family"] == "gpt2").any()]
        n_ref = n_layers[gpt2[0]] if gpt2 else min(n_layers.values())
        for ax, token in zip(row, tokens):
            for cond in conds:
                mat, _ = M.cka_matrix(sel, cond, dataset, token, value)
                if mat.size:
                    x, v = M.to_reference_layers(mat, n_ref)
                    _band(ax, x, v, cond, colors[cond])
            ax.set_title(f"{dataset}: {token} token")
            ax.set_xlabel(f"normalised layer index (0..{n_ref - 1})")
            ax.set_ylabel(f"{'debiased ' if value == 'cka_debiased' else ''}CKA epoch 0 vs final")
            ax.set_ylim(min(0.0, float(np.nanmin(sel[value], initial=0.0))), 1.05)
    _legend(axes)
    kind = "Debiased linear CKA (unbiased HSIC)" if value == "cka_debiased" else "Linear CKA (plug-in)"
    return fig, (f"{kind} of every internal activation between epoch 0 and the final epoch (Takagi Fig. 1), K={k}; "
                 "models with twice the layers (iGPT) are averaged over adjacent pairs onto the GPT-2 axis.")  # fmt: skip


def mine_positions(sweep: Sweep) -> tuple[Figure, str]:
    mine, k = M.runs_at(sweep.diag("mine"), MAIN_K)
    mine = M.mine_middle(mine)
    datasets = _datasets(mine)
    fig, axes = _grid(len(datasets), 2)
    colors = _palette(mine["condition"])
    for row, dataset in zip(axes, datasets):
        for ax, which in zip(row, ("X", "Y")):
            sel = mine[(mine["dataset"] == dataset) & (mine["which"] == which)]
            for (cond, token), g in sel.groupby(["condition", "token"]):
                x, c = _seed_curves(g, "position", "mi_nats")
                _band(ax, x, c, f"{cond} {token}", colors[cond], marker=TOKEN_MARKERS.get(token, "s"))
            ax.set_title(f"{dataset}: I({which};T), middle block")
            ax.set_xlabel("token position in the context")
            ax.set_ylabel("MI (nats)")
    _legend(axes)
    blocks = ", ".join(f"{c}: block {b}" for c, b in M.middle_blocks(mine).items())
    caption = f"MINE estimates of I(X;T) and I(Y;T) per token position at the middle block ({blocks}), K={k}"
    return fig, caption + " (Takagi Fig. 2)."


def _params(sweep: Sweep, value: str, label: str) -> Figure:
    params, _ = M.runs_at(sweep.diag("params"), MAIN_K)
    params = params[params[value].notna()]
    if params.empty:
        raise MissingData(f"diagnostics/params.parquet has no {value} values")
    conds, datasets = sorted(params["condition"].unique()), _datasets(params)
    colors = _palette(conds)
    fig, axes = _grid(len(conds), len(datasets), w=5.0, h=2.6, sharey=True)  # one scale: conditions are compared
    for row, cond in zip(axes, conds):
        for ax, dataset in zip(row, datasets):
            sel = params[(params["condition"] == cond) & (params["dataset"] == dataset)]
            order = sel.drop_duplicates("tensor").sort_values("block", kind="stable")["tensor"].tolist()
            # Tensors some trial lacks (diagnose --fast measures a subset) are left out, not an error.
            wide = sel.pivot_table(index="trial_id", columns="tensor", values=value, aggfunc="mean")
            wide = wide.reindex(columns=order).dropna(axis=1)
            if sel.empty or wide.shape[1] == 0:
                ax.set_visible(False)
                continue
            _band(ax, np.arange(wide.shape[1]), wide.to_numpy(float), cond, colors[cond])
            ax.set_title(f"{cond}, {dataset}", fontsize=8)
            ax.set_xlabel("tensor index (shallow to deep)")
            ax.set_ylabel(label)
    _legend(axes)
    return fig


def params_l2(sweep: Sweep) -> tuple[Figure, str]:
    fig = _params(sweep, "l2", "L2 distance")
    return fig, "L2 distance of each transformer-block tensor between epoch 0 and the final epoch (Takagi Fig. 3)."


def params_cosine(sweep: Sweep) -> tuple[Figure, str]:
    fig = _params(sweep, "cosine", "cosine similarity")
    return fig, "Cosine similarity of each transformer-block tensor between epoch 0 and the final epoch (Takagi Fig. 4)."


def gradients(sweep: Sweep) -> tuple[Figure, str]:
    grads, k = M.runs_at(sweep.diag("gradients"), MAIN_K)
    samples, conf = M.gradient_samples(grads), M.confusion(grads)
    datasets = _datasets(samples)
    colors = _palette(samples["condition"])
    fig, axes = _grid(len(datasets), 2, w=5.2)
    for row, dataset in zip(axes, datasets):
        s = samples[samples["dataset"] == dataset]
        bins = np.linspace(0, max(GRAD_CLIP * 1.1, s["grad_norm_clipped"].max() * 1.05), 40)
        for cond, g in s.groupby("condition"):
            row[0].hist(g["grad_norm_clipped"], bins=bins, density=True, histtype="step", color=colors[cond], label=cond)
        row[0].axvline(GRAD_CLIP, color="k", ls="--", lw=0.8)
        row[0].set_title(f"{dataset}: per-sample norm, clipped")
        row[0].set_xlabel("gradient norm")
        c = conf[conf["dataset"] == dataset]
        conds = sorted(c["condition"].unique())
        for j, cond in enumerate(conds):
            v = c[c["condition"] == cond]["value"].to_numpy()
            mean, low, high = (a[0] for a in bootstrap_band(v[:, None], n_boot=N_BOOT_BAND))
            col = colors.get(cond, "k")
            row[1].scatter(np.full(len(v), j) + np.linspace(-0.1, 0.1, len(v)), v, color=col, s=12, alpha=0.6)
            row[1].errorbar(j + 0.25, mean, yerr=[[mean - low], [high - mean]], fmt="o", color=col, capsize=3)
        row[1].set_xticks(range(len(conds)), conds, rotation=30, ha="right", fontsize=7)
        row[1].set_title(f"{dataset}: confusion (min pairwise cosine)")
    _legend(axes)
    return fig, (f"Gradients at epoch 1, K={k} (Takagi Figs. 5-6): left, per-sample norms after clipping at "
                 f"{GRAD_CLIP} (dashed), pooled over seeds; right, gradient confusion per seed with the mean and 95% CI.")  # fmt: skip


def gradient_share(sweep: Sweep) -> tuple[Figure, str]:
    grads, k = M.runs_at(sweep.diag("gradients"), MAIN_K)
    shares = M.tensor_shares(grads)
    datasets = _datasets(shares)
    colors = _palette(shares["condition"])
    fig, axes = _grid(len(datasets), 1, w=10, h=3.4)
    for ax, dataset in zip(axes[:, 0], datasets):
        s = shares[shares["dataset"] == dataset]
        top = s.groupby("tensor")["share"].mean().nlargest(8).index.tolist()
        s = s.assign(tensor=s["tensor"].where(s["tensor"].isin(top), "others"))
        per_trial = s.groupby(["trial_id", "condition", "tensor"], as_index=False)["share"].sum()
        names = top + (["others"] if (per_trial["tensor"] == "others").any() else [])
        conds = sorted(per_trial["condition"].unique())
        width = 0.8 / len(conds)
        for j, cond in enumerate(conds):
            wide = per_trial[per_trial["condition"] == cond].pivot(index="trial_id", columns="tensor", values="share")
            wide = wide.reindex(columns=names).fillna(0.0)
            mean, low, high = bootstrap_band(wide.to_numpy(float), n_boot=N_BOOT_BAND)
            x = np.arange(len(names)) + (j - (len(conds) - 1) / 2) * width
            ax.bar(x, mean, width, yerr=[mean - low, high - mean], capsize=2, color=colors[cond], label=cond)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("share of gradient norm")
        ax.set_title(dataset)
    _legend(axes)
    caption = f"Share of the gradient norm per tensor at epoch 1, K={k} (Takagi Fig. 7): the 8 largest tensors and the rest."
    return fig, caption


def attention_gap(sweep: Sweep) -> tuple[Figure, str]:
    att, k = M.runs_at(sweep.diag("attention"), NO_CONTEXT_K)
    gaps, epoch = M.attention_gaps(att)
    datasets = _datasets(gaps)
    colors = _palette(gaps["condition"])
    fig, axes = _grid(1, len(datasets))
    for ax, dataset in zip(axes[0], datasets):
        for cond, g in gaps[gaps["dataset"] == dataset].groupby("condition"):
            x, c = _seed_curves(g, "block", "gap")
            _band(ax, x, c, cond, colors[cond], marker="o")
        ax.set_title(dataset)
        ax.set_xlabel("block")
        ax.set_ylabel(f"|d(epoch {epoch}) - d(epoch 0)| (tokens)")
    _legend(axes)
    return fig, f"Attention-distance gap between epoch 0 and epoch {epoch} per block, K={k} (Takagi Fig. 10)."


def search_objective(search: pd.DataFrame) -> tuple[Figure, str]:
    """Objective of every finished search sample against its clip norm, per init
    (search.parquet, written by search studies: dtsweep.search). Samples without clipping
    sit at "off", right of the range; each init's best sample is starred."""
    if "train.grad_clip" not in search.columns:
        raise MissingData("the search studies do not sample train.grad_clip")
    done = search[(search["status"] == "finished") & search["objective"].notna()]
    if done.empty:
        raise MissingData("no finished search sample in search.parquet")
    panels = sorted(done.groupby(["study", "dataset", "metric", "at"]).groups)
    fig, axes = _grid(1, len(panels), w=5.0, h=3.6)
    for ax, (study, dataset, metric, at) in zip(axes[0], panels):
        sel = done[(done["study"] == study) & (done["dataset"] == dataset)]
        clips = sel["train.grad_clip"]
        lo, hi = float(np.nanmin(clips.to_numpy(float), initial=np.inf)), float(np.nanmax(clips.to_numpy(float), initial=-np.inf))
        lo, hi = (GRAD_CLIP, GRAD_CLIP) if not np.isfinite(lo) else (min(lo, GRAD_CLIP), max(hi, GRAD_CLIP))
        off_x = hi * 4  # "off" = no clipping: an unbounded norm, drawn past the largest one
        colors = _palette(sel["init"])
        for init, g in sel.groupby("init"):
            x = g["train.grad_clip"].fillna(off_x).to_numpy(float)
            ax.scatter(x, g["objective"], color=colors[init], s=18, alpha=0.75, label=f"{init} (n={len(g)})")
            best = g["objective"].idxmax() if g["direction"].iloc[0] == "maximize" else g["objective"].idxmin()
            ax.scatter(
                [x[g.index.get_loc(best)]], [g.loc[best, "objective"]], color=colors[init], marker="*", s=160, edgecolor="k"
            )
        ax.axvline(GRAD_CLIP, color="k", ls="--", lw=0.8)
        ax.set_xscale("log")
        ax.minorticks_off()
        ticks = sorted({GRAD_CLIP, *(t for t in (0.01, 0.1, 1, 10, 100, 1000) if lo / 2 <= t <= hi * 2)})
        ax.set_xticks([*ticks, off_x], [*(f"{t:g}" for t in ticks), "off"])
        ax.set_xlabel("grad-clip norm")
        ax.set_ylabel(f"{metric} ({at})")
        ax.set_title(f"{study}: {dataset}")
    _legend(axes)
    caption = (f"Search samples: objective against the gradient-clipping norm per init (dashed: the papers' {GRAD_CLIP}; "
               "'off': no clipping; star: each init's best). Each point is one sample (its other settings, e.g. "
               "the learning rate, vary too) and one seed, so this shows where good settings lie, not seed CIs.")  # fmt: skip
    return fig, caption


# name -> drawing function; final_scores_bars takes the table and is called separately.
FIGURES = {
    "return_curves": return_curves,
    "action_error_curves": action_error_curves,
    "block_swap": block_swap,
    "cka_layers": cka_layers,
    "mine_positions": mine_positions,
    "params_l2": params_l2,
    "params_cosine": params_cosine,
    "gradients": gradients,
    "gradient_share": gradient_share,
    "attention_gap": attention_gap,
}

"""The report's figures: each function draws one PNG with bands across seeds.

Bands are 95% percentile-bootstrap intervals of the mean over seeds (whole curves are
resampled). Every function returns (Figure, caption) or raises MissingData. matplotlib's
object API (Figure, not pyplot) keeps rendering headless and free of global state.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure

from dtsweep.report import measures as M
from dtsweep.report.inputs import GRAD_CLIP, MAIN_K, NO_CONTEXT_K, MissingData, Sweep, no_swap
from dtsweep.stats import bootstrap_band

INIT_COLORS = {
    "gpt2": "tab:blue", "igpt": "tab:orange", "random": "tab:green",
    "random-ref": "tab:olive", "chibit": "tab:purple", "clip": "tab:red",
}  # fmt: skip
TOKEN_MARKERS = {"return": "^", "state": "o", "action": "x"}  # Takagi's Fig. 2 markers
EMA_ALPHA = 0.5  # smoothing of the block-swap curves (the paper does not give its factor)
N_BOOT_BAND = 1000


def color(init: str) -> str:
    return INIT_COLORS.get(init, f"C{sum(map(ord, init)) % 10}")


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


def _envs(df: pd.DataFrame) -> list[str]:
    return sorted(df["env"].unique())


def _legend(axes: np.ndarray) -> None:
    for ax in axes.flat:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)


# ---- metrics


def final_scores_bars(table: pd.DataFrame) -> tuple[Figure, str]:
    """Final-epoch normalised score per init, env and K with 95% CIs (final_scores.csv)."""
    if table.empty:
        raise MissingData("no finished trial without a block swap")
    envs = sorted(table["env"].unique())
    ks = sorted(table["context_len"].unique())
    fig, axes = _grid(1, len(envs))
    for ax, env in zip(axes[0], envs):
        t = table[table["env"] == env]
        inits = sorted(t["init"].unique())
        width = 0.8 / len(ks)
        for j, k in enumerate(ks):
            tk = t[t["context_len"] == k].set_index("init").reindex(inits)
            x = np.arange(len(inits)) + (j - (len(ks) - 1) / 2) * width
            err = np.vstack([tk["mean"] - tk["ci_low"], tk["ci_high"] - tk["mean"]])
            ax.bar(x, tk["mean"], width, yerr=err, capsize=3, label=f"K={k}", alpha=0.85)
        ax.set_xticks(np.arange(len(inits)), inits)
        ax.set_title(env)
        ax.set_ylabel("normalised score (final epoch)")
    _legend(axes)
    return fig, "Final-epoch D4RL normalised score, mean over seeds with 95% bootstrap CI, per context length K."


def _curves(sweep: Sweep, value: str, ylabel: str) -> Figure:
    m = no_swap(sweep.require_metrics())
    m = m[m[value].notna()]  # epoch 0 has an action error but no evaluation
    if m.empty:
        raise MissingData(f"no {value} values in the metrics")
    envs = _envs(m)
    fig, axes = _grid(1, len(envs))
    styles = ["-", "--", ":", "-."]
    ks = sorted(m["context_len"].unique())
    for ax, env in zip(axes[0], envs):
        for (init, k), g in m[m["env"] == env].groupby(["init", "context_len"]):
            x, c = _seed_curves(g, "epoch", value)
            _band(ax, x, c, f"{init} K={k}", color(init), styles[ks.index(k) % len(styles)])
        ax.set_title(env)
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
    envs = _envs(swaps)
    fig, axes = _grid(len(envs), 2)
    blocks = sorted(swaps["swap_block"].astype(int).unique())
    for row, env in zip(axes, envs):
        for ax, value in zip(row, ("action_error", "normalized_score")):
            for i, b in enumerate(blocks):
                one = swaps[(swaps["env"] == env) & (swaps["swap_block"] == b)]
                _smoothed_curve(ax, one, value, f"block {b}", _viridis(i, len(blocks)), "-")
            for init, ls in (("random", "--"), ("gpt2", ":")):
                _smoothed_curve(ax, base[(base["env"] == env) & (base["init"] == init)], value, f"{init} (no swap)", "black", ls)
            ax.set_title(f"{env}: {'action error' if value == 'action_error' else 'normalised score'} (EMA {EMA_ALPHA})")
            ax.set_xlabel("epoch")
    _legend(axes)
    caption = (f"Block swap (Takagi Fig. 9), K={k}: a random model with block i taken from GPT-2, against the "
               f"random and GPT-2 models; curves smoothed by an EMA (alpha {EMA_ALPHA}) per seed before averaging.")  # fmt: skip
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
    envs, tokens = _envs(cka), [t for t in TOKEN_MARKERS if t in set(cka["token"])]
    fig, axes = _grid(len(envs), len(tokens))
    for row, env in zip(axes, envs):
        sel = cka[cka["env"] == env]
        inits = sorted(sel["init"].unique())
        n_layers = {i: sel[sel["init"] == i]["layer"].nunique() for i in inits}
        n_ref = n_layers.get("gpt2", min(n_layers.values()))
        for ax, token in zip(row, tokens):
            for init in inits:
                mat, _ = M.cka_matrix(sel, init, env, token)
                if mat.size:
                    x, v = M.to_reference_layers(mat, n_ref)
                    _band(ax, x, v, init, color(init))
            ax.set_title(f"{env}: {token} token")
            ax.set_xlabel(f"normalised layer index (0..{n_ref - 1})")
            ax.set_ylabel("CKA epoch 0 vs final")
            ax.set_ylim(0, 1.05)
    _legend(axes)
    return fig, (f"Linear CKA of every internal activation between epoch 0 and the final epoch (Takagi Fig. 1), K={k}; "
                 "models with twice the layers (iGPT) are averaged over adjacent pairs onto the GPT-2 axis.")  # fmt: skip


def mine_positions(sweep: Sweep) -> tuple[Figure, str]:
    mine, k = M.runs_at(sweep.diag("mine"), MAIN_K)
    mine = M.mine_middle(mine)
    envs = _envs(mine)
    fig, axes = _grid(len(envs), 2)
    for row, env in zip(axes, envs):
        for ax, which in zip(row, ("X", "Y")):
            sel = mine[(mine["env"] == env) & (mine["which"] == which)]
            for (init, token), g in sel.groupby(["init", "token"]):
                x, c = _seed_curves(g, "position", "mi_nats")
                _band(ax, x, c, f"{init} {token}", color(init), marker=TOKEN_MARKERS.get(token, "s"))
            ax.set_title(f"{env}: I({which};T), middle block")
            ax.set_xlabel("token position in the context")
            ax.set_ylabel("MI (nats)")
    _legend(axes)
    blocks = ", ".join(f"{i}: block {b}" for i, b in M.middle_blocks(mine).items())
    caption = f"MINE estimates of I(X;T) and I(Y;T) per token position at the middle block ({blocks}), K={k}"
    return fig, caption + " (Takagi Fig. 2)."


def _params(sweep: Sweep, value: str, label: str) -> Figure:
    params, _ = M.runs_at(sweep.diag("params"), MAIN_K)
    inits, envs = sorted(params["init"].unique()), _envs(params)
    fig, axes = _grid(len(inits), len(envs), w=5.0, h=2.6, sharey=True)  # one scale: inits are compared
    for row, init in zip(axes, inits):
        for ax, env in zip(row, envs):
            sel = params[(params["init"] == init) & (params["env"] == env)]
            if sel.empty:
                ax.set_visible(False)
                continue
            order = sel.drop_duplicates("tensor").sort_values("block", kind="stable")["tensor"].tolist()
            wide = sel.pivot_table(index="trial_id", columns="tensor", values=value, aggfunc="mean")[order].dropna(axis=1)
            _band(ax, np.arange(wide.shape[1]), wide.to_numpy(float), init, color(init))
            ax.set_title(f"{init}, {env}")
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
    envs = _envs(samples)
    fig, axes = _grid(len(envs), 2, w=5.2)
    for row, env in zip(axes, envs):
        s = samples[samples["env"] == env]
        bins = np.linspace(0, max(GRAD_CLIP * 1.1, s["grad_norm_clipped"].max() * 1.05), 40)
        for init, g in s.groupby("init"):
            row[0].hist(g["grad_norm_clipped"], bins=bins, density=True, histtype="step", color=color(init), label=init)
        row[0].axvline(GRAD_CLIP, color="k", ls="--", lw=0.8)
        row[0].set_title(f"{env}: per-sample norm, clipped")
        row[0].set_xlabel("gradient norm")
        c = conf[conf["env"] == env]
        inits = sorted(c["init"].unique())
        for j, init in enumerate(inits):
            v = c[c["init"] == init]["value"].to_numpy()
            mean, low, high = (a[0] for a in bootstrap_band(v[:, None], n_boot=N_BOOT_BAND))
            row[1].scatter(np.full(len(v), j) + np.linspace(-0.1, 0.1, len(v)), v, color=color(init), s=12, alpha=0.6)
            row[1].errorbar(j + 0.25, mean, yerr=[[mean - low], [high - mean]], fmt="o", color=color(init), capsize=3)
        row[1].set_xticks(range(len(inits)), inits)
        row[1].set_title(f"{env}: confusion (min pairwise cosine)")
    _legend(axes)
    return fig, (f"Gradients at epoch 1, K={k} (Takagi Figs. 5-6): left, per-sample norms after clipping at "
                 f"{GRAD_CLIP} (dashed), pooled over seeds; right, gradient confusion per seed with the mean and 95% CI.")  # fmt: skip


def gradient_share(sweep: Sweep) -> tuple[Figure, str]:
    grads, k = M.runs_at(sweep.diag("gradients"), MAIN_K)
    shares = M.tensor_shares(grads)
    envs = _envs(shares)
    fig, axes = _grid(len(envs), 1, w=10, h=3.4)
    for ax, env in zip(axes[:, 0], envs):
        s = shares[shares["env"] == env]
        top = s.groupby("tensor")["share"].mean().nlargest(8).index.tolist()
        s = s.assign(tensor=s["tensor"].where(s["tensor"].isin(top), "others"))
        per_trial = s.groupby(["trial_id", "init", "tensor"], as_index=False)["share"].sum()
        names = top + (["others"] if (per_trial["tensor"] == "others").any() else [])
        inits = sorted(per_trial["init"].unique())
        width = 0.8 / len(inits)
        for j, init in enumerate(inits):
            wide = per_trial[per_trial["init"] == init].pivot(index="trial_id", columns="tensor", values="share")
            wide = wide.reindex(columns=names).fillna(0.0)
            mean, low, high = bootstrap_band(wide.to_numpy(float), n_boot=N_BOOT_BAND)
            x = np.arange(len(names)) + (j - (len(inits) - 1) / 2) * width
            ax.bar(x, mean, width, yerr=[mean - low, high - mean], capsize=2, color=color(init), label=init)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("share of gradient norm")
        ax.set_title(env)
    _legend(axes)
    caption = f"Share of the gradient norm per tensor at epoch 1, K={k} (Takagi Fig. 7): the 8 largest tensors and the rest."
    return fig, caption


def attention_gap(sweep: Sweep) -> tuple[Figure, str]:
    att, k = M.runs_at(sweep.diag("attention"), NO_CONTEXT_K)
    gaps, epoch = M.attention_gaps(att)
    envs = _envs(gaps)
    fig, axes = _grid(1, len(envs))
    for ax, env in zip(axes[0], envs):
        for init, g in gaps[gaps["env"] == env].groupby("init"):
            x, c = _seed_curves(g, "block", "gap")
            _band(ax, x, c, init, color(init), marker="o")
        ax.set_title(env)
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
        for init, g in sel.groupby("init"):
            x = g["train.grad_clip"].fillna(off_x).to_numpy(float)
            ax.scatter(x, g["objective"], color=color(init), s=18, alpha=0.75, label=f"{init} (n={len(g)})")
            best = g["objective"].idxmax() if g["direction"].iloc[0] == "maximize" else g["objective"].idxmin()
            ax.scatter([x[g.index.get_loc(best)]], [g.loc[best, "objective"]], color=color(init), marker="*", s=160, edgecolor="k")
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

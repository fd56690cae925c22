"""`python -m dtsweep report SWEEP_DIR`: tables, figures and the seven findings, with seed CIs.

    write_report(sweep_dir) -> <sweep_dir>/report/index.md

writes, under <sweep_dir>/report/:
    index.md, index.html        the report (same content)
    figures/<name>.png          one figure per analysis, bands across seeds
    tables/<name>.csv, .md      final_scores, best_epoch_scores, swap_scores,
                                takagi_table1, takagi_table2, findings

It renders whatever the sweep has: a missing input (no block swaps, a diagnostics kind not
computed yet, unfinished trials) becomes a line in the report saying what to run.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pandas as pd

from dtsweep.report import figures as F
from dtsweep.report import tables as T
from dtsweep.report.document import Document
from dtsweep.report.findings import NO_DATA, Finding, evaluate_findings, findings_frame
from dtsweep.report.inputs import MissingData, Sweep
from dtsweep.stats import MIN_SEEDS

__all__ = ["write_report", "MissingData", "Sweep"]

METHOD = (
    "**Statistics.** Each trial contributes one number per analysis (its final-epoch score, its mean "
    "CKA, ...); seeds are the unit of replication. Means come with 95% percentile-bootstrap CIs with "
    "seeds resampled within each stratum (init × env × K cell), as rliable's stratified bootstrap; "
    "IQM is the mean of the middle 50% of seeds. An effect is the difference of group means averaged "
    "over the envs both groups ran, oriented so that the paper's claim says it is positive; P(A>B) is "
    "the probability that a seed of A beats a seed of B (Mann-Whitney, ties count half), averaged over "
    f"envs. **Verdict rule:** with fewer than {MIN_SEEDS} seeds in a group, inconclusive; otherwise "
    "supported if the effect's 95% CI lies above 0, contradicted if it lies below 0, inconclusive if "
    "it contains 0. A finding is supported when all its primary comparisons are, contradicted when "
    "any is."
)


def write_report(sweep_dir: str | Path, n_boot: int = 2000, seed: int = 0) -> Path:
    """Write the report of the sweep in `sweep_dir`; returns the path of report/index.md.

    n_boot: bootstrap resamples per CI; seed: the bootstrap's random seed (the report is
    deterministic for a given sweep and seed).
    """
    sweep = Sweep.load(sweep_dir)
    out = sweep.root / "report"
    (out / "figures").mkdir(parents=True, exist_ok=True)
    (out / "tables").mkdir(parents=True, exist_ok=True)
    # A figure or table that cannot be made this time must not survive from an older run.
    for stale in [*(out / "figures").glob("*.png"), *(out / "tables").glob("*.csv"), *(out / "tables").glob("*.md")]:
        stale.unlink()
    doc = Document(f"dtsweep report: {sweep.root.name}")
    missing = list(sweep.notes)

    def save_table(name: str, df: pd.DataFrame) -> None:
        df.to_csv(out / "tables" / f"{name}.csv", index=False)
        t = Document(name)
        t.table(df)
        (out / "tables" / f"{name}.md").write_text(t.to_markdown())

    def save_figure(name: str, fig_and_caption) -> tuple[str, str]:
        fig, caption = fig_and_caption
        fig.savefig(out / "figures" / f"{name}.png", dpi=110)
        return f"figures/{name}.png", caption

    doc.paragraph(
        f"Sweep directory `{sweep.root}`, report written {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC by "
        f"`python -m dtsweep report`. Tables are under `tables/` (CSV and Markdown), figures under `figures/`."
    )
    doc.paragraph(METHOD)

    # ---- figures first, so each section can place its own and misses are collected once
    figs: dict[str, tuple[str, str]] = {}
    for name, draw in F.FIGURES.items():
        try:
            figs[name] = save_figure(name, draw(sweep))
        except MissingData as e:
            missing.append(f"figure `{name}`: {e}")
    if sweep.search is not None:  # the sweep has search studies (dtsweep.search)
        try:
            figs["search_objective"] = save_figure("search_objective", F.search_objective(sweep.search))
        except MissingData as e:
            missing.append(f"figure `search_objective`: {e}")

    # ---- scores
    doc.heading(2, "Scores")
    scores = None
    try:
        scores = T.per_trial_scores(sweep.require_metrics())
    except MissingData as e:
        doc.paragraph(f"No scores: {e}.")
    if scores is not None:
        _trial_counts(doc, scores)
        final = T.final_scores(scores, n_boot, seed)
        best = T.best_epoch_scores(scores, n_boot, seed)
        save_table("final_scores", final)
        save_table("best_epoch_scores", best)
        doc.heading(3, "Final epoch")
        doc.paragraph(
            "D4RL normalised score at each trial's last evaluated epoch (`tables/final_scores.csv`): "
            "mean over seeds, 95% stratified-bootstrap CI, IQM. Trials with a block swap are in their own table."
        )
        doc.table(final)
        try:
            figs["final_scores"] = save_figure("final_scores", F.final_scores_bars(final))
            doc.image(*figs["final_scores"])
        except MissingData as e:
            missing.append(f"figure `final_scores`: {e}")
        doc.heading(3, "Best epoch (optimistic, for comparison with Takagi's Table 1)")
        doc.paragraph(
            "Each trial's highest score over its evaluated epochs (`tables/best_epoch_scores.csv`). The "
            "maximum of a noisy curve is biased upwards; the final epoch is the honest number."
        )
        doc.table(best)
        try:
            swaps = T.swap_scores(scores, n_boot, seed)
            save_table("swap_scores", swaps)
            doc.heading(3, "Block-swap trials, final epoch")
            doc.table(swaps)
        except MissingData as e:
            missing.append(f"table `swap_scores`: {e}")
        for name, build, title in (
            ("takagi_table1", T.paper_table1, "Takagi Table 1 (K=20, medium datasets) beside this sweep"),
            ("takagi_table2", T.paper_table2, "Takagi Table 2 (K=1, medium datasets) beside this sweep"),
        ):
            table = build(scores, n_boot, seed)
            save_table(name, table)
            doc.heading(3, title)
            doc.table(table)
        doc.paragraph(
            "Paper values are transcribed from Takagi (NeurIPS 2022), Tables 1-2; \"±\" as printed (the paper "
            "ran one seed and does not define it). Sweep cells are mean [95% CI] over seeds."
        )
    else:
        missing.append("tables `final_scores`, `best_epoch_scores`, `takagi_table1/2`: no finished trial with metrics")

    # ---- findings
    findings = evaluate_findings(sweep, n_boot, seed)
    save_table("findings", findings_frame(findings))
    doc.heading(2, "The seven findings of Takagi's poster")
    doc.table(pd.DataFrame([{
        "#": f.number, "finding (poster)": f.poster, "verdict": f.verdict,
        "seeds (fewest in a group)": _fewest_seeds(f),
    } for f in findings]))  # fmt: skip
    doc.paragraph("Per-env effects of every comparison are in `tables/findings.csv` (column `scope`).")
    for f in findings:
        _finding_section(doc, f, figs)
        missing += [f"finding {f.number}: {m}" for m in f.missing]

    shown = {name for f in findings for name in f.figures} | {"final_scores"}
    extra = [name for name in figs if name not in shown]
    if extra:
        doc.heading(2, "Other figures")
        for name in extra:
            doc.image(*figs[name])

    doc.heading(2, "What is missing")
    if missing:
        doc.bullets(missing)
    else:
        doc.paragraph("Nothing: every table, figure and finding was computed.")

    (out / "index.md").write_text(doc.to_markdown())
    (out / "index.html").write_text(doc.to_html())
    return out / "index.md"


def _trial_counts(doc: Document, scores: pd.DataFrame) -> None:
    counts = (
        scores.assign(swap=scores["swap_block"].notna())
        .groupby(["init", "env", "context_len", "swap"], as_index=False)
        .agg(trials=("trial_id", "size"), seeds=("seed", "nunique"))
    )
    doc.paragraph(f"{len(scores)} finished trials with an evaluation:")
    doc.table(counts)


def _fewest_seeds(f: Finding) -> int | None:
    seeds = [c.effect.n_seeds for c in f.comparisons if c.effect and c.primary]
    return min(seeds) if seeds else None


def _finding_section(doc: Document, f: Finding, figs: dict[str, tuple[str, str]]) -> None:
    doc.heading(3, f"Finding {f.number}: {f.poster}")
    doc.paragraph(f"**Measured claim.** {f.claim} **Verdict: {f.verdict}.**")
    rows = []
    for c in f.comparisons:
        e = c.effect
        rows.append({
            "comparison (claim: > 0)": c.label, "primary": "yes" if c.primary else "",
            "effect [95% CI]": f"{e.point:.3g} [{e.low:.3g}, {e.high:.3g}]" if e else "—",
            "P(A>B)": f"{e.poi:.2f}" if e else "—",
            "seeds A/B": f"{e.n_a}/{e.n_b}" if e else "—",
            "envs": len(e.tasks) if e else "—",
            "verdict": c.verdict if e else NO_DATA,
        })  # fmt: skip
    if rows:
        doc.table(pd.DataFrame(rows))
    doc.bullets(f.notes + [f"missing — {m}" for m in f.missing])
    for name in f.figures:
        if name in figs:
            doc.image(*figs[name])

"""`dtsweep report SWEEP_DIR`: tables, figures and the seven findings, with seed CIs.

    write_report(sweep_dir) -> location of <sweep_dir>/report/index.md
    write_report(sweep_dir, out="local/dir") -> local/dir/index.md (a local copy)

writes, under <sweep_dir>/report/ (or `out`):
    index.md, index.html        the report (same content)
    figures/<name>.png          one figure per analysis, bands across seeds
    tables/<name>.csv, .md      final_scores, best_epoch_scores, swap_scores,
                                takagi_table1, takagi_table2, findings

Reads and writes only through `dtsweep.store.Store`, so a sweep on `s3://`, `gs://` or
`file://` storage works as a local one. It renders whatever the sweep has: a missing input
(no block swaps, a diagnostics kind not computed yet, unfinished trials) or data a figure
cannot use becomes a line in the report saying what is missing, never a traceback.
"""

from __future__ import annotations

import datetime as dt
import io
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from dtsweep.report import figures as F
from dtsweep.report import tables as T
from dtsweep.report.document import Document
from dtsweep.report.findings import NO_DATA, Finding, evaluate_findings, fewest_seeds, findings_frame
from dtsweep.report.inputs import DATA_ERRORS, MissingData, Sweep
from dtsweep.spec import join_path
from dtsweep.stats import MIN_SEEDS
from dtsweep.store import Store

__all__ = ["write_report", "MissingData", "Sweep"]

METHOD = (
    "**Statistics.** Each trial contributes one number per analysis (its final-epoch score, its mean "
    "CKA, ...); seeds are the unit of replication and the only thing pooled: trials that differ in any other "
    "setting are different conditions (their `config_key`), with their own rows, curves and comparisons. Score "
    "tables give means with 95% percentile-bootstrap CIs (seeds resampled within each condition) and the IQM "
    "(mean of the middle 50% of seeds). **Comparisons** set inits by what they are, not by name: language "
    "(gpt2, chibit, clip), image (igpt, igpt-mini) or none (random, random-ref), read from each trial's "
    "`init_family`; only two conditions that differ in nothing but the init are compared, each such pair on "
    'its own, and the small inits trained offline (chibit, igpt-mini) are decided apart as "mini scale". An '
    "effect is mean(treatment) - mean(control), averaged over the datasets both ran; it is tested with Welch's "
    "t-test stratified by dataset (`stats.compare`), and its CI is that test's 95% interval. **Verdict rule:** "
    f"with fewer than {MIN_SEEDS} seeds in a group, inconclusive; otherwise supported when p < 0.05 with the "
    "effect on the claimed side, contradicted when p < 0.05 on the other side, inconclusive otherwise. A "
    "finding's verdict (per scale) combines its primary comparisons on Holm-adjusted p-values (`stats.combine`): "
    "supported when every one is, contradicted when any one is, so under no effect a finding gets a verdict at "
    "most 5% of the time; other comparisons are context, uncorrected. P(A>B) is the probability that a seed of "
    "the treatment beats a seed of the control, averaged over datasets."
)

# Builders that raise one of these become a "missing" line naming them and the reason.
_EXPECTED = (MissingData, *DATA_ERRORS)


def _reason(e: Exception) -> str:
    return str(e) if isinstance(e, MissingData) else f"could not be computed from this sweep's data ({type(e).__name__}: {e})"


def write_report(sweep_dir: str | Path | Sweep, n_boot: int = 2000, seed: int = 0, out: str | Path | None = None) -> Path | str:
    """Write the report of a sweep; returns the location of index.md: a Path when the report
    is written to a local directory, the URI string otherwise.

    sweep_dir: a local path or a URI that `Store` opens (s3://, gs://, file://), or a loaded
    Sweep. out: where to write instead of <sweep_dir>/report (e.g. a local copy of a remote
    sweep's report). n_boot: bootstrap resamples per descriptive CI; seed: the bootstrap's
    random seed (the report is deterministic for a given sweep and seed).
    """
    sweep = sweep_dir if isinstance(sweep_dir, Sweep) else Sweep.load(str(sweep_dir))
    dest = Store(str(out) if out is not None else join_path(sweep.root, "report"))
    # A figure or table that cannot be made this time must not survive from an older run.
    for stale in [*dest.list("figures", ".png"), *dest.list("tables", ".csv"), *dest.list("tables", ".md")]:
        dest.delete(stale)
    doc = Document(f"dtsweep report: {sweep.name}")
    missing = list(sweep.notes)

    def save_table(name: str, df: pd.DataFrame) -> None:
        dest.write_bytes(f"tables/{name}.csv", df.to_csv(index=False).encode())
        t = Document(name)
        t.table(df)
        dest.write_bytes(f"tables/{name}.md", t.to_markdown().encode())

    def save_figure(name: str, draw: Callable[[], tuple]) -> bool:
        """Draw and store figures/<name>.png; on a data problem, a missing line instead."""
        try:
            fig, caption = draw()
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=110)
        except _EXPECTED as e:
            missing.append(f"figure `{name}`: {_reason(e)}")
            return False
        dest.write_bytes(f"figures/{name}.png", buf.getvalue())
        figs[name] = (f"figures/{name}.png", caption)
        return True

    def build_table(name: str, build: Callable[[], pd.DataFrame]) -> pd.DataFrame | None:
        try:
            table = build()
        except _EXPECTED as e:
            missing.append(f"table `{name}`: {_reason(e)}")
            return None
        save_table(name, table)
        return table

    doc.paragraph(
        f"Sweep directory `{sweep.root}`, report written {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC by "
        f"`dtsweep report`. Tables are under `tables/` (CSV and Markdown), figures under `figures/`."
    )
    doc.paragraph(METHOD)
    if sweep.warnings:
        doc.heading(2, "Warnings")
        doc.bullets(sweep.warnings)

    # ---- figures first, so each section can place its own and misses are collected once
    figs: dict[str, tuple[str, str]] = {}
    for name, draw in F.FIGURES.items():
        save_figure(name, lambda draw=draw: draw(sweep))
    if sweep.search is not None:  # the sweep has search studies (dtsweep.search)
        save_figure("search_objective", lambda: F.search_objective(sweep.search))

    # ---- scores
    doc.heading(2, "Scores")
    scores = None
    try:
        scores = T.per_trial_scores(sweep.require_metrics())
    except _EXPECTED as e:
        doc.paragraph(f"No scores: {_reason(e)}.")
    if scores is not None:
        _trial_counts(doc, scores)
        final = build_table("final_scores", lambda: T.final_scores(scores, n_boot, seed))
        best = build_table("best_epoch_scores", lambda: T.best_epoch_scores(scores, n_boot, seed))
        doc.heading(3, "Final epoch")
        doc.paragraph(
            "D4RL normalised score at each trial's last evaluated epoch (`tables/final_scores.csv`), one row per "
            "condition (`config_key`; the `study` column names it): mean over seeds, 95% bootstrap CI, IQM. Trials "
            "with a block swap are in their own table."
        )
        if final is not None:
            doc.table(final)
            if save_figure("final_scores", lambda: F.final_scores_bars(final)):
                doc.image(*figs["final_scores"])
        doc.heading(3, "Best epoch (optimistic, for comparison with Takagi's Table 1)")
        doc.paragraph(
            "Each trial's highest score over its evaluated epochs (`tables/best_epoch_scores.csv`). The "
            "maximum of a noisy curve is biased upwards; the final epoch is the honest number."
        )
        if best is not None:
            doc.table(best)
        swaps = build_table("swap_scores", lambda: T.swap_scores(scores, n_boot, seed))
        if swaps is not None:
            doc.heading(3, "Block-swap trials, final epoch")
            doc.table(swaps)
        random_rows = ("random rows: this sweep's random-ref" if T.random_family(scores) == T.PAPER_RANDOM
                       else "random rows: this sweep's `random`, not the papers' 1-head ReLU model")  # fmt: skip
        for name, build, title in (
            ("takagi_table1", T.paper_table1, "Takagi Table 1 (K=20, medium datasets) beside this sweep"),
            ("takagi_table2", T.paper_table2, "Takagi Table 2 (K=1, medium datasets) beside this sweep"),
        ):
            table = build_table(name, lambda build=build: build(scores, n_boot, seed))
            if table is not None:
                doc.heading(3, f"{title} ({random_rows})")
                doc.table(table)
        doc.paragraph(
            'Paper values are transcribed from Takagi (NeurIPS 2022), Tables 1-2; "±" as printed (the paper '
            "ran one seed and does not define it). Sweep cells are mean [95% CI] over seeds, one row per sweep "
            "condition of the paper row's init family (a local model directory counts by its family). " + T.random_note(scores)
        )
    else:
        missing.append("tables `final_scores`, `best_epoch_scores`, `takagi_table1/2`: no finished trial with metrics")

    # ---- findings
    findings = evaluate_findings(sweep)
    save_table("findings", findings_frame(findings))
    doc.heading(2, "The seven findings of Takagi's poster")
    summary = []
    for f in findings:
        for scale in f.verdicts or {NO_DATA: NO_DATA}:
            summary.append({
                "#": f.number, "finding (poster)": f.poster, "scale": scale if f.verdicts else "—",
                "verdict": f.verdicts.get(scale, NO_DATA), "seeds (fewest in a group)": _or_dash(fewest_seeds(f, scale)),
            })  # fmt: skip
    doc.table(pd.DataFrame(summary))
    doc.paragraph("Per-dataset effects of every comparison are in `tables/findings.csv` (column `scope`).")
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

    dest.write_bytes("index.md", doc.to_markdown().encode())
    dest.write_bytes("index.html", doc.to_html().encode())
    return Path(dest.uri("index.md")) if dest.is_local else dest.uri("index.md")


def _trial_counts(doc: Document, scores: pd.DataFrame) -> None:
    counts = (
        scores.assign(swap=scores["swap_block"].notna())
        .groupby(["study", "init", "init_family", "env", "context_len", "swap"], as_index=False)
        .agg(trials=("trial_id", "size"), seeds=("seed", "nunique"))
    )
    doc.paragraph(f"{len(scores)} finished trials with an evaluation:")
    doc.table(counts)


def _or_dash(n: int | None) -> str:
    return "—" if n is None else str(n)


def _finding_section(doc: Document, f: Finding, figs: dict[str, tuple[str, str]]) -> None:
    doc.heading(3, f"Finding {f.number}: {f.poster}")
    verdicts = " ".join(f"**Verdict ({scale}): {v}.**" for scale, v in f.verdicts.items()) or f"**Verdict: {NO_DATA}.**"
    doc.paragraph(f"**Measured claim.** {f.claim} {verdicts}")
    rows = []
    for c in f.comparisons:
        d = c.decision
        rows.append({
            "comparison (treatment vs control)": c.label, "conditions": c.conditions,
            "claim": "> 0" if c.claimed == "greater" else "< 0", "primary": "yes" if c.primary else "",
            "seeds T/C": f"{d.n_treatment}/{d.n_control}" if d else "—",
            "effect [95% CI]": f"{d.effect:.3g} [{d.ci_low:.3g}, {d.ci_high:.3g}]" if d else "—",
            "test": d.test if d else "—",
            "p (Holm)": (f"{d.p_value:.2g}" + (f" ({c.p_holm:.2g})" if c.p_holm is not None else "")) if d else "—",
            "P(T>C)": f"{c.poi:.2f}" if c.poi is not None else "—",
            "verdict": c.verdict,
        })  # fmt: skip
    if rows:
        doc.table(pd.DataFrame(rows))
    doc.bullets(f.notes + [f"missing — {m}" for m in f.missing])
    for name in f.figures:
        if name in figs:
            doc.image(*figs[name])

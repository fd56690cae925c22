"""The report on synthetic sweep directories whose effects are known by construction.

`make_sweep` writes the Parquet outputs of DESIGN §3 with pandas: 3 inits x 2 envs x
K in {1, 20} x 5 seeds, block swaps, and every diagnostics kind. In the "better" sweep
gpt2 differs from random in each direction the paper claims; in "same" gpt2's numbers are
random's, seed for seed; in "worse" gpt2 differs in the opposite direction.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dtsweep.cli import main
from dtsweep.report import Sweep, write_report
from dtsweep.report import tables as T
from dtsweep.report.document import Document
from dtsweep.report.findings import MINI, PAPER, evaluate_findings, findings_frame
from dtsweep.report.inputs import MODALITY
from dtsweep.report.measures import layer_order, to_reference_layers
from dtsweep.spec import config_key, parse_spec

ENVS = ("hopper", "walker2d")
SEEDS = range(5)
EPOCHS = 6
SWAP_EPOCHS = 4
SWAP_BLOCKS = (0, 1, 2)
BLOCK_LAYERS = ["ln_1", "attn.c_attn", "attn.c_proj", "attn.resid_dropout", "ln_2", "mlp.c_fc", "mlp.act",
                "mlp.c_proj", "mlp.dropout"]  # fmt: skip
TENSORS = ["ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"]
N_BLOCKS = {"gpt2": 12, "random": 12, "igpt": 24}  # others: 3 (the mini models' depth)
PAPER_INITS = ("random", "gpt2", "igpt")
REPO = Path(__file__).resolve().parents[1]


def sweep_spec(inits=PAPER_INITS, swaps: bool = True, studies: list | None = None) -> dict:
    """The sweep YAML (as a dict) the synthetic sweeps pretend to have run: real trials,
    real config_json, real config_keys."""
    if studies is None:
        studies = [{"name": f"k{k}", "init": list(inits), "context_len": k} for k in (1, 20)]
        if swaps:
            studies.append({"name": "swap", "init": "random", "context_len": 1, "swap_block": list(SWAP_BLOCKS),
                            "swap_from": "gpt2", "train": {"epochs": SWAP_EPOCHS}})  # fmt: skip
    return {"name": "synthetic", "storage": "unused", "studies": studies,
            "defaults": {"seed": {"start": 0, "count": len(SEEDS)}, "env": list(ENVS), "quality": "medium",
                         "train": {"epochs": EPOCHS}}}  # fmt: skip


def make_sweep(root: Path, gpt2: str = "better", diagnostics: bool = True, swaps: bool = True, inits=PAPER_INITS,
               spec: dict | None = None, config: bool = True, family=None) -> Path:  # fmt: skip
    """Write a synthetic sweep directory; returns root.

    Values depend on what an init is: language (gpt2, chibit, ...) differs from random in each
    direction the paper claims ("better"), not at all ("same": random's numbers seed for
    seed) or in the opposite direction ("worse"); image inits behave like iGPT.
    config=False writes a ledger without configurations (an old sweep); family(trial) gives
    a trial's init_family column (default: none written).
    """
    rng_for = lambda *key: np.random.default_rng(abs(hash(key)) % 2**32)  # noqa: E731

    def level(fam, random_val, gpt2_val, igpt_val):
        # gpt2 relative to random: as claimed, identical, or mirrored around random's value.
        g = {"better": gpt2_val, "same": random_val, "worse": 2 * random_val - gpt2_val}[gpt2]
        return {"none": random_val, "language": g, "image": igpt_val}[MODALITY[fam]]

    trials, metrics = [], []
    for t in parse_spec(spec or sweep_spec(inits, swaps)).trials():
        fam = family(t) if family else t.init
        epochs, k, swap = t.train.epochs, t.context_len, t.swap_block
        row = dict(t.columns(), epochs=epochs, status="finished", error=None,
                   config_json=json.dumps(t.to_dict()) if config else "{}")  # fmt: skip
        if family:
            row["init_family"] = fam
        trials.append(row)
        if swap is not None:
            top, err = 50.0, 0.3
        elif k == 20:
            top, err = level(fam, 65.0, 80.0, 3.0), level(fam, 0.5, 0.3, 1.0)
        else:
            top, err = level(fam, 20.0, 80.0, 2.0), level(fam, 0.8, 0.3, 1.0)
        noise = rng_for("metrics", t.env, k, swap, t.seed)  # same noise for every init: "same" is exact
        for epoch in range(epochs + 1):
            ramp = 1 - np.exp(-epoch / 2)
            metrics.append(dict(t.columns(), epoch=epoch, step=epoch * 100, train_loss=err,
                                action_error=err * (2 - ramp) + 0.01 * noise.normal(),
                                eval_return_mean=0.0, eval_return_std=0.0, wall_time_s=1.0 * epoch,
                                normalized_score=np.nan if epoch == 0 else top * ramp + 2 * noise.normal()))  # fmt: skip
    # A trial still running: its metrics rows exist but the report must leave it out.
    trials.append(dict(trials[0], trial_id="running0", seed=99, status="running"))
    metrics += [dict(m, trial_id="running0", seed=99, normalized_score=500.0) for m in metrics[: EPOCHS + 1]]
    root.mkdir(parents=True, exist_ok=True)
    trials_df = pd.DataFrame(trials).astype({"swap_block": "Int64"})
    trials_df.to_parquet(root / "trials.parquet")
    pd.DataFrame(metrics).astype({"swap_block": "Int64"}).to_parquet(root / "metrics.parquet")
    if diagnostics:
        fams = {r["trial_id"]: r.get("init_family", r["init"]) for r in trials}
        _write_diagnostics(root, trials_df[trials_df["status"] == "finished"], fams, level, rng_for)
    return root


def _write_diagnostics(root, trials, fams, level, rng_for):
    rows = {kind: [] for kind in ("cka", "mine", "params", "gradients", "attention")}
    for t in trials.itertuples():
        if not pd.isna(t.swap_block):
            continue
        fam = fams[t.trial_id]
        tcols = dict(trial_id=t.trial_id, init=t.init, env=t.env, dataset=t.dataset, context_len=t.context_len,
                     swap_block=None, seed=t.seed, study=t.study)  # fmt: skip
        noise = rng_for("diag", t.env, t.context_len, t.seed)
        blocks = N_BLOCKS.get(fam, 3)
        if t.context_len == 20:
            for b in range(blocks):
                for layer in BLOCK_LAYERS:
                    for token in ("return", "state", "action"):
                        v = level(fam, 0.6, 0.2, 0.15) + 0.03 * noise.normal()
                        rows["cka"].append(dict(tcols, layer=f"h.{b}.{layer}", block=b, token=token, cka=v,
                                                cka_debiased=v - 0.1, n=256))  # fmt: skip
                for name in TENSORS:
                    rows["params"].append(dict(tcols, tensor=f"h.{b}.{name}", block=b,
                                               l2=level(fam, 5.0, 2.0, 1.5) + 0.1 * noise.normal(),
                                               cosine=level(fam, 0.5, 0.95, 0.97) + 0.01 * noise.normal()))  # fmt: skip
            for b in (0, blocks // 2, blocks - 1):
                for pos in range(3 * 20):
                    for which in ("X", "Y"):
                        mi = level(fam, 1.0, 0.5, 0.1) + 0.05 * noise.normal()
                        token = ("return", "state", "action")[pos % 3]
                        rows["mine"].append(dict(tcols, block=b, position=pos, token=token, which=which, mi_nats=mi))
            scale = level(fam, 0.1, 0.15, 2.0)
            for i in range(32):
                g = scale * np.exp(0.3 * noise.normal())
                rows["gradients"].append(dict(tcols, sample=i, grad_norm=g, grad_norm_clipped=min(g, 0.25)))
            rows["gradients"].append(dict(tcols, confusion=level(fam, -0.05, -0.3, -0.3) + 0.01 * noise.normal()))
            shares = np.full(len(TENSORS) * blocks, 1.0)
            shares[:2] = 200.0 if MODALITY[fam] == "image" else 1.0  # block 0's ln_1 weight and bias
            for j, s in enumerate(shares / shares.sum()):
                rows["gradients"].append(dict(tcols, tensor=f"h.{j // len(TENSORS)}.{TENSORS[j % len(TENSORS)]}", share=s))
        else:
            drift = level(fam, 0.2, 0.01, 0.15)
            for epoch in range(5):
                for b in range(blocks):
                    for head in range(4):
                        d = 1.0 + 0.05 * b + drift * epoch * (1 + 0.1 * noise.normal())
                        rows["attention"].append(dict(tcols, epoch=epoch, block=b, head=head, distance_tokens=d))
    (root / "diagnostics").mkdir(exist_ok=True)
    for kind, r in rows.items():
        pd.DataFrame(r).to_parquet(root / "diagnostics" / f"{kind}.parquet")


def test_igpt_layers_are_averaged_in_pairs_onto_the_gpt2_axis():
    igpt = np.arange(216, dtype=float)[None, :].repeat(2, axis=0)  # 2 seeds x 216 layers
    x, v = to_reference_layers(igpt, 108)
    np.testing.assert_array_equal(x, np.arange(108))
    np.testing.assert_array_equal(v[0], np.arange(0, 216, 2) + 0.5)  # (0+1)/2, (2+3)/2, ...
    x3, v3 = to_reference_layers(np.zeros((1, 27)), 108)  # a 3-block model: spread out
    assert v3.shape == (1, 27) and x3[-1] == pytest.approx(104.0)
    names = pd.Series(["h.10.ln_1", "h.2.mlp.c_fc", "h.2.ln_1", "h.2.attn.c_attn"])
    assert layer_order(names) == ["h.2.ln_1", "h.2.attn.c_attn", "h.2.mlp.c_fc", "h.10.ln_1"]


def test_document_renders_the_same_content_to_markdown_and_html():
    doc = Document("t")
    doc.paragraph("run `a<b` **now** [docs](x.html)")
    doc.table(pd.DataFrame({"a|b": [1.234, np.nan]}))
    md, html = doc.to_markdown(), doc.to_html()
    assert "run `a<b` **now** [docs](x.html)" in md and "| a\\|b |" in md and "| 1.23 |" in md and "| — |" in md
    assert '<code>a&lt;b</code> <strong>now</strong> <a href="x.html">docs</a>' in html
    assert "<th>a|b</th>" in html and "<td>1.23</td>" in html and "<td>—</td>" in html


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    root = make_sweep(tmp_path_factory.mktemp("sweep") / "synthetic")
    return root, Path(write_report(root, n_boot=300))


def test_report_writes_index_figures_and_tables(full_report):
    root, index = full_report
    assert index == root / "report" / "index.md"
    md, html = index.read_text(), (root / "report" / "index.html").read_text()
    pngs = sorted((root / "report" / "figures").glob("*.png"))
    assert len(pngs) >= 8, pngs
    assert all(p.stat().st_size > 10_000 for p in pngs)
    for p in pngs:  # every figure is linked from both renderings
        assert f"figures/{p.name}" in md and f'src="figures/{p.name}"' in html
    for n in range(1, 8):
        assert f"Finding {n}:" in md and f"Finding {n}:" in html
    for name in ("final_scores", "best_epoch_scores", "swap_scores", "takagi_table1", "takagi_table2", "findings"):
        assert (root / "report" / "tables" / f"{name}.csv").exists()
        assert (root / "report" / "tables" / f"{name}.md").read_text().startswith(f"# {name}")
    # The only things left out are the running trial and the ledger's missing init_family column.
    assert md.split("## What is missing")[1].strip().splitlines() == [
        "- 91 trials have no `init_family` in the ledger: their family is taken from the init name.",
        "- 1 of 91 trials are not finished (1 running) and are left out.",
    ]


def test_final_scores_equal_pandas_groupby_of_final_epochs(full_report):
    root, _ = full_report
    table = pd.read_csv(root / "report" / "tables" / "final_scores.csv")
    assert list(table.columns) == ["init", "env", "context_len", "study", "config_key", "dataset",
                                   "n_seeds", "mean", "ci_low", "ci_high", "iqm"]  # fmt: skip
    m = pd.read_parquet(root / "metrics.parquet")
    finished = pd.read_parquet(root / "trials.parquet").query("status == 'finished'")["trial_id"]
    m = m[m["trial_id"].isin(finished) & m["swap_block"].isna() & m["normalized_score"].notna()]
    final = m[m["epoch"] == m.groupby("trial_id")["epoch"].transform("max")]
    keys = ["study", "init", "env", "context_len"]
    expected = final.groupby(keys)["normalized_score"].agg(["mean", "count"]).reset_index()
    got = table.merge(expected, on=keys, suffixes=("", "_pandas"))
    assert len(got) == len(expected) == len(table) == 3 * 2 * 2
    np.testing.assert_allclose(got["mean"], got["mean_pandas"], rtol=1e-12)
    assert (got["n_seeds"] == got["count"]).all() and (got["n_seeds"] == 5).all()  # running trial left out
    assert (table["ci_low"] <= table["mean"]).all() and (table["mean"] <= table["ci_high"]).all()
    trials = pd.read_parquet(root / "trials.parquet")
    keys = {config_key(json.loads(c)) for c in trials["config_json"]}
    assert set(table["config_key"]) <= keys


def test_paper_tables_sit_beside_the_sweep(full_report):
    root, _ = full_report
    t1 = pd.read_csv(root / "report" / "tables" / "takagi_table1.csv")
    hopper_gpt2 = t1[(t1["init"] == "gpt2") & (t1["env"] == "hopper")].iloc[0]
    assert hopper_gpt2["Takagi (1 seed)"] == "79.5 ± 1.3" and hopper_gpt2["Reid et al. [9]"] == "79.1 ± 1.1"
    assert hopper_gpt2["n_seeds"] == 5 and hopper_gpt2["sweep dataset"] == "hopper-medium"
    assert hopper_gpt2["sweep condition"] == "gpt2 K=20 [k20]"
    assert t1[t1["env"] == "halfcheetah"]["sweep final epoch"].eq("not run").all()
    # Only `random` ran: the random rows say so (the papers' random is the reference's random-ref).
    assert (t1.loc[t1["init"] == "random", "sweep family"] == "random").all()
    md = (root / "report" / "index.md").read_text()
    assert "Only `random` (GPT-2's architecture: 12 heads, GELU) ran in this sweep, not `random-ref`" in md
    t2 = pd.read_csv(root / "report" / "tables" / "takagi_table2.csv")
    assert t2[(t2["init"] == "random") & (t2["env"] == "hopper")]["Takagi (1 seed)"].item() == -0.24


def test_findings_supported_when_the_effects_are_built_in(full_report):
    root, _ = full_report
    table = pd.read_csv(root / "report" / "tables" / "findings.csv")
    primary = table[table["primary"] & (table["scope"] == "all")]
    assert set(primary["finding"]) == set(range(1, 8))
    assert (primary["scale"] == PAPER).all()
    assert (primary["verdict"] == "supported").all(), primary[["comparison", "effect", "p_holm", "verdict"]]
    assert (primary["p_holm"] >= primary["p_value"]).all()  # Holm only ever raises a p-value
    assert (primary["n_treatment"] >= 5).all() and primary["test"].str.startswith("Welch t").all()
    # Finding 1 is decided on debiased CKA; plug-in CKA is context beside it.
    f1 = table[table["finding"] == 1]
    assert f1.loc[f1["primary"], "comparison"].str.startswith("debiased CKA").all()
    assert f1.loc[~f1["primary"], "comparison"].str.startswith("plug-in CKA").any()
    # Each swapped block is its own comparison against its matched unswapped random condition.
    f6 = primary[primary["finding"] == 6]
    assert len(f6) == 2 * len(SWAP_BLOCKS) and (f6["conditions"].str.endswith("vs random K=1 [k1]")).all()
    md = (root / "report" / "index.md").read_text()
    assert md.count("**Verdict (paper scale): supported.**") == 7


@pytest.mark.parametrize("gpt2, expected", [("same", "inconclusive"), ("worse", "contradicted")])
def test_findings_on_gpt2_equal_to_or_worse_than_random(tmp_path, gpt2, expected):
    findings = evaluate_findings(Sweep.load(make_sweep(tmp_path / gpt2, gpt2=gpt2)))
    # Findings 1, 2, 3, 5 and 7 compare gpt2 with random (4 is about iGPT, 6 about swaps).
    assert {f.number: f.verdicts for f in findings if f.number in (1, 2, 3, 5, 7)} == {
        n: {PAPER: expected} for n in (1, 2, 3, 5, 7)
    }
    if gpt2 == "same":
        rows = findings_frame(findings)
        gpt2_rows = rows[rows["finding"].isin([1, 2, 3, 5, 7]) & rows["primary"]]
        np.testing.assert_allclose(gpt2_rows["effect"], 0.0, atol=1e-9)  # identical seeds: no effect at all


def test_too_few_seeds_is_inconclusive(tmp_path):
    root = make_sweep(tmp_path / "four_seeds", diagnostics=False, swaps=False)
    m = pd.read_parquet(root / "metrics.parquet")
    m[m["seed"] < 4].to_parquet(root / "metrics.parquet")
    f5 = [f for f in evaluate_findings(Sweep.load(root)) if f.number == 5][0]
    assert f5.verdicts == {PAPER: "inconclusive"}  # the effects are huge, but 4 seeds are too few
    assert all(c.decision.n_treatment == 4 for c in f5.comparisons if c.decision)


def test_metrics_only_sweep_renders_and_lists_what_is_missing(tmp_path):
    root = make_sweep(tmp_path / "bare", diagnostics=False, swaps=False)
    md = Path(write_report(root, n_boot=100)).read_text()
    assert (root / "report" / "tables" / "final_scores.csv").exists()
    assert len(list((root / "report" / "figures").glob("*.png"))) == 3  # returns, action error, scores
    for kind in ("cka", "mine", "params", "gradients", "attention"):
        assert f"needs diagnostics kind '{kind}': run `dtsweep diagnose {root}" in md
    assert "needs block-swap trials" in md
    assert md.count("**Verdict: not measured.**") == 6  # all but finding 5 (no diagnostics, no swaps)
    assert "Finding 5" in md and md.count("**Verdict (paper scale): supported.**") == 1
    assert "1 of" in md and "not finished (1 running)" in md


def test_rerun_removes_figures_that_can_no_longer_be_drawn(tmp_path):
    root = make_sweep(tmp_path / "rerun", diagnostics=False, swaps=False)
    stale = root / "report" / "figures" / "cka_layers.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    write_report(root, n_boot=50)
    assert not stale.exists() and (root / "report" / "figures" / "return_curves.png").exists()


def test_empty_sweep_dir_still_renders(tmp_path):
    md = Path(write_report(tmp_path, n_boot=50)).read_text()
    assert "no finished trial with metrics" in md and md.count("**Verdict: not measured.**") == 7


@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "analysis").glob("*.py")))
def test_analysis_scripts_run(full_report, script, tmp_path):
    root, _ = full_report
    res = subprocess.run([sys.executable, str(REPO / "analysis" / script), str(root)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip()


def test_two_studies_differing_only_in_lr_are_two_conditions(tmp_path):
    studies = [{"name": f"lr-{lr:g}", "init": ["random", "gpt2"], "context_len": 1, "train": {"lr": lr}}
               for lr in (1e-4, 3e-4)]  # fmt: skip
    root = make_sweep(tmp_path / "lr", diagnostics=False, spec=sweep_spec(studies=studies))
    trials = pd.read_parquet(root / "trials.parquet")
    trials["dataset_sha256"] = "a" * 64
    trials.loc[0, "dataset_sha256"] = "b" * 64  # one seed of one condition read other bytes
    trials.to_parquet(root / "trials.parquet")
    md = Path(write_report(root, n_boot=50)).read_text()
    table = pd.read_csv(root / "report" / "tables" / "final_scores.csv")
    assert len(table) == 2 * 2 * len(ENVS) and (table["n_seeds"] == len(SEEDS)).all()  # not 10 seeds in one row
    assert set(table["study"]) == {"lr-0.0001", "lr-0.0003"}
    assert (table.groupby(["init", "env"])["config_key"].nunique() == 2).all()
    # gpt2 is compared with the random of its own lr only: two comparisons, not one pooled one.
    rows = pd.read_csv(root / "report" / "tables" / "findings.csv")
    f5 = rows[(rows["finding"] == 5) & rows["primary"] & (rows["scope"] == "all")]
    assert sorted(f5["conditions"]) == [f"gpt2 K=1 [{s}] vs random K=1 [{s}]" for s in ("lr-0.0001", "lr-0.0003")]
    assert "## Warnings" in md and "read 2 different dataset files (dataset_sha256 differs)" in md


def test_a_local_gpt2_directory_counts_as_gpt2(tmp_path):
    local = tmp_path / "models" / "gpt2"
    local.mkdir(parents=True)
    studies = [{"name": f"k{k}", "init": ["random", str(local)], "context_len": k} for k in (1, 20)]
    root = make_sweep(tmp_path / "local", swaps=False, spec=sweep_spec(studies=studies),
                      family=lambda t: "gpt2" if t.init == str(local) else t.init)  # fmt: skip
    sweep = Sweep.load(root)
    findings = evaluate_findings(sweep)
    assert {f.number: f.verdicts for f in findings if f.number != 4 and f.number != 6} == {
        n: {PAPER: "supported"} for n in (1, 2, 3, 5, 7)
    }
    f1 = next(f for f in findings if f.number == 1)
    assert any(c.label == "debiased CKA: language (gpt2) vs none (random), paper scale" for c in f1.comparisons)
    t1 = T.paper_table1(T.per_trial_scores(sweep.metrics), n_boot=50)
    row = t1[(t1["init"] == "gpt2") & (t1["env"] == "hopper")].iloc[0]
    assert row["n_seeds"] == len(SEEDS) and row["sweep condition"] == f"{local} K=20 [k20]"


def test_paper_and_mini_models_get_separate_verdicts(tmp_path):
    root = make_sweep(tmp_path / "mini", swaps=False, inits=("random", "chibit", "igpt-mini", "gpt2", "igpt"))
    findings = evaluate_findings(Sweep.load(root))
    for f in findings:
        if f.number != 6:  # no block swaps in this sweep
            assert f.verdicts == {PAPER: "supported", MINI: "supported"}, (f.number, f.verdicts, f.missing)
    f4 = next(f for f in findings if f.number == 4)
    labels = {c.label: c.verdict for c in f4.comparisons if c.primary}
    assert labels["clipped fraction: image (igpt-mini) vs language (chibit), mini scale"] == "supported"
    assert labels["clipped fraction: image (igpt) vs language (gpt2), paper scale"] == "supported"
    # Paper-scale and mini-scale pretrained models are never set against each other.
    assert not [c for c in f4.comparisons if "igpt) vs language (chibit" in c.label or "igpt-mini) vs language (gpt2" in c.label]
    md = Path(write_report(root, n_boot=50)).read_text()
    assert "**Verdict (mini scale): supported.**" in md


def test_report_after_fast_and_partial_diagnostics(tmp_path):
    root = make_sweep(tmp_path / "partial", swaps=False)
    diag = root / "diagnostics"
    for kind in ("mine", "attention"):  # kinds not computed yet
        (diag / f"{kind}.parquet").unlink()
    params = pd.read_parquet(diag / "params.parquet")
    # As `diagnose --fast` writes it: tensors missing for some trials, a tensor without a cosine.
    some = params["trial_id"].unique()[:3]
    params = params[~(params["trial_id"].isin(some) & params["tensor"].str.endswith("mlp.c_fc.weight"))]
    params.loc[params["tensor"].str.endswith("ln_1.bias"), "cosine"] = np.nan
    params.to_parquet(diag / "params.parquet")
    cka = pd.read_parquet(diag / "cka.parquet")
    cka[cka["seed"] < 3].to_parquet(diag / "cka.parquet")  # CKA of some trials only
    md = Path(write_report(root, n_boot=50)).read_text()
    figures = {p.name for p in (root / "report" / "figures").glob("*.png")}
    assert {"params_l2.png", "params_cosine.png", "cka_layers.png"} <= figures
    for kind in ("mine", "attention"):
        assert f"needs diagnostics kind '{kind}'" in md
    assert "Traceback" not in md
    f = {f.number: f for f in evaluate_findings(Sweep.load(root))}
    assert f[1].verdicts == {PAPER: "inconclusive"}  # 3 seeds with CKA: too few for a verdict
    assert f[3].verdicts == {PAPER: "supported"}


def test_unreadable_data_becomes_a_missing_line(tmp_path):
    root = make_sweep(tmp_path / "bad", swaps=False, diagnostics=False)
    (root / "diagnostics").mkdir()
    # A gradients file of finished trials whose norms were written as strings: no figure or
    # finding can use it, and the report says so instead of failing.
    ids = pd.read_parquet(root / "trials.parquet").query("context_len == 20")["trial_id"]
    pd.DataFrame({"trial_id": ids, "grad_norm": "big", "grad_norm_clipped": "0.25", "confusion": 0.1,
                  "tensor": "h.0.ln_1.weight", "share": 1.0}).to_parquet(root / "diagnostics" / "gradients.parquet")  # fmt: skip
    md = Path(write_report(root, n_boot=50)).read_text()
    assert "figure `gradients`: could not be computed from this sweep's data (TypeError" in md
    assert "finding 4: could not be computed from this sweep's data (TypeError" in md


def test_zero_finished_trials_is_one_line_and_exit_0(tmp_path, capsys):
    root = make_sweep(tmp_path / "none", diagnostics=False, swaps=False)
    trials = pd.read_parquet(root / "trials.parquet")
    trials.assign(status="running").to_parquet(root / "trials.parquet")
    assert main(["report", str(root)]) == 0
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and "no finished trial" in err
    assert "no finished trial with metrics" in (root / "report" / "index.md").read_text()


def test_report_on_a_file_uri_and_a_local_copy(tmp_path, capsys):
    root = make_sweep(tmp_path / "uri", diagnostics=False, swaps=False)
    uri = f"file://{root}"
    assert main(["report", uri]) == 0
    assert capsys.readouterr().out.strip() == f"{uri}/report/index.md"
    assert (root / "report" / "tables" / "final_scores.csv").exists()
    assert (root / "report" / "figures" / "return_curves.png").stat().st_size > 10_000
    copy = tmp_path / "copy"
    assert main(["report", uri, "--out", str(copy)]) == 0
    assert capsys.readouterr().out.strip() == str(copy / "index.md")
    assert (copy / "figures" / "return_curves.png").exists() and (copy / "tables" / "findings.csv").exists()
    assert (copy / "index.md").read_text().split("## Scores")[1] == (root / "report" / "index.md").read_text().split("## Scores")[
        1
    ]


def test_papers_random_rows_sit_beside_random_ref_when_it_ran(tmp_path):
    root = make_sweep(tmp_path / "ref", diagnostics=False, swaps=False, inits=("random-ref", "random", "gpt2"))
    scores = T.per_trial_scores(Sweep.load(root).metrics)
    t1 = T.paper_table1(scores, n_boot=50)
    rows = t1[(t1["init"] == "random") & t1["env"].isin(ENVS)]
    assert (rows["sweep family"] == "random-ref").all() and rows["sweep condition"].str.startswith("random-ref").all()
    assert "`random-ref` trials, the same architecture" in T.random_note(scores)

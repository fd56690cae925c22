"""benchmarks/gpu.py --smoke: every code path of the GPU benchmark runs on the CPU and reports.

No timing thresholds: only that each figure exists and is a positive number, and that what the
CPU cannot measure is named under "skipped" with a reason rather than left out.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def test_smoke_run_reports_every_figure(tmp_path, data_cache):
    out = tmp_path / "g.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    # A stated peak makes the MFU path run on a CPU, which has no datasheet entry.
    cmd = [sys.executable, "benchmarks/gpu.py", "--smoke", "--out", str(out), "--peak-tflops", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())

    assert set(res) == {"meta", "train", "eval", "packing", "skipped"}
    meta, skipped = res["meta"], res["skipped"]
    assert meta["smoke"] is True and positive(meta["flops_per_step"]) and positive(meta["block_params"])

    # Every training variant is either measured or skipped with a reason.
    for label in ("fp32", "tf32", "bf16", "bf16+compile"):
        assert (label in res["train"]) != (f"train.{label}" in skipped), label
    assert "train.tf32" in skipped  # no TF32 on a CPU
    assert {"fp32", "bf16"} <= set(res["train"])
    for label, e in res["train"].items():
        for key in ("steps_per_s", "model_tflops_per_s", "mfu", "warmup_s", "train_loss"):
            assert positive(e[key]), (label, key, e[key])
        assert e["peak_memory_gb"] is None and f"train.{label}.peak_memory_gb" in skipped  # CUDA only

    ev = res["eval"]
    assert ev["dtsweep"]["episodes"] > ev["reference"]["episodes"] >= 1
    for key in ("seconds", "episodes_per_s"):
        assert positive(ev["dtsweep"][key]) and positive(ev["reference"][key])
    assert positive(ev["ratio"])

    pk = res["packing"]
    assert len(pk["alone"]["per_trial_steps_per_s"]) == 1 and len(pk["two_on_one_device"]["per_trial_steps_per_s"]) == 2
    for rate in pk["alone"]["per_trial_steps_per_s"] + pk["two_on_one_device"]["per_trial_steps_per_s"]:
        assert positive(rate)
    assert positive(pk["alone"]["aggregate_steps_per_s"]) and positive(pk["two_on_one_device"]["aggregate_steps_per_s"])
    assert positive(pk["aggregate_gain"])
    assert all(isinstance(v, str) and v for v in skipped.values())


def test_readme_table_from_a_result(tmp_path):
    """--update-readme rewrites only the marked section (on a copy of the README)."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import gpu

    readme = tmp_path / "README.md"
    original = (ROOT / "benchmarks" / "README.md").read_text()
    readme.write_text(original)
    train = {
        label: {"steps_per_s": 10.0, "model_tflops_per_s": 20.0, "mfu": 0.25, "peak_memory_gb": 3.0}
        for label, *_ in gpu.TRAIN_VARIANTS
    }
    res = {
        "meta": {"command": "python benchmarks/gpu.py --out x.json", "date": "d", "device": "NVIDIA H100", "capability": "9.0",
                 "torch": "t", "cuda": "c", "model": gpu.GPT2_SIZE, "batch": 64, "context_len": 20,
                 "flops_per_step": 2e12, "peak_source": "datasheet"},
        "train": train,
        "eval": {"env": "halfcheetah", "episode_steps": 200, "dtsweep": {"episodes": 100, "episodes_per_s": 40.0},
                 "reference": {"episodes": 5, "episodes_per_s": 1.0}, "ratio": 40.0},
        "packing": {"precision": "fp32", "alone": {"aggregate_steps_per_s": 10.0},
                    "two_on_one_device": {"aggregate_steps_per_s": 15.0}, "aggregate_gain": 1.5},
    }  # fmt: skip
    gpu.update_readme(res, readme)
    text = readme.read_text()
    start, end = text.index(gpu.MARK_START), text.index(gpu.MARK_END)
    assert "| bf16+compile | 10 | 20 | 25.0 % | 3.00 |" in text[start:end]
    assert "**40**" in text[start:end] and "**1.5**" in text[start:end]
    # Everything outside the markers is unchanged.
    o_start, o_end = original.index(gpu.MARK_START), original.index(gpu.MARK_END)
    assert text[:start] == original[:o_start] and text[end:] == original[o_end:]

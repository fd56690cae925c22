"""Precision, TF32 flags, torch.compile and resume of the real TrialRunner, on CPU.

Every precision a CPU can run (fp32, bf16 autocast) and `compile: true` train a tiny DT for a
few real steps and survive a resume round trip through `torch.save` / `torch.load`. TF32 and
the CUDA generator need a GPU (benchmarks/gpu.py exercises them there); here the TF32 flags'
scoping is checked directly, since torch keeps them on a CPU-only build too.
"""

import io

import pytest
import torch

from dtsweep.spec import parse_spec
from dtsweep.store import Store
from dtsweep.train.loop import TrialRunner, check_precision, precision_flags, tf32_flags

torch.set_num_threads(1)

TINY = {"n_layer": 2, "n_embd": 32, "n_head": 2}


def tiny_trial(**train):
    raw = {
        "name": "p",
        "storage": "runs",
        "studies": [
            {
                "name": "a", "init": "random", "dataset": "hopper-random", "context_len": 5, "seed": [0],
                "model": TINY, "data": {"steps": 3000, "seed": 0}, "eval": {"action_error_samples": 16},
                "train": {"epochs": 1, "steps_per_epoch": 3, "batch_size": 8, "warmup_steps": 1, **train},
            }
        ],
    }  # fmt: skip
    (trial,) = parse_spec(raw).trials()
    return trial


def params(runner):
    return {n: p.detach().clone() for n, p in runner.model.named_parameters()}


@pytest.mark.parametrize(
    "precision,compile_",
    # Inductor compiles C++ kernels one after another on a CPU: minutes on a small machine.
    [("fp32", False), ("bf16", False), pytest.param("fp32", True, marks=pytest.mark.slow)],
    ids=["fp32", "bf16-autocast", "fp32-compile"],
)
def test_trains_and_resumes(precision, compile_, data_cache, tmp_path, monkeypatch):
    import torch._dynamo.config

    # Runner `again` below compiles the same forward for a second model in this process. With
    # a limit of 1, only the per-runner reset of the compile caches lets it compile at all
    # (the runner makes hitting the limit an error, not a silent fallback to eager).
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    trial = tiny_trial(precision=precision, compile=compile_)
    store = Store(str(tmp_path / "sweep"))
    runner = TrialRunner(trial, store, device=torch.device("cpu"))
    assert (runner.train_forward is not runner.model) == compile_
    start = params(runner)
    first = runner.train_epoch()
    assert 0 < first < 10 and torch.isfinite(torch.tensor(first))  # action MSE, actions in [-1, 1]
    assert any(not torch.equal(p, start[n]) for n, p in runner.model.named_parameters())

    buf = io.BytesIO()
    torch.save(runner.resume_state(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True, map_location="cpu")  # as tuning.train_trial loads it
    assert "cuda_rng" not in state  # a CPU trial has no CUDA generator to save

    second = runner.train_epoch()
    again = TrialRunner(trial, store, device=torch.device("cpu"))
    again.load_resume_state(state)
    resumed = again.train_epoch()
    assert resumed == pytest.approx(second, rel=1e-5)  # same batches, same dropout masks
    for name, p in again.model.named_parameters():
        torch.testing.assert_close(p, runner.model.state_dict()[name], rtol=1e-5, atol=1e-6, msg=name)
    # An un-resumed runner draws other dropout masks at this point: the comparison can fail.
    fresh = TrialRunner(trial, store, device=torch.device("cpu"))
    fresh.load_resume_state({**state, "torch_rng": torch.random.default_generator.get_state().clone()})
    assert fresh.train_epoch() != pytest.approx(second, rel=1e-5)


def test_tf32_flags_are_set_per_trial_and_restored(data_cache, tmp_path):
    # A previous trial in this (reused) worker left TF32 on.
    before = tf32_flags()
    try:
        with precision_flags("tf32"):
            assert tf32_flags() == ("tf32", "tf32")
            seen = []
            runner = TrialRunner(tiny_trial(), Store(str(tmp_path / "s")), device=torch.device("cpu"))
            runner.model.register_forward_hook(lambda *_: seen.append(tf32_flags()))
            runner.train_epoch()
            runner.action_error()
            # The fp32 trial ran with TF32 off, and gave the worker its settings back.
            assert seen and set(seen) == {("ieee", "ieee")}
            assert tf32_flags() == ("tf32", "tf32")
    finally:
        assert tf32_flags() == before


def test_precision_checks(monkeypatch):
    check_precision("fp32", torch.device("cpu"))
    check_precision("bf16", torch.device("cpu"))
    with pytest.raises(ValueError, match="needs a CUDA device"):
        check_precision("tf32", torch.device("cpu"))
    with pytest.raises(ValueError, match="must be one of"):
        check_precision("fp16", torch.device("cpu"))
    # A T4 (compute capability 7.5) only emulates bfloat16; an A100 (8.0) has it natively. The
    # device query is replaced because no GPU is attached here.
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_: (7, 5))
    with pytest.raises(ValueError, match="compute capability 8.0 or later.*Tesla T4 has 7.5"):
        check_precision("bf16", torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_: (8, 0))
    check_precision("bf16", torch.device("cuda", 0))

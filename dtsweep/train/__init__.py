"""Training loop and batched evaluation of one trial."""

from dtsweep.train.evaluate import EvalResult, evaluate_episodes
from dtsweep.train.loop import TrialRunner, pick_device, set_threads_for_trial

__all__ = ["EvalResult", "TrialRunner", "evaluate_episodes", "pick_device", "set_threads_for_trial"]

"""dtsweep: multi-seed sweeps of (pre-trained) Decision Transformers on offline RL."""

__version__ = "0.1.0"

"""Reference-style code paths, written to be timed against dtsweep's (benchmarks/run.py).

Each function does what the papers' released code does, the way it does it (Chen et al.'s
`gym/experiment.py` and `SequenceTrainer`, which Reid et al. and Takagi build on; Kornblith et
al.'s CKA notebook; one MINE critic per estimate). They are rewritten here, not copied, on
dtsweep's own model and data, so that a benchmark changes only *how* the work is done:

- `as_released`: the same weights run as the released code ran them (eager attention, unfused
  `gelu_new`, the unused return and state heads computed at every forward).
- `ReferenceBatcher.get_batch`: a Python loop over the B samples of a batch; each sample picks
  an episode with probability proportional to its length and a uniform start in it, slices the
  episode's arrays, recomputes the return-to-go of the rest of the episode with a Python
  `discount_cumsum`, pads on the left and normalises, then the B pieces are concatenated.
- `reference_train_step`: one step of `SequenceTrainer.train_step` (boolean-mask MSE, two
  host syncs per step for the logged loss and action error) with the torch defaults of AdamW.
- `reference_evaluate`: `evaluate_episode_rtg`: one episode after another, histories grown
  with `torch.cat`, the whole state history normalised again every step, and a full forward
  of a batch of one per env step.
- `reference_cka`: the CKA notebook's Gram-matrix route in numpy float64, one (layer, token) at
  a time: n×n Gram matrices, centred, then HSIC ratios (plug-in and debiased).

Two deliberate differences from the released code, neither of which changes the work done:
actions are padded with `PAD_ACTION` (-10) at evaluation as in training (the original DT
padded them with 0 at evaluation; DESIGN §4 asks for one convention), and timesteps are
clipped to max_ep_len - 1 at evaluation as in training. With those, `reference_evaluate`
computes the same returns as dtsweep's batched `evaluate_episodes` (tests/test_evaluate.py),
and `ReferenceBatcher` the same windows as `WindowSampler` on the unpadded steps.
"""

from __future__ import annotations

import copy

import gymnasium as gym
import numpy as np
import torch
from transformers.activations import NewGELUActivation

from dtsweep.data.d4rl import episode_bounds
from dtsweep.data.trajectories import PAD_ACTION
from dtsweep.envs import ENVS
from dtsweep.models import DecisionTransformer
from dtsweep.train.evaluate import EvalResult

# ---------------------------------------------------------------------------- the model


class ReleasedDT(torch.nn.Module):
    """dtsweep's DT computing as the released DT did (see `as_released`).

    Forward returns the wrapped DT's `DTOutput`; the return and state predictions are computed
    and dropped, as the released trainer and evaluation dropped them.
    """

    def __init__(self, dt: DecisionTransformer):
        super().__init__()
        self.dt = dt
        hidden = dt.hidden_size
        self.predict_state = torch.nn.Linear(hidden, dt.state_dim)
        self.predict_return = torch.nn.Linear(hidden, 1)

    @property
    def transformer(self):
        return self.dt.transformer

    def forward(self, *args, **kwargs):
        out = self.dt(*args, **kwargs)
        batch, k = out.action_preds.shape[:2]
        action_tokens = out.last_hidden.reshape(batch, k, 3, -1)[:, :, 2]
        self.predict_return(action_tokens), self.predict_state(action_tokens)
        return out


def as_released(model: DecisionTransformer) -> ReleasedDT:
    """A copy of `model` (same weights, same action predictions) that computes as released.

    The released code's vendored GPT-2 had eager attention (no SDPA) and spelled `gelu_new`'s
    tanh-GELU out in five elementwise kernels (dtsweep's trials run it as one, see
    `train.loop.use_fused_gelu`), and its DT computed return and state predictions from the
    action tokens at every forward, used or not.
    """
    ref = copy.deepcopy(model)
    ref.transformer.set_attn_implementation("eager")
    if ref.transformer.config.activation_function in ("gelu_new", "gelu_pytorch_tanh"):
        for block in ref.transformer.h:
            block.mlp.act = NewGELUActivation()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return ReleasedDT(ref)


# ---------------------------------------------------------------------------- batches


def discount_cumsum(x: np.ndarray, gamma: float) -> np.ndarray:
    """out[t] = sum_{u >= t} gamma^(u - t) x[u], with a Python loop from the end (as released)."""
    out = np.zeros_like(x)
    out[-1] = x[-1]
    for t in reversed(range(x.shape[0] - 1)):
        out[t] = x[t] + gamma * out[t + 1]
    return out


class ReferenceBatcher:
    """The reference DT's `get_batch`: trajectories as a list of dicts, one sample at a time.

    arrays: a D4RL-layout dict (observations, actions, rewards, terminals, timeouts).
    state_mean / state_std [S]: the statistics dtsweep uses (`Trajectories.state_mean/std`).
    """

    def __init__(
        self,
        arrays: dict[str, np.ndarray],
        context_len: int,
        batch_size: int,
        *,
        state_mean: np.ndarray,
        state_std: np.ndarray,
        seed: int,
        rtg_scale: float = 1000.0,
        max_ep_len: int = 1000,
        device: str | torch.device = "cpu",
    ):
        starts, lengths = episode_bounds(arrays["terminals"], arrays["timeouts"])
        self.trajectories = [
            {key: np.asarray(arrays[key][s : s + n]) for key in ("observations", "actions", "rewards", "terminals")}
            for s, n in zip(starts, lengths)
        ]
        self.lengths = np.asarray(lengths)
        self.p_sample = self.lengths / self.lengths.sum()
        self.context_len, self.batch_size = context_len, batch_size
        self.state_mean, self.state_std = state_mean, state_std
        self.rtg_scale, self.max_ep_len, self.device = rtg_scale, max_ep_len, device
        self.state_dim = arrays["observations"].shape[1]
        self.act_dim = arrays["actions"].shape[1]
        self.rng = np.random.default_rng(seed)

    def get_batch(self, picks: list[tuple[int, int]] | None = None) -> dict[str, torch.Tensor]:
        """dtsweep's five window tensors (see `dtsweep.data.window_batch`) + rewards and dones.

        The reference also builds per-step `rewards` [B, K, 1] and `dones` [B, K] (padded
        with 0 and 2 as released), which the DT's action loss never reads.
        picks: optional (episode, start within the episode) per sample, to build given windows;
        by default batch_size of them are drawn as the reference does.
        """
        k, s_dim, a_dim = self.context_len, self.state_dim, self.act_dim
        if picks is None:
            episodes = self.rng.choice(len(self.trajectories), size=self.batch_size, replace=True, p=self.p_sample)
            picks = [(int(e), int(self.rng.integers(0, self.lengths[e]))) for e in episodes]
        s, a, r, d, rtg, timesteps, mask = [], [], [], [], [], [], []
        for episode, si in picks:
            traj = self.trajectories[episode]
            s.append(traj["observations"][si : si + k].reshape(1, -1, s_dim))
            a.append(traj["actions"][si : si + k].reshape(1, -1, a_dim))
            r.append(traj["rewards"][si : si + k].reshape(1, -1, 1))
            d.append(traj["terminals"][si : si + k].reshape(1, -1))
            tlen = s[-1].shape[1]
            timesteps.append(np.minimum(np.arange(si, si + tlen), self.max_ep_len - 1).reshape(1, -1))
            rtg.append(discount_cumsum(traj["rewards"][si:], gamma=1.0)[:tlen].reshape(1, -1, 1))

            s[-1] = np.concatenate([np.zeros((1, k - tlen, s_dim)), s[-1]], axis=1)
            s[-1] = (s[-1] - self.state_mean) / self.state_std
            a[-1] = np.concatenate([np.ones((1, k - tlen, a_dim)) * PAD_ACTION, a[-1]], axis=1)
            r[-1] = np.concatenate([np.zeros((1, k - tlen, 1)), r[-1]], axis=1)
            d[-1] = np.concatenate([np.ones((1, k - tlen)) * 2, d[-1]], axis=1)
            rtg[-1] = np.concatenate([np.zeros((1, k - tlen, 1)), rtg[-1]], axis=1) / self.rtg_scale
            timesteps[-1] = np.concatenate([np.zeros((1, k - tlen)), timesteps[-1]], axis=1)
            mask.append(np.concatenate([np.zeros((1, k - tlen)), np.ones((1, tlen))], axis=1))

        def tensor(parts, dtype):
            return torch.from_numpy(np.concatenate(parts, axis=0)).to(dtype=dtype, device=self.device)

        return {
            "states": tensor(s, torch.float32),
            "actions": tensor(a, torch.float32),
            "returns_to_go": tensor(rtg, torch.float32),
            "timesteps": tensor(timesteps, torch.long),
            "attention_mask": tensor(mask, torch.float32),
            # Built and moved like the rest by the reference; the DT's action loss reads neither.
            "rewards": tensor(r, torch.float32),
            "dones": tensor(d, torch.long),
        }


# ---------------------------------------------------------------------------- training


def reference_train_step(model, optimizer, scheduler, batcher: ReferenceBatcher, grad_clip: float = 0.25) -> float:
    """One step of the reference `SequenceTrainer` (+ its scheduler step); returns the loss."""
    model.train()
    batch = batcher.get_batch()
    batch.pop("rewards"), batch.pop("dones")
    action_target = torch.clone(batch["actions"])
    action_preds = model(**batch).action_preds
    act_dim = action_preds.shape[2]
    keep = batch["attention_mask"].reshape(-1) > 0
    action_preds = action_preds.reshape(-1, act_dim)[keep]
    action_target = action_target.reshape(-1, act_dim)[keep]
    loss = torch.mean((action_preds - action_target) ** 2)
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    with torch.no_grad():
        _action_error = torch.mean((action_preds - action_target) ** 2).detach().cpu().item()
    scheduler.step()
    return loss.detach().cpu().item()


# ---------------------------------------------------------------------------- evaluation


def _get_action(model, states, actions, returns_to_go, timesteps, context_len, pad_action):
    """The reference DT's `get_action`: last K steps of one history, left-padded, one forward."""
    s_dim, a_dim = states.shape[-1], actions.shape[-1]
    states = states.reshape(1, -1, s_dim)[:, -context_len:]
    actions = actions.reshape(1, -1, a_dim)[:, -context_len:]
    returns_to_go = returns_to_go.reshape(1, -1, 1)[:, -context_len:]
    timesteps = timesteps.reshape(1, -1)[:, -context_len:]
    pad = context_len - states.shape[1]
    dev = states.device
    mask = torch.cat([torch.zeros(pad), torch.ones(states.shape[1])]).to(dtype=torch.float32, device=dev).reshape(1, -1)
    states = torch.cat([torch.zeros((1, pad, s_dim), device=dev), states], dim=1).float()
    actions = torch.cat([torch.full((1, pad, a_dim), pad_action, device=dev), actions], dim=1).float()
    returns_to_go = torch.cat([torch.zeros((1, pad, 1), device=dev), returns_to_go], dim=1).float()
    timesteps = torch.cat([torch.zeros((1, pad), device=dev, dtype=torch.long), timesteps], dim=1)
    out = model(states, actions, returns_to_go, timesteps, attention_mask=mask)
    return out.action_preds[0, -1]


@torch.no_grad()
def reference_evaluate(
    model: torch.nn.Module,
    env: str,
    *,
    n_episodes: int,
    seed: int,
    target_return: float,
    state_mean: np.ndarray,
    state_std: np.ndarray,
    context_len: int,
    rtg_scale: float = 1000.0,
    max_steps: int = 1000,
    max_ep_len: int = 1000,
    device: str | torch.device = "cpu",
    pad_action: float = PAD_ACTION,
    gym_env: gym.Env | None = None,
) -> EvalResult:
    """`evaluate_episode_rtg`, episode i seeded `seed + i`, one after another. Raw env returns.

    gym_env: the env to run in (the released code makes one at start-up and reuses it); by
    default one is made and closed here.
    """
    info = ENVS[env]
    was_training = model.training
    model.eval()
    mean = torch.from_numpy(np.asarray(state_mean, dtype=np.float32)).to(device)
    std = torch.from_numpy(np.asarray(state_std, dtype=np.float32)).to(device)
    returns, lengths = np.zeros(n_episodes), np.zeros(n_episodes, dtype=np.int64)
    e = gym.make(info.gym_id) if gym_env is None else gym_env
    try:
        for i in range(n_episodes):
            state, _ = e.reset(seed=seed + i)
            states = torch.from_numpy(state).reshape(1, info.obs_dim).to(device=device, dtype=torch.float32)
            actions = torch.zeros((0, info.act_dim), device=device, dtype=torch.float32)
            target = torch.tensor(target_return / rtg_scale, device=device, dtype=torch.float32).reshape(1, 1)
            timesteps = torch.tensor(0, device=device, dtype=torch.long).reshape(1, 1)
            rewards = torch.zeros(0, device=device, dtype=torch.float32)
            for t in range(max_steps):
                actions = torch.cat([actions, torch.zeros((1, info.act_dim), device=device)], dim=0)
                rewards = torch.cat([rewards, torch.zeros(1, device=device)])
                # As released: the history is float64 (see the torch.cat below), converted and
                # normalised whole at every step.
                normalised = (states.to(dtype=torch.float32) - mean) / std
                action = _get_action(model, normalised, actions, target, timesteps, context_len, pad_action)
                action = action.clamp(-1.0, 1.0)
                actions[-1] = action
                state, reward, terminated, truncated, _ = e.step(action.cpu().numpy())
                rewards[-1] = reward  # kept as released; the DT never reads it
                # float32 history + float64 row: cat promotes the whole history to float64.
                states = torch.cat([states, torch.from_numpy(state).to(device=device).reshape(1, info.obs_dim)])
                target = torch.cat([target, (target[0, -1] - reward / rtg_scale).reshape(1, 1)], dim=1)
                step = torch.full((1, 1), min(t + 1, max_ep_len - 1), device=device, dtype=torch.long)
                timesteps = torch.cat([timesteps, step], dim=1)
                returns[i] += reward
                lengths[i] += 1
                if terminated or truncated:
                    break
    finally:
        if gym_env is None:
            e.close()
        model.train(was_training)
    return EvalResult(returns=returns, lengths=lengths)


# ---------------------------------------------------------------------------- CKA


def _centered_gram(x: np.ndarray, unbiased: bool) -> np.ndarray:
    """Linear Gram matrix of x [n, d], double-centred (or U-centred for the debiased HSIC)."""
    gram = x @ x.T
    n = gram.shape[0]
    if unbiased:
        # U-centring (Székely & Rizzo): zero diagonal, then remove row/column means with the
        # n - 2 normalisation; the Frobenius product of two such matrices is unbiased HSIC.
        gram = gram.copy()
        np.fill_diagonal(gram, 0.0)
        means = gram.sum(0) / (n - 2)
        means -= means.sum() / (2 * (n - 1))
        gram -= means[:, None]
        gram -= means[None, :]
        np.fill_diagonal(gram, 0.0)
        return gram
    means = gram.mean(0)
    means -= means.mean() / 2
    return gram - means[:, None] - means[None, :]


def _cka_from_grams(gx: np.ndarray, gy: np.ndarray) -> float:
    hsic = gx.ravel() @ gy.ravel()
    return float(hsic / (np.linalg.norm(gx) * np.linalg.norm(gy)))


def reference_cka(x: np.ndarray, y: np.ndarray, debiased: bool = False) -> float:
    """Linear CKA of x [n, d1] and y [n, d2] (rows = examples) via n×n Gram matrices, float64."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    return _cka_from_grams(_centered_gram(x, debiased), _centered_gram(y, debiased))

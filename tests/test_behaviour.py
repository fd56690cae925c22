"""Behaviour policies for `medium` datasets: SAC training, the shipped actors, the datasets."""

from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest
import torch

from dtsweep.data import behaviour as bh
from dtsweep.data.d4rl import (
    D4RL_DTYPES,
    D4RL_KEYS,
    make_dataset,
    read_d4rl_hdf5,
    read_dataset_card,
)
from dtsweep.envs import ENVS, normalized_score
from dtsweep.pretrain import behaviour as sac

ENV_NAMES = sorted(ENVS)  # every env ships an actor; a missing one fails its tests


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- shipped actors


@pytest.mark.parametrize("env", ENV_NAMES)
def test_shipped_actor_samples_bounded_actions_deterministic_by_rng(env):
    info = ENVS[env]
    policy = bh.load_behaviour_policy(env)
    obs = np.random.default_rng(0).normal(size=(7, info.obs_dim)).astype(np.float32)

    a = policy(obs, np.random.default_rng(1))
    assert a.shape == (7, info.act_dim) and a.dtype == np.float32
    assert np.all(np.abs(a) <= 1.0)
    np.testing.assert_array_equal(a, policy(obs, np.random.default_rng(1)))
    assert not np.array_equal(a, policy(obs, np.random.default_rng(2)))  # it is stochastic
    # ... and it looks at the observation: the same noise on other states gives other actions.
    assert not np.allclose(a, policy(obs[::-1].copy(), np.random.default_rng(1))[::-1])


@pytest.mark.parametrize("env", ENV_NAMES)
def test_shipped_card_describes_an_in_band_actor(env):
    card = bh.load_behaviour_card(env)
    info = ENVS[env]
    lo, hi = bh.MEDIUM_BANDS[env]
    assert card["env"] == env and card["gym_id"] == info.gym_id
    assert card["in_band"] is True and card["target_band"] == [lo, hi]
    ev = card["eval"]
    assert ev["policy"] == "stochastic" and ev["episodes"] >= 10
    assert lo <= ev["normalized_score"] <= hi
    assert ev["normalized_score"] == pytest.approx(normalized_score(env, ev["return_mean"]))
    assert ev["return_std"] >= 0
    assert card["training_steps"] > 0 and isinstance(card["seed"], int)
    assert card["command"].startswith("python -m dtsweep")
    assert {"gymnasium", "mujoco"} <= set(card["versions"])

    # The card's hidden sizes are those of the saved weights, which are float16.
    from safetensors.numpy import load_file

    weights = load_file(str(bh.behaviour_asset_dir(env) / "actor.safetensors"))
    assert all(w.dtype == np.float16 for w in weights.values())
    trunk = [weights[f"trunk.{2 * i}.weight"].shape[0] for i in range(len(card["hidden_sizes"]))]
    assert trunk == card["hidden_sizes"]
    assert weights["head.weight"].shape == (2 * info.act_dim, card["hidden_sizes"][-1])


def test_shipped_actors_fit_in_one_megabyte():
    total = sum((bh.behaviour_asset_dir(e) / "actor.safetensors").stat().st_size for e in ENV_NAMES)
    assert total < 1_000_000


@pytest.mark.parametrize("env", [pytest.param(e, marks=[] if e == "hopper" else pytest.mark.slow) for e in ENV_NAMES])
def test_card_score_is_reproduced_by_the_saved_weights(env):
    card = bh.load_behaviour_card(env)
    policy = bh.load_behaviour_policy(env)
    ev = card["eval"]
    returns = bh.evaluate_policy(env, policy, ev["episodes"], ev["seed"])
    # Not bit for bit: 1000-step MuJoCo episodes are chaotic, and another CPU's rounding
    # (the cards were made on an Intel Xeon; AMD EPYC differs) moves single episodes by
    # hundreds. The same weights must give the card's score within its sampling error:
    # 4 standard errors of the mean, and a spread within 30% of the card's.
    standard_error = ev["return_std"] / np.sqrt(ev["episodes"])
    assert abs(returns.mean() - ev["return_mean"]) <= 4 * standard_error
    assert returns.std() == pytest.approx(ev["return_std"], rel=0.3)


# ----------------------------------------------------------------------------- SAC


def test_numpy_policy_is_the_torch_actor_with_float16_weights():
    torch.manual_seed(0)
    actor = sac.Actor(11, 3, (32, 32))
    weights = sac.export_actor(actor)
    policy = bh.NumpyPolicy(weights)
    obs = np.random.default_rng(0).normal(size=(5, 11)).astype(np.float32)

    rounded = sac.Actor(11, 3, (32, 32))
    rounded.load_state_dict({k: torch.from_numpy(v.astype(np.float32)) for k, v in weights.items()})
    with torch.no_grad():
        mean, log_std = rounded.head(rounded.trunk(torch.from_numpy(obs))).chunk(2, dim=-1)
    noise = np.random.default_rng(3).standard_normal((5, 3), dtype=np.float32)
    expected = np.tanh(mean.numpy() + np.exp(log_std.clamp(-5, 2).numpy()) * noise)
    np.testing.assert_allclose(policy(obs, np.random.default_rng(3)), expected, atol=1e-5)


def test_actor_log_prob_is_the_tanh_gaussian_density():
    torch.manual_seed(0)
    actor = sac.Actor(4, 2, (16,))
    obs = torch.randn(6, 4)
    torch.manual_seed(1)
    action, log_prob = actor(obs)
    # Recompute with torch's own TransformedDistribution over the same pre-tanh sample.
    mean, log_std = actor.head(actor.trunk(obs)).chunk(2, dim=-1)
    dist = torch.distributions.TransformedDistribution(
        torch.distributions.Normal(mean, log_std.clamp(-5, 2).exp()),
        [torch.distributions.TanhTransform(cache_size=1)],
    )
    assert torch.all(action.abs() < 1)
    torch.testing.assert_close(log_prob, dist.log_prob(action).sum(-1), atol=1e-4, rtol=1e-4)


def test_sac_updates_on_real_transitions_change_every_network(one_thread):
    env = gym.make("Hopper-v5")
    cfg = sac.SACConfig(hidden=(32, 32), batch_size=64)
    torch.manual_seed(0)
    agent = sac.SAC(11, 3, cfg)
    buffer = sac.ReplayBuffer(11, 3, 400, seed=0)
    rng = np.random.default_rng(0)
    obs, _ = env.reset(seed=0)
    for _ in range(400):
        action = rng.uniform(-1, 1, 3).astype(np.float32)
        next_obs, reward, terminated, truncated, _ = env.step(action)
        buffer.add(obs, action, reward, next_obs, terminated)
        obs = env.reset()[0] if terminated or truncated else next_obs

    before = {
        name: {k: v.clone() for k, v in net.state_dict().items()}
        for name, net in [("actor", agent.actor), ("critic", agent.critic), ("target", agent.target_critic)]
    }
    alpha_before = agent.log_alpha.item()
    stats = [agent.update(buffer.sample(cfg.batch_size)) for _ in range(200)]

    for key in ("critic_loss", "actor_loss", "alpha", "entropy"):
        assert np.all(np.isfinite([s[key] for s in stats])), key
    assert stats[-1]["critic_loss"] < stats[0]["critic_loss"]  # it fits the Bellman targets
    for name, net in [("actor", agent.actor), ("critic", agent.critic), ("target", agent.target_critic)]:
        changed = [not torch.equal(v, before[name][k]) for k, v in net.state_dict().items()]
        assert all(changed), name
    assert agent.log_alpha.item() != alpha_before
    # Polyak averaging: the target trails the critic, it does not copy it.
    assert not torch.equal(agent.target_critic.net[0].weight, agent.critic.net[0].weight)


def test_train_behaviour_saves_the_evaluated_actor_and_its_card(tmp_path, one_thread):
    cfg = sac.SACConfig(hidden=(32, 32), batch_size=64, start_steps=200, eval_every=150, eval_episodes=2, confirm_episodes=3)
    card = sac.train_behaviour(
        "hopper", seed=1, target_band=(-1e9, 1e9), max_steps=1000, config=cfg, out_dir=tmp_path, log=lambda s: None
    )

    # The wide band is hit at the first evaluation after the random warm-up (step 300).
    assert card["in_band"] is True and card["training_steps"] == 300
    assert card["eval"]["episodes"] == 3 and card["hidden_sizes"] == [32, 32]
    assert json.loads((tmp_path / "card.json").read_text()) == json.loads(json.dumps(card))
    policy = bh.load_behaviour_policy("hopper", tmp_path)
    returns = bh.evaluate_policy("hopper", policy, 3, card["eval"]["seed"])
    # Same process and weights; 3 short hopper episodes of a barely trained policy. A tolerance
    # of 1e-6 covers rounding that a different float path (saved float16 weights reloaded)
    # could introduce, while a wrong actor or seed moves the mean by whole units.
    assert returns.mean() == pytest.approx(card["eval"]["return_mean"], rel=1e-6)


def test_train_behaviour_keeps_the_closest_snapshot_when_the_band_is_missed(tmp_path, one_thread):
    cfg = sac.SACConfig(hidden=(16,), batch_size=32, start_steps=100, eval_every=100, eval_episodes=2)
    card = sac.train_behaviour("hopper", target_band=(1e6, 2e6), max_steps=300, config=cfg, out_dir=tmp_path, log=lambda s: None)
    assert card["in_band"] is False and card["training_steps"] in (200, 300)
    assert bh.load_behaviour_card("hopper", tmp_path) == json.loads(json.dumps(card))
    # An actor outside the band makes no `medium` dataset.
    with pytest.raises(ValueError, match="outside the medium band"):
        bh.make_medium_dataset("hopper", 100, 0, tmp_path / "m.hdf5", asset_dir=tmp_path)
    assert not (tmp_path / "m.hdf5").exists()


def test_cli_fills_unset_options_from_the_env_recipe(tmp_path):
    from dtsweep.cli import main

    # hopper's recipe evaluates every 1000 steps; 300 steps end before the first evaluation.
    with pytest.raises(ValueError, match=r"start_steps=5000, eval_every=1000"):
        main(["pretrain", "behaviour", "hopper", "--max-steps", "300", "--out-dir", str(tmp_path)])
    with pytest.raises(ValueError, match=r"eval_every=7"):
        main(["pretrain", "behaviour", "hopper", "--max-steps", "300", "--eval-every", "7", "--out-dir", str(tmp_path)])


def test_unknown_env_is_rejected():
    with pytest.raises(ValueError, match="unknown env"):
        bh.behaviour_asset_dir("ant")


# ----------------------------------------------------------------------------- medium datasets


def test_medium_dataset_layout_and_card(tmp_path):
    out = tmp_path / "hopper-medium.hdf5"
    card = bh.make_medium_dataset("hopper", 3000, 0, out)
    data = read_d4rl_hdf5(out)  # the D4RL reader takes the file as written
    assert set(data) == set(D4RL_KEYS)
    for key, value in data.items():
        assert value.dtype == D4RL_DTYPES[key] and len(value) == 3000, key
    assert data["observations"].shape == data["next_observations"].shape == (3000, 11)
    assert data["actions"].shape == (3000, 3)
    assert np.all(np.abs(data["actions"]) <= 1.0)
    assert read_dataset_card(out) == json.loads(json.dumps(card))
    assert card["quality"] == "medium" and card["steps"] == 3000
    assert card["behaviour"] == bh.load_behaviour_card("hopper")
    ends = data["terminals"] | data["timeouts"]
    assert card["episodes"] == int(ends.sum()) > 0
    # Within an episode the next observation is the following row's observation.
    inner = np.flatnonzero(~ends[:-1])
    np.testing.assert_array_equal(data["next_observations"][inner], data["observations"][inner + 1])


def test_medium_dataset_is_deterministic_by_seed(tmp_path):
    def make(name, seed):
        bh.make_medium_dataset("hopper", 1500, seed, tmp_path / name)
        return read_d4rl_hdf5(tmp_path / name)

    a, b, c = make("a.hdf5", 5), make("b.hdf5", 5), make("c.hdf5", 6)
    for key in D4RL_KEYS:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["actions"], c["actions"])


@pytest.mark.parametrize("env", [pytest.param(e, marks=[] if e == "hopper" else pytest.mark.slow) for e in ENV_NAMES])
def test_medium_dataset_behaviour_score_is_in_band(tmp_path, env):
    card = bh.make_medium_dataset(env, 20_000, 0, tmp_path / f"{env}-medium.hdf5")
    lo, hi = bh.MEDIUM_BANDS[env]
    assert card["episodes"] >= 10
    assert lo <= card["normalized_score"] <= hi


def test_medium_is_the_registered_generator(tmp_path):
    card = make_dataset("hopper-medium", steps=500, seed=0, out_path=tmp_path / "m.hdf5")
    assert card["generator"] == "dtsweep.data.behaviour.make_medium_dataset"

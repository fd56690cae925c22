"""The data layer: D4RL files, dataset resolution and generation, trajectory windows.

Real MuJoCo rollouts (a few thousand steps), real HDF5 files in tmp dirs, no network.
"""

from __future__ import annotations

import json
import threading
import types

import h5py
import numpy as np
import pytest
import torch

from dtsweep.data import (
    CARD_ATTR,
    DatasetNotFoundError,
    WindowSampler,
    generated_file_name,
    load_dataset,
    make_random_dataset,
    read_d4rl_hdf5,
    read_dataset_card,
    resolve_dataset,
    returns_to_go,
    rollout_dataset,
    split_trajectories,
    uniform_policy,
    window_batch,
    write_d4rl_hdf5,
)
from dtsweep.data import d4rl as d4rl_module
from dtsweep.data.d4rl import minari_to_d4rl

torch.set_num_threads(1)

STEPS = 1500


@pytest.fixture(autouse=True)
def caches(tmp_path, monkeypatch):
    """Both dataset caches in tmp dirs, and no network."""
    monkeypatch.setenv("DTSWEEP_DATA_DIR", str(tmp_path / "dtsweep_cache"))
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path / "d4rl_cache"))
    monkeypatch.setenv("DTSWEEP_OFFLINE", "1")
    return tmp_path


@pytest.fixture(scope="module")
def hopper_random(tmp_path_factory):
    """A small generated hopper-random file and its card."""
    path = tmp_path_factory.mktemp("gen") / "hopper-random.hdf5"
    card = make_random_dataset("hopper", STEPS, seed=0, out_path=path)
    return path, card


# --- generated files ------------------------------------------------------------------------


def test_generated_file_has_d4rl_layout_and_card(hopper_random):
    path, card = hopper_random
    with h5py.File(path, "r") as f:
        assert set(f.keys()) == {"observations", "next_observations", "actions", "rewards", "terminals", "timeouts"}
        for key in ("observations", "next_observations", "actions", "rewards"):
            assert f[key].dtype == np.float32, key
        assert f["terminals"].dtype == np.bool_ and f["timeouts"].dtype == np.bool_
        assert f["observations"].shape == f["next_observations"].shape == (STEPS, 11)
        assert f["actions"].shape == (STEPS, 3)
        assert f["rewards"].shape == f["terminals"].shape == f["timeouts"].shape == (STEPS,)
        assert json.loads(f.attrs[CARD_ATTR]) == card
    assert read_dataset_card(path) == card
    assert card["env"] == "hopper" and card["quality"] == "random" and card["steps"] == STEPS
    assert card["seed"] == 0 and card["episodes"] > 10
    # A uniform policy is D4RL's "random": about 0 normalised score (D4RL's is 1.2 on hopper).
    assert -5 < card["normalized_score"] < 10


def test_reader_reads_generated_file_unchanged(hopper_random):
    path, _ = hopper_random
    expected = rollout_dataset("hopper", uniform_policy(3), STEPS, seed=0)
    got = read_d4rl_hdf5(path)
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key].dtype == expected[key].dtype
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def test_same_seed_same_file_other_seed_other_data(tmp_path, hopper_random):
    path, _ = hopper_random
    again = tmp_path / "again.hdf5"
    make_random_dataset("hopper", STEPS, seed=0, out_path=again)
    assert again.read_bytes() == path.read_bytes()

    other = rollout_dataset("hopper", uniform_policy(3), STEPS, seed=1)
    assert not np.array_equal(other["observations"], read_d4rl_hdf5(path)["observations"])


def test_episodes_end_with_true_final_observation(hopper_random):
    data = read_d4rl_hdf5(hopper_random[0])
    obs, nxt, term = data["observations"], data["next_observations"], data["terminals"]
    # Hopper-v5 terminates when z = obs[0] <= 0.7 or |angle| = |obs[1]| >= 0.2 (or a state
    # exceeds 100): a terminal row's next observation must be that unhealthy final state,
    # not the reset state of the next episode, and every other row's must be healthy.
    unhealthy = (nxt[:, 0] <= 0.7) | (np.abs(nxt[:, 1]) >= 0.2)
    unhealthy |= (np.abs(nxt[:, 1:5]) >= 100).any(axis=1)
    assert term.sum() > 10
    np.testing.assert_array_equal(unhealthy, term)
    # Within an episode, s_{t+1} is the next row's observation.
    inside = ~(term | data["timeouts"])[:-1]
    np.testing.assert_array_equal(nxt[:-1][inside], obs[1:][inside])


def test_time_limit_sets_timeouts_not_terminals():
    cap = 5
    data = rollout_dataset("hopper", uniform_policy(3), 200, seed=3, num_envs=4, max_episode_steps=cap)
    assert len(data["rewards"]) == 200
    traj = split_trajectories(data)
    assert traj.episode_lengths.max() <= cap
    last = traj.episode_starts + traj.episode_lengths - 1
    full = traj.episode_lengths[:-1] == cap  # every episode but the trailing one is complete
    np.testing.assert_array_equal(data["timeouts"][last[:-1]], full & ~data["terminals"][last[:-1]])
    assert data["timeouts"].sum() > 0
    assert not (data["timeouts"] & data["terminals"]).any()
    # A timed-out episode's next observation continues the physics, it is not a reset state.
    rows = last[:-1][data["timeouts"][last[:-1]]]
    assert np.abs(data["next_observations"][rows] - data["observations"][rows]).max() > 0


# --- reading and resolving ------------------------------------------------------------------


def test_reader_names_missing_keys(tmp_path):
    path = tmp_path / "bad.hdf5"
    with h5py.File(path, "w") as f:
        f["observations"] = np.zeros((3, 2), np.float32)
        f["actions"] = np.zeros((3, 1), np.float32)
    with pytest.raises(KeyError, match=r"rewards.*terminals.*timeouts"):
        read_d4rl_hdf5(path)


def test_writer_is_atomic_and_casts(tmp_path):
    arrays = {
        "observations": np.zeros((4, 2)),  # float64 in, float32 out
        "actions": np.zeros((4, 1)),
        "rewards": np.arange(4),
        "terminals": np.array([0, 0, 1, 0]),
        "timeouts": np.zeros(4),
    }
    path = tmp_path / "sub" / "x.hdf5"
    write_d4rl_hdf5(path, arrays, {"note": "hi", "card": {"a": 1}})
    got = read_d4rl_hdf5(path)
    assert got["observations"].dtype == np.float32 and got["terminals"].dtype == np.bool_
    assert "next_observations" not in got
    with h5py.File(path, "r") as f:
        assert f.attrs["note"] == "hi" and json.loads(f.attrs["card"]) == {"a": 1}
    assert [p.name for p in path.parent.iterdir()] == ["x.hdf5"]  # no temporary left behind
    with pytest.raises(ValueError, match="rows"):
        write_d4rl_hdf5(tmp_path / "y.hdf5", {**arrays, "rewards": np.zeros(3)})
    assert not (tmp_path / "y.hdf5").exists()


def count_random_generator(monkeypatch):
    """Wrap the real `random` generator to count how often resolve_dataset runs it."""
    calls = []

    def counted(env, steps, seed, out_path):
        calls.append(out_path)
        return make_random_dataset(env, steps, seed, out_path)

    monkeypatch.setitem(d4rl_module._GENERATORS, "random", counted)
    return calls


def test_resolve_generates_into_cache_once_then_reuses(caches, monkeypatch):
    calls = count_random_generator(monkeypatch)
    path = resolve_dataset("hopper-random", steps=800, seed=2)
    assert path == caches / "dtsweep_cache" / generated_file_name("hopper-random", 800, 2)
    assert path.name == "hopper-random_steps=800_seed=2.hdf5"
    assert read_dataset_card(path)["steps"] == 800
    mtime = path.stat().st_mtime_ns
    assert resolve_dataset("hopper-random", steps=800, seed=2) == path
    assert path.stat().st_mtime_ns == mtime and len(calls) == 1
    assert len(load_dataset("hopper-random", steps=800, seed=2)["rewards"]) == 800
    # A file path resolves to itself.
    assert resolve_dataset(str(path)) == path


def test_concurrent_resolves_generate_once(monkeypatch):
    calls = count_random_generator(monkeypatch)
    results, errors = [], []

    def worker():
        try:
            results.append(resolve_dataset("hopper-random", steps=500, seed=0))
        except Exception as e:  # surfaced by the assert below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1 and len(calls) == 1
    assert len(read_d4rl_hdf5(results[0])["rewards"]) == 500


def test_versioned_name_reads_d4rl_cache_unversioned_never_does(caches):
    arrays = rollout_dataset("hopper", uniform_policy(3), 50, seed=0, num_envs=2)
    d4rl_file = caches / "d4rl_cache" / "hopper_medium_replay-v2.hdf5"
    write_d4rl_hdf5(d4rl_file, arrays)
    assert resolve_dataset("hopper-medium-replay-v2") == d4rl_file
    # One meaning per name: an unversioned name is dtsweep's generated data on every
    # machine, whether or not D4RL's file happens to be present on this one.
    with pytest.raises(DatasetNotFoundError, match="no offline generator for 'medium-replay'"):
        resolve_dataset("hopper-medium-replay")


def test_file_paths_and_names_are_told_apart(tmp_path, monkeypatch):
    from dtsweep.data import dataset_kind

    assert [dataset_kind(n) for n in ("hopper-medium", "hopper-medium-v2", "minari:mujoco/hopper/medium-v0",
                                      "data/x.hdf5", "x.h5", "/abs/file", "~/d.hdf5")] == \
        ["name", "name", "minari", "file", "file", "file", "file"]  # fmt: skip
    # A file in the working directory that happens to be called like a dataset is not read
    # for that name: names never mean local files.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hopper-random").write_text("not a dataset")
    path = resolve_dataset("hopper-random", steps=300, seed=0)
    assert path.parent == tmp_path / "dtsweep_cache"


def test_missing_versioned_dataset_says_how_to_get_it():
    with pytest.raises(DatasetNotFoundError) as info:
        resolve_dataset("walker2d-medium-v2")
    message = str(info.value)
    assert "\n" not in message
    assert "walker2d_medium-v2.hdf5" in message
    assert "gym_mujoco_v2/walker2d_medium-v2.hdf5" in message  # where to download it
    assert "dtsweep data make walker2d-medium" in message
    assert isinstance(info.value, FileNotFoundError)


def test_not_generated_and_no_generator_errors():
    with pytest.raises(
        DatasetNotFoundError,
        match=r"dtsweep data make hopper-random "
        r"--steps 100 --seed 0 --out \S+hopper-random_steps=100_seed=0.hdf5",
    ):
        resolve_dataset("hopper-random", steps=100, generate=False)
    with pytest.raises(DatasetNotFoundError, match="no offline generator for 'expert'"):
        resolve_dataset("hopper-expert")
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        resolve_dataset("/nonexistent/hopper.hdf5")
    with pytest.raises(DatasetNotFoundError, match="unknown env"):
        resolve_dataset("ant-random")


def test_minari_needs_the_package_or_converts():
    try:
        import minari  # noqa: F401
    except ImportError:
        with pytest.raises(DatasetNotFoundError, match="pip install minari"):
            resolve_dataset("minari:mujoco/hopper/medium-v0")
    # The conversion itself: Minari episodes carry T+1 observations for T steps.
    episodes = [
        types.SimpleNamespace(
            observations=np.arange(t + 1, dtype=np.float64)[:, None] * [1, 10],
            actions=np.ones((t, 1)),
            rewards=np.ones(t),
            terminations=np.eye(t, dtype=bool)[-1] if term else np.zeros(t, bool),
            truncations=np.zeros(t, bool) if term else np.eye(t, dtype=bool)[-1],
        )
        for t, term in ((3, True), (2, False))
    ]
    data = minari_to_d4rl(episodes)
    np.testing.assert_array_equal(data["observations"][:, 0], [0, 1, 2, 0, 1])
    np.testing.assert_array_equal(data["next_observations"][:, 0], [1, 2, 3, 1, 2])
    np.testing.assert_array_equal(data["terminals"], [0, 0, 1, 0, 0])
    np.testing.assert_array_equal(data["timeouts"], [0, 0, 0, 0, 1])


# --- trajectories and windows ---------------------------------------------------------------


def naive_episodes(terminals, timeouts):
    """Episodes as lists of row indices, by walking the rows one at a time."""
    episodes, current = [], []
    for i, (term, tout) in enumerate(zip(terminals, timeouts)):
        current.append(i)
        if term or tout:
            episodes.append(current)
            current = []
    if current:
        episodes.append(current)
    return episodes


def toy_dataset(seed=0, n=60, obs_dim=3, act_dim=2):
    """Random steps with terminals and timeouts at known places and a trailing partial episode."""
    rng = np.random.default_rng(seed)
    terminals = np.zeros(n, bool)
    timeouts = np.zeros(n, bool)
    terminals[[4, 5, 30]] = True  # includes a one-step episode (row 5)
    timeouts[[17, 44]] = True
    return {
        "observations": rng.normal(size=(n, obs_dim)).astype(np.float32) * 3 + 1,
        "actions": rng.uniform(-1, 1, size=(n, act_dim)).astype(np.float32),
        "rewards": rng.normal(size=n).astype(np.float32),
        "terminals": terminals,
        "timeouts": timeouts,
    }


def test_split_at_terminals_and_timeouts_keeps_trailing_episode():
    data = toy_dataset()
    traj = split_trajectories(data, max_ep_len=10)
    np.testing.assert_array_equal(traj.episode_starts, [0, 5, 6, 18, 31, 45])
    np.testing.assert_array_equal(traj.episode_lengths, [5, 1, 12, 13, 14, 15])
    assert traj.episode_starts.dtype == traj.episode_lengths.dtype == np.int64
    episodes = naive_episodes(data["terminals"], data["timeouts"])
    for e, rows in enumerate(episodes):
        np.testing.assert_array_equal(traj.timesteps[rows], np.minimum(np.arange(len(rows)), 9))
        np.testing.assert_allclose(traj.episode_returns[e], data["rewards"][rows].sum(), rtol=1e-5)
    np.testing.assert_allclose(traj.state_mean, data["observations"].mean(0), rtol=1e-5)
    np.testing.assert_allclose(traj.state_std, data["observations"].std(0) + 1e-6, rtol=1e-5)


def test_returns_to_go_matches_plain_loop():
    data = toy_dataset(seed=1, n=200)
    data["rewards"] = data["rewards"] * 100  # hopper-sized returns
    traj = split_trajectories(data)
    expected = np.zeros(200)
    for rows in naive_episodes(data["terminals"], data["timeouts"]):
        running = 0.0
        for i in reversed(rows):
            running += float(data["rewards"][i])
            expected[i] = running
    got = returns_to_go(data["rewards"], traj.episode_starts, traj.episode_lengths)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-3)
    np.testing.assert_array_equal(traj.rtg, got)


def naive_window(data, start, k, mean, std, rtg_scale, max_ep_len):
    """One window the way the reference DT's get_batch builds it, one sample at a time."""
    rows = next(r for r in naive_episodes(data["terminals"], data["timeouts"]) if start in r)
    si = rows.index(start)
    ep_rows = rows[si : si + k]
    tlen = len(ep_rows)
    rewards = data["rewards"][rows[si:]].astype(np.float64)
    rtg = np.array([rewards[j:].sum() for j in range(tlen)])
    states = (data["observations"][ep_rows] - mean) / std
    pad = k - tlen
    return {
        "states": np.concatenate([np.zeros((pad, states.shape[1])), states]),
        "actions": np.concatenate([np.full((pad, data["actions"].shape[1]), -10.0), data["actions"][ep_rows]]),
        "returns_to_go": np.concatenate([np.zeros(pad), rtg / rtg_scale])[:, None],
        "timesteps": np.concatenate([np.zeros(pad), np.minimum(np.arange(si, si + tlen), max_ep_len - 1)]),
        "attention_mask": np.concatenate([np.zeros(pad), np.ones(tlen)]),
    }


@pytest.mark.parametrize("k", [1, 7, 20])
def test_window_batch_matches_naive_loop(k):
    data = toy_dataset(seed=2)
    traj = split_trajectories(data, max_ep_len=10)
    sampler = WindowSampler(traj, k, batch_size=64, seed=0, rtg_scale=10.0)
    starts = np.concatenate([sampler.sample_indices(), [0, 4, 5, 17, 59]])  # edges included
    batch = sampler.batch(starts)
    expected_dtypes = {"timesteps": torch.int64}
    for key, tensor in batch.items():
        assert tensor.dtype == expected_dtypes.get(key, torch.float32), key
    for b, start in enumerate(starts):
        want = naive_window(data, int(start), k, traj.state_mean, traj.state_std, 10.0, 10)
        for key, value in want.items():
            np.testing.assert_allclose(batch[key][b].numpy(), value, rtol=1e-5, atol=1e-6, err_msg=f"{key} start={start}")


def test_padding_values_on_the_left():
    data = toy_dataset(seed=3)
    traj = split_trajectories(data)
    batch = window_batch(traj, np.array([5, 16]), context_len=4)
    # Row 5 is a one-step episode: three pads then the step. Row 16 has two steps left.
    np.testing.assert_array_equal(batch["attention_mask"], [[0, 0, 0, 1], [0, 0, 1, 1]])
    assert (batch["states"][0, :3] == 0).all() and (batch["actions"][0, :3] == -10).all()
    assert (batch["returns_to_go"][0, :3] == 0).all() and (batch["timesteps"][0, :3] == 0).all()
    assert batch["timesteps"][0, 3] == 0 and batch["timesteps"][1, 2:].tolist() == [10, 11]
    assert batch["returns_to_go"].shape == (2, 4, 1)
    rtg = batch["returns_to_go"][0, 3, 0]
    np.testing.assert_allclose(rtg, data["rewards"][5] / 1000, rtol=1e-5)


def test_sampler_is_seeded_and_uniform_over_steps():
    traj = split_trajectories(toy_dataset(seed=4))
    a = WindowSampler(traj, 5, batch_size=32, seed=7)
    b = WindowSampler(traj, 5, batch_size=32, seed=7)
    c = WindowSampler(traj, 5, batch_size=32, seed=8)
    for _ in range(3):
        x, y, z = a.sample(), b.sample(), c.sample()
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert not torch.equal(x["states"], z["states"])
    # fixed_batch depends on its seed only, and leaves the training sequence alone.
    fixed = a.fixed_batch(16, seed=123)
    assert torch.equal(fixed["states"], c.fixed_batch(16, seed=123)["states"])
    assert torch.equal(a.sample()["states"], b.sample()["states"])
    # Starts are uniform over steps (so episodes are drawn in proportion to their length).
    counts = np.bincount(a.sample_indices(60_000), minlength=traj.num_steps)
    assert counts.min() > 700 and counts.max() < 1300

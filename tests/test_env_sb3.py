"""Plain stable-baselines3 on the registered environment: `PPO("MlpPolicy", make_vec_env("hedgerl/Hedging-v0"))` with
SB3's defaults learns to hedge better than not hedging (issue 13: on the raw design it ended worse than no hedge)."""
import math

import gymnasium
import numpy as np
import pytest

import hedgerl  # noqa: F401  (registers the environments)

N_EVAL, EVAL_SEED = 2000, 2026


def episode_returns(policy, n_paths: int = N_EVAL, seed: int = EVAL_SEED, **kwargs) -> np.ndarray:
    """The return of one episode on each of `n_paths` paths (the batched env's shared stream, batch 0 of `seed`) under
`policy(obs) -> actions`, with hedgerl/Hedging-v0's reward; `kwargs` override its arguments (the same paths either
way)."""
    env = gymnasium.make_vec("hedgerl/Hedging-v0", num_envs=n_paths, seeding="shared", **kwargs)
    obs, _ = env.reset(seed=seed)
    total, done = np.zeros(n_paths), np.zeros(n_paths, bool)
    while not done.all():
        obs, r, term, trunc, _ = env.step(policy(obs))
        total += r
        done = term | trunc
    return total


def test_the_same_paths_and_reward_for_every_action_design():
    """No hedge (holdings 0, action='holdings') and the delta hedge (action 0, action='delta') on the same paths: the
    delta hedge's return is the higher, far beyond the paired standard error."""
    no_hedge = episode_returns(lambda obs: np.zeros((len(obs), 1), np.float32), n_paths=500, action="holdings")
    delta = episode_returns(lambda obs: np.zeros((len(obs), 1), np.float32), n_paths=500)
    diff = delta - no_hedge
    assert diff.mean() > 5 * diff.std() / math.sqrt(len(diff)), (delta.mean(), no_hedge.mean())


@pytest.mark.slow
def test_default_ppo_beats_no_hedge():
    """SB3's PPO, default hyperparameters, seed 0, 20,480 steps (2.5 rollouts of 4 x 2048) on make_vec_env's 4 copies of
the registered environment; evaluated deterministically on 2,000 fresh paths against no hedge on the same paths. The
margin: the mean paired difference must exceed 3 standard errors of itself. (About a minute on one core.)"""
    torch = pytest.importorskip("torch")
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env
    torch.set_num_threads(1)
    model = PPO("MlpPolicy", make_vec_env("hedgerl/Hedging-v0", n_envs=4, seed=0), seed=0, device="cpu")
    model.learn(20_000)
    ppo = episode_returns(lambda obs: model.predict(obs, deterministic=True)[0])
    no_hedge = episode_returns(lambda obs: np.zeros((len(obs), 1), np.float32), action="holdings")
    diff = ppo - no_hedge
    se = diff.std() / math.sqrt(len(diff))
    assert diff.mean() > 3 * se, f"PPO {ppo.mean():.3f} vs no hedge {no_hedge.mean():.3f} (paired SE {se:.3f})"

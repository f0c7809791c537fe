"""Reinforcement-learning task families (bandits, 2-D navigation, any gymnasium environment) and the
classical bandit policies they are measured against. See :mod:`fewshot.rl.envs` and
:mod:`fewshot.rl.bandits`."""
from .bandits import POLICIES, bayes_optimal_2arm, compare, gittins_table, make_policy, run_policy
from .envs import (BernoulliBandit, GymnasiumSource, Navigation2D, TaskSource, Trajectories, make_source,
                   rollout)

__all__ = ["BernoulliBandit", "GymnasiumSource", "Navigation2D", "POLICIES", "TaskSource", "Trajectories",
           "bayes_optimal_2arm", "compare", "gittins_table", "make_policy", "make_source", "rollout",
           "run_policy"]

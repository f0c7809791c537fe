"""Meta-imitation on 2-D reaching: expert demonstrations, closed-loop success, MIL against its baselines."""
import pytest
import torch

from fewshot import methods, tasks
from fewshot.evaluate import evaluate
from fewshot.rl.envs import Reach2D, rollout


def test_demonstrations_are_expert_and_differ_per_demo():
    env = Reach2D()
    g = torch.Generator().manual_seed(0)
    t = env.sample_tasks(200, g)
    obs, act = env.demonstrations(t, 3, g)
    goal = env.goal(t)
    assert torch.allclose(obs[:, :, -1, :2], goal.unsqueeze(1).expand(-1, 3, -1), atol=1e-6)
    assert act.abs().max() <= env.max_speed + 1e-6
    # the same targets, listed in other orders, from other starts
    assert not torch.equal(obs[:, 0, 0], obs[:, 1, 0])
    sets = obs[:, :, 0, 2:].reshape(200, 3, env.targets, 2)
    s0 = sets[:, 0].sort(1).values
    assert torch.allclose(sets[:, 1].sort(1).values, s0) and torch.allclose(sets[:, 2].sort(1).values, s0)
    # targets are at least `separation` apart (where the rejection sampling found a set)
    d = (t["targets"].unsqueeze(1) - t["targets"].unsqueeze(2)).norm(dim=-1) + torch.eye(env.targets) * 9
    assert (d.flatten(1).min(1).values >= env.separation).float().mean() > 0.99


class _Follow:
    """A 'method' that goes where the demonstration ended: the closed-loop score must call it a success."""
    training = False

    def eval(self):
        return self

    def train(self, mode=True):
        return self

    def predict(self, sx, sy, qx, ways=None):
        end = sx[:, -1:, :2] + sy[:, -1:]
        return (end - qx[..., :2]).clamp(-0.1, 0.1)


def test_closed_loop_success_of_a_demo_follower_and_of_a_wrong_target():
    fam = tasks.make("reach", shots=1, queries=1, seed=5)
    res = evaluate(_Follow(), fam, 50, progress=False)
    assert res.metric == "success" and res.mean == 100.0 and res.higher_is_better
    ep = fam.sample(4)
    wrong = {k[5:]: v for k, v in ep.extra.items() if k.startswith("task:")}
    env = fam.env
    other = wrong["targets"][torch.arange(4), (wrong["index"] + 1) % env.targets]
    traj = rollout(env, wrong, lambda obs, t: (other.unsqueeze(1) - obs[..., :2]).clamp(-0.1, 0.1), 1, fam.generator)
    assert env.success(wrong, traj).sum() == 0


def _train(name, steps, **opts):
    fam = tasks.make("reach", shots=1, queries=1, batch=10, seed=0)
    torch.manual_seed(0)
    m = methods.build(name, fam.in_shape, outputs=fam.outputs, **opts)
    opt = torch.optim.Adam(m.parameters(), 2e-3)
    for _ in range(steps):
        loss, _ = m.loss(fam.sample())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return evaluate(m, tasks.make("reach", shots=1, queries=1, seed=2_000_003), 100, progress=False)


def test_mil_imitates_one_demonstration_where_plain_cloning_cannot():
    mlp = dict(backbone="mlp", mlp_hidden=[32, 32], bn="none", loss="bc")
    mil = _train("maml", 400, inner_lr=0.1, **mlp)          # (measured: 84 % success)
    bc = _train("maml", 400, inner_steps=0, **mlp)          # behaviour cloning of all demonstrations
    ctx = _train("contextual", 400, hidden=[32, 32], context=32, loss="bc")   # (61 %)
    assert bc.mean < 10                                     # it cannot know which target is meant
    assert mil.mean > bc.mean + 30 and ctx.mean > bc.mean + 30, (mil, bc, ctx)


@pytest.mark.parametrize("spec", ["reach:targets=0", "reach:horizon=5", "reach:speed=1"])
def test_bad_reach_specs(spec):
    from fewshot.errors import FewshotError
    with pytest.raises(FewshotError):
        tasks.make(spec, 1, 1)

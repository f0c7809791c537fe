"""The trust-region outer step of MAML-RL (fewshot.rl.trpo): the KL and Fisher pieces against autograd and
torch.distributions, the Fisher-vector product against the exact Hessian of the meta-objective's KL, the
step's trust region, and training/resume through the ordinary trainer."""
import pytest
import torch
from torch.autograd.functional import hessian
from torch.func import vmap

from fewshot import methods, tasks
from fewshot.errors import FewshotError
from fewshot.rl import meta as rlm
from fewshot.rl.pg import fisher_product, policy_kl
from fewshot.rl.trpo import MetaTrustRegion, conjugate_gradient
from fewshot.run import fit
from test_rl_meta import _cfg, _weights


def test_policy_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(7, 6, generator=g) * 0.7, torch.randn(7, 6, generator=g) * 0.7   # log std inside its clamp
    N = torch.distributions.Normal
    want = torch.distributions.kl_divergence(N(a[:, :3], a[:, 3:].exp()), N(b[:, :3], b[:, 3:].exp())).sum(-1)
    assert torch.allclose(policy_kl(a, b, False), want, atol=1e-5)
    C = torch.distributions.Categorical
    want = torch.distributions.kl_divergence(C(logits=a), C(logits=b))
    assert torch.allclose(policy_kl(a, b, True), want, atol=1e-5)


@pytest.mark.parametrize("discrete", [False, True])
def test_fisher_product_is_the_hessian_of_the_kl(discrete):
    g = torch.Generator().manual_seed(1)
    old = torch.randn(6, dtype=torch.float64, generator=g)
    old[4] = -7.0 if not discrete else old[4]           # a clamped log standard deviation: no curvature
    H = hessian(lambda new: policy_kl(old, new, discrete).double(), old.clone())
    t = torch.randn(6, dtype=torch.float64, generator=g)
    assert torch.allclose(fisher_product(old, t, discrete).double(), H @ t, atol=1e-4)


def test_conjugate_gradient_solves_a_positive_definite_system():
    g = torch.Generator().manual_seed(2)
    M = torch.randn(8, 8, generator=g, dtype=torch.float64)
    A = M @ M.T + 0.5 * torch.eye(8, dtype=torch.float64)
    b = torch.randn(8, generator=g, dtype=torch.float64)
    assert torch.allclose(conjugate_gradient(lambda v: A @ v, b, iters=8), torch.linalg.solve(A, b), atol=1e-6)


def _rolled(method_name, **options):
    fam = tasks.make("navigation2d:horizon=5", shots=3, queries=3, batch=2, seed=4)
    torch.manual_seed(0)
    m = methods.build(method_name, fam.in_shape, outputs=fam.outputs, backbone="mlp", mlp_hidden=[6], bn="none",
                      inner_lr=0.1, **options)
    return m, rlm.rollout_episode(m, fam.sample())


def _keys(m):
    return [k for k in m.meta_params()]


def _exact_kl_hvp(tr, theta_of, v):
    """Hessian-vector product of the mean KL (all query samples) at the current meta-parameters, with the
    adapted parameters given as a differentiable function ``theta_of(flat) -> per-task params``."""
    x = tr.flat.flat(tr.theta).double().requires_grad_(True)

    def kl(flat):
        out = tr._fwd(theta_of(flat.float()), tr.ep.query_x)
        return ((tr.w * policy_kl(tr.old_out, out, tr.discrete)).sum(1) / tr.wsum).mean()
    gk = torch.autograd.grad(kl(x), x, create_graph=True)[0]
    return torch.autograd.grad(gk @ v.double(), x)[0].float()


def test_fisher_vector_product_without_adaptation_is_the_exact_kl_hessian():
    m, ep = _rolled("maml", inner_steps=0)
    tr = MetaTrustRegion(m, ep, _keys(m), damping=0.0, fisher_stride=1, exact=False)
    v = torch.randn(tr.flat.flat(tr.theta).numel(), generator=torch.Generator().manual_seed(3))
    B = ep.query_x.shape[0]
    exact = _exact_kl_hvp(tr, lambda f: {k: t.expand(B, *t.shape) for k, t in tr.flat.unflat(f).items()}, v)
    assert torch.allclose(tr.fvp(v), exact, rtol=1e-3, atol=1e-6)


def test_fisher_vector_product_pulls_back_through_the_linearised_meta_sgd_step():
    """theta'_i = theta + (alpha / alpha_0) * (theta'_i,0 - theta_0): the Fisher pulled back through that
    map (weights and step sizes) is what fvp computes."""
    m, ep = _rolled("metasgd")
    tr = MetaTrustRegion(m, ep, _keys(m), damping=0.0, fisher_stride=1, exact=False)
    theta0, old = tr.theta, tr.old_params

    def theta_of(f):
        d = tr.flat.unflat(f)
        out = {}
        for n in old:
            lr_key = "lr:" + n.replace(".", "__")
            out[n] = d[n] + (d[lr_key] / theta0[lr_key]) * (old[n] - theta0[n])
        return out
    v = torch.randn(tr.flat.flat(theta0).numel(), generator=torch.Generator().manual_seed(4))
    assert torch.allclose(tr.fvp(v), _exact_kl_hvp(tr, theta_of, v), rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("name", ["maml", "metasgd"])
def test_exact_fisher_vector_product_is_the_kl_hessian_through_the_inner_step(name):
    m, ep = _rolled(name)
    tr = MetaTrustRegion(m, ep, _keys(m), damping=0.0, fisher_stride=1, exact=True)
    sx, sy = ep.support_x[:, None], ep.support_y[:, None]

    def theta_of(f):
        th = {**tr.theta_all, **tr.flat.unflat(f)}

        def one(x, y):
            full, _ = m.inner_loop(th, x, y, 1, m.config.inner_lr, False, kind="pg", per_step=True)
            return {k: v for k, v in full.items() if not k.startswith("lr:")}
        return vmap(one)(sx, sy)
    v = torch.randn(tr.flat.flat(tr.theta).numel(), generator=torch.Generator().manual_seed(5))
    exact = _exact_kl_hvp(tr, theta_of, v)
    assert torch.allclose(tr.fvp(v), exact, rtol=1e-3, atol=1e-5)
    approx = MetaTrustRegion(m, ep, _keys(m), damping=0.0, fisher_stride=1, exact=False).fvp(v)
    assert not torch.allclose(approx, exact, rtol=1e-3, atol=1e-5)       # the inner Hessian matters


@pytest.mark.parametrize("name,exact", [("maml", True), ("metasgd", True), ("maml", False)])
def test_the_step_keeps_the_trust_region_and_lowers_the_objective(name, exact):
    m, ep = _rolled(name)
    grads, losses, _ = m.task_gradients(ep)
    g = {k: v.mean(0) for k, v in grads.items()}
    tr = MetaTrustRegion(m, ep, list(g), exact=exact)
    step, info = tr.step(g, max_kl=0.01)
    assert info["ls"] < 15 and 0 < info["kl"] <= 0.01
    flat = tr.flat.flat(tr.theta)
    loss, kl = tr.objective(flat + tr.flat.flat(step))
    loss0, kl0 = tr.objective(flat)
    assert kl0 < 1e-6 and loss < loss0 and kl == pytest.approx(info["kl"])


def test_trpo_outer_step_trains_and_resumes_exactly(tmp_path):
    opts = {"outer": "trpo", "max_kl": 0.02}
    full = fit(_cfg(episodes=3, **opts), tmp_path / "full", progress=False)
    assert isinstance(full.method.outer_optimizer(list(full.method.parameters())), torch.optim.SGD)
    rows = (tmp_path / "full" / "metrics.jsonl").read_text()
    assert '"kl"' in rows and '"ls"' in rows
    part = fit(_cfg(episodes=1, **opts), tmp_path / "part", progress=False)
    resumed = fit(_cfg(episodes=3, **opts), tmp_path / "part", resume=True, progress=False)
    a, b = _weights(full), _weights(resumed)
    assert part.train_result.steps == 1 and all(torch.equal(a[k], b[k]) for k in a)
    one = _weights(part)
    assert any(not torch.equal(a[k], one[k]) for k in a)            # the later steps moved it


def test_bad_outer_settings():
    fam = tasks.make("navigation2d:horizon=5", shots=2, queries=2, batch=2)
    for bad in ({"outer": "ppo"}, {"outer": "trpo", "max_kl": 0.0}):
        with pytest.raises(FewshotError, match="outer"):
            methods.build("maml", fam.in_shape, outputs=fam.outputs, backbone="mlp", bn="none", **bad)
    sine = tasks.make("sine", shots=2, queries=2, batch=2)
    m = methods.build("maml", sine.in_shape, outputs=sine.outputs, backbone="mlp", bn="none", outer="trpo")
    with pytest.raises(FewshotError, match="RL task families"):
        m.loss(sine.sample())

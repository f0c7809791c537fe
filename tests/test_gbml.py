"""Gradient-based meta-learning (fewshot.methods.gbml): the second-order MAML meta-gradient against finite
differences, which parameters each variant adapts, Meta-SGD step sizes, Reptile's outer step, gradient
agreement and TAML inequality measures against hand computations, vmap against a plain loop, the batch-norm
modes, and predict's shapes and errors. Tiny models only: the whole file runs in seconds on one thread."""
from __future__ import annotations

import copy
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from fewshot.episodes import Episode
from fewshot.errors import FewshotError
from fewshot.methods import build
from fewshot.methods.gbml import agreement_weights, inequality

IMG = (1, 16, 16)       # the smallest images conv4 accepts (four 2x2 poolings)


# ----------------------------------------------------------------------------------------------- helpers
def regression_episode(batch=1, shots=5, queries=6, seed=0, dtype=torch.float64) -> Episode:
    """Sine-wave regression tasks on 1-D inputs: targets ``[B, M, 1]``."""
    g = torch.Generator().manual_seed(seed)
    amp = 0.5 + torch.rand(batch, 1, 1, generator=g, dtype=dtype)
    phase = 3 * torch.rand(batch, 1, 1, generator=g, dtype=dtype)
    sx = 4 * torch.rand(batch, shots, 1, generator=g, dtype=dtype) - 2
    qx = 4 * torch.rand(batch, queries, 1, generator=g, dtype=dtype) - 2
    return Episode(sx, amp * torch.sin(sx + phase), qx, amp * torch.sin(qx + phase), 1, shots, queries)


def image_episode(batch=2, ways=3, shots=1, queries=2, seed=0, shape=IMG) -> Episode:
    """Random images with labels ordered class by class, as the sampler makes them."""
    g = torch.Generator().manual_seed(seed)
    sx = torch.rand(batch, ways * shots, *shape, generator=g)
    qx = torch.rand(batch, ways * queries, *shape, generator=g)
    sy = torch.arange(ways).repeat_interleave(shots).expand(batch, -1)
    qy = torch.arange(ways).repeat_interleave(queries).expand(batch, -1)
    return Episode(sx, sy, qx, qy, ways, shots, queries)


def make(name, in_shape=IMG, seed=0, **options):
    """``build`` with a fixed seed, so two calls with the same arguments give the same initial weights."""
    torch.manual_seed(seed)
    return build(name, in_shape, **options)


def grads_of(method) -> dict:
    return {n: p.grad.detach().clone() for n, p in method.named_parameters() if p.grad is not None}


# ----------------------------------------------------------------------------------------------- 1. MAML
STEPS, ALPHA = 2, 0.3
MLP = dict(outputs=1, mlp_hidden=[8], bn="none", activation="tanh", inner_steps=STEPS, inner_lr=ALPHA)


def mlp(q: dict, x: torch.Tensor) -> torch.Tensor:
    """The one-hidden-layer tanh MLP, written out by hand."""
    return torch.tanh(x @ q["layers.0.weight"].T + q["layers.0.bias"]) @ q["head.weight"].T + q["head.bias"]


def reference_query_loss(p: dict, sx, sy, qx, qy):
    """``STEPS`` SGD steps of size ``ALPHA`` on the support MSE, then the query MSE: ``(loss, adapted)``."""
    fast = dict(p)
    for _ in range(STEPS):
        leaves = {k: v.detach().requires_grad_(True) for k, v in fast.items()}
        with torch.enable_grad():
            g = torch.autograd.grad(F.mse_loss(mlp(leaves, sx), sy), list(leaves.values()))
        fast = {k: fast[k] - ALPHA * gk for (k, gk) in zip(leaves, g)}
    return F.mse_loss(mlp(fast, qx), qy), fast


def test_maml_second_order_gradient_matches_finite_differences() -> None:
    """MAML's meta-gradient (2 inner steps, tanh MLP) equals central differences of the post-adaptation
    query loss, in float64, for entries of every parameter tensor; first-order MAML's does not."""
    ep = regression_episode()
    maml = make("maml", (1,), **MLP).double()
    loss, metrics = maml.loss(ep)
    loss.backward()
    got = {n: p.grad.clone() for n, p in maml.net.named_parameters()}

    base = {n: p.detach().clone() for n, p in maml.net.named_parameters()}
    args = (ep.support_x[0], ep.support_y[0], ep.query_x[0], ep.query_y[0])
    ref_loss, adapted = reference_query_loss(base, *args)
    assert metrics["query_loss"] == pytest.approx(float(ref_loss), rel=1e-6)

    eps = 1e-6
    picks = [("layers.0.weight", (3, 0)), ("layers.0.weight", (6, 0)), ("layers.0.bias", (1,)),
             ("head.weight", (0, 2)), ("head.weight", (0, 7)), ("head.bias", (0,))]
    fd, mine = [], []
    for name, idx in picks:
        plus = {k: v.clone() for k, v in base.items()}
        minus = {k: v.clone() for k, v in base.items()}
        plus[name][idx] += eps
        minus[name][idx] -= eps
        fd.append((reference_query_loss(plus, *args)[0] - reference_query_loss(minus, *args)[0]) / (2 * eps))
        mine.append(got[name][idx])
    fd, mine = torch.stack(fd), torch.stack(mine)
    assert fd.abs().min() > 1e-3                       # the entries carry real signal
    torch.testing.assert_close(mine, fd, rtol=1e-5, atol=1e-7)

    # first-order MAML: same initial weights; its gradient is the query gradient at the adapted weights
    fo = make("maml", (1,), first_order=True, **MLP).double()
    fo.load_state_dict(maml.state_dict())
    fo.loss(ep)[0].backward()
    fo_grad = torch.stack([fo.net.get_parameter(name).grad[idx] for name, idx in picks])
    leaves = {k: v.detach().requires_grad_(True) for k, v in adapted.items()}
    q_loss = F.mse_loss(mlp(leaves, ep.query_x[0]), ep.query_y[0])
    q_grad = dict(zip(leaves, torch.autograd.grad(q_loss, list(leaves.values()))))
    torch.testing.assert_close(fo_grad, torch.stack([q_grad[name][idx] for name, idx in picks]),
                               rtol=1e-5, atol=1e-7)
    # ... and measurably not the true meta-gradient
    assert (fo_grad - fd).abs().max() > 1e-2 * fd.abs().max()



@pytest.mark.parametrize("bn", ["transductive", "running"])
def test_second_order_support_batch_norm_gives_the_fused_kernels_meta_gradient(bn, monkeypatch) -> None:
    """Second-order support passes normalise with ``batch_norm_twice``; a conv-4 MAML meta-gradient (2 inner
    steps, float64) is the one the fused batch-norm kernel gives everywhere, to 1e-9."""
    import fewshot.models.meta as meta
    ep = image_episode(batch=2, seed=4)
    runs = []
    for fused in (False, True):
        if fused:
            monkeypatch.setattr(meta, "batch_norm_twice",
                                lambda x, w, b, eps: F.batch_norm(x, None, None, w, b, True, 0.0, eps))
        m = make("maml", IMG, outputs=3, hidden=4, bn=bn, inner_steps=2, inner_lr=0.3, vectorize="loop").double()
        loss, _ = m.loss(Episode(ep.support_x.double(), ep.support_y, ep.query_x.double(), ep.query_y,
                                 ep.ways, ep.shots, ep.queries))
        loss.backward()
        runs.append((loss.item(), grads_of(m)))
    (l0, g0), (l1, g1) = runs
    assert l0 == pytest.approx(l1, rel=1e-12)
    assert g0.keys() == g1.keys()
    for n in g0:
        torch.testing.assert_close(g0[n], g1[n], rtol=1e-9, atol=1e-12)

def test_float64_model_keeps_float64_loss() -> None:
    """A float64 model's task objective is float64 and its meta-gradient matches finite differences to 1e-8."""
    ep = regression_episode()
    maml = make("maml", (1,), **MLP).double()
    params = maml.meta_params()
    args = (ep.support_x[0], ep.support_y[0], ep.query_x[0], ep.query_y[0])
    value, _ = maml.task_objective(params, *args)
    assert value.dtype == torch.float64
    maml.loss(ep)[0].backward()
    base = {n: p.detach().clone() for n, p in maml.net.named_parameters()}
    eps = 1e-6
    plus = {k: v.clone() for k, v in base.items()}
    minus = {k: v.clone() for k, v in base.items()}
    plus["head.bias"][0] += eps
    minus["head.bias"][0] -= eps
    fd = (reference_query_loss(plus, *args)[0] - reference_query_loss(minus, *args)[0]) / (2 * eps)
    assert float(maml.net.head.bias.grad[0]) == pytest.approx(float(fd), rel=1e-8)


# ----------------------------------------------------------------------------------------------- 2. ANIL / BOIL
@pytest.mark.parametrize("name, expect_head", [("anil", True), ("boil", False), ("maml", None)])
def test_inner_loop_adapts_only_the_expected_parameters(name: str, expect_head) -> None:
    """ANIL's inner loop moves only ``head.*``, BOIL's only the body, MAML's everything."""
    m = make(name, IMG, outputs=3, hidden=4, inner_steps=2, inner_lr=0.5)
    ep = image_episode(batch=1)
    params = m.meta_params()
    full, _ = m.inner_loop(params, ep.support_x[0], ep.support_y[0], 2, 0.5, first_order=True)
    assert set(full) == set(params)
    changed = {k for k in params if not torch.equal(full[k], params[k])}
    head = {k for k in params if k.startswith("head.")}
    if expect_head is True:
        assert changed == head == {"head.weight", "head.bias"}
    elif expect_head is False:
        assert changed == set(params) - head
        assert any(k.startswith("convs.") for k in changed) and any(k.startswith("norms.") for k in changed)
    else:
        assert changed == set(params)
    assert set(m.adapt_keys) == changed


# ----------------------------------------------------------------------------------------------- 3. Meta-SGD
def test_metasgd_step_sizes_get_gradients_and_move() -> None:
    """Every learned step-size tensor receives a non-zero meta-gradient, and one optimiser step moves it.
    (No batch norm: a conv bias followed by batch norm has no effect, so its step size would get none.)"""
    m = make("metasgd", IMG, outputs=3, hidden=4, bn="none", inner_steps=1, inner_lr=0.1)
    keys = {n.replace(".", "__") for n, _ in m.net.named_parameters()}
    assert set(m.lrs.keys()) == keys
    before = {k: v.detach().clone() for k, v in m.lrs.items()}
    assert all(torch.all(v == 0.1) for v in before.values())
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    opt.zero_grad()
    m.loss(image_episode(batch=2))[0].backward()
    for k, p in m.lrs.items():
        assert p.grad is not None and p.grad.shape == p.shape, k
        assert p.grad.abs().max() > 1e-6, k
    opt.step()
    for k, p in m.lrs.items():
        assert not torch.equal(p.detach(), before[k]), k
        torch.testing.assert_close(p.detach(), before[k] - 0.05 * p.grad)


# ----------------------------------------------------------------------------------------------- 4. Reptile
def test_reptile_outer_step_is_one_inner_sgd_step() -> None:
    """Batch of one task, inner SGD x 1, outer SGD(lr=1) on the surrogate: the new weights are one SGD step
    of size ``inner_lr`` on the task's support and query examples together."""
    lr = 0.25
    m = make("reptile", IMG, outputs=3, hidden=4, inner_rule="sgd", inner_steps=1, inner_lr=lr)
    ep = image_episode(batch=1, shots=2, queries=1)

    ref = copy.deepcopy(m.net)
    x = torch.cat([ep.support_x[0], ep.query_x[0]])
    y = torch.cat([ep.support_y[0], ep.query_y[0]])
    ref_opt = torch.optim.SGD(ref.parameters(), lr=lr)
    F.cross_entropy(ref(x)[0], y).backward()
    ref_opt.step()

    before = {n: p.detach().clone() for n, p in m.net.named_parameters()}
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    loss, _ = m.loss(ep)
    loss.backward()
    opt.step()
    for (n, p), (_, q) in zip(m.net.named_parameters(), ref.named_parameters()):
        if not (n.startswith("convs.") and n.endswith(".bias")):    # a bias before batch norm has no gradient
            assert not torch.equal(p.detach(), before[n]), n
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-6, msg=n)


# ----------------------------------------------------------------------------------------------- 5. agreement
def test_agreement_weights_by_hand() -> None:
    """w_i = sum_j g_i.g_j / sum_k |sum_j g_k.g_j|, worked out for three 2-D gradients."""
    g = torch.tensor([[1., 0.], [0., 1.], [-3., 0.]])
    # Gram rows: g1: [1, 0, -3] -> -2;  g2: [0, 1, 0] -> 1;  g3: [-3, 0, 9] -> 6;  sum |.| = 9
    torch.testing.assert_close(agreement_weights(g), torch.tensor([-2 / 9, 1 / 9, 6 / 9]))
    # g1 = [1, 1], g2 = [1, 0], g3 = [0, 2]: rows [2, 1, 2] -> 5, [1, 1, 0] -> 2, [2, 0, 4] -> 6; sum 13
    g = torch.tensor([[1., 1.], [1., 0.], [0., 2.]])
    torch.testing.assert_close(agreement_weights(g), torch.tensor([5 / 13, 2 / 13, 6 / 13]))
    # opposite gradients: every row sums to 0 -> uniform weights
    torch.testing.assert_close(agreement_weights(torch.tensor([[1., 2.], [-1., -2.]])), torch.tensor([0.5, 0.5]))


def test_maml_agreement_meta_gradient_is_weighted_sum() -> None:
    """combine="agreement" puts sum_i w_i g_i (weights from the flattened per-task gradients) into p.grad."""
    m = make("maml", IMG, outputs=3, hidden=4, combine="agreement")
    ep = image_episode(batch=3)
    grads, losses, _ = m.task_gradients(ep)
    names = list(grads)
    flat = torch.cat([grads[n].flatten(1) for n in names], 1).double()
    gram = flat @ flat.T
    w = gram.sum(1) / gram.sum(1).abs().sum()
    assert not torch.allclose(w, torch.full_like(w, 1 / 3), atol=1e-3)   # the weights matter here

    loss, metrics = m.loss(ep)
    loss.backward()
    assert metrics["agree_min"] == pytest.approx(float(w.min()), rel=1e-5)
    assert loss.item() == pytest.approx(float(losses.mean()), rel=1e-6)
    params = dict(m.net.named_parameters())
    for n in names:
        expect = torch.tensordot(w, grads[n].double(), dims=1).float()
        torch.testing.assert_close(params[n].grad, expect, rtol=1e-4, atol=1e-6, msg=n)


# ----------------------------------------------------------------------------------------------- 6. TAML measures
def test_inequality_measures_by_hand() -> None:
    """Gini, Theil and variance of logarithms of [1, 2, 4]."""
    losses = torch.tensor([1.0, 2.0, 4.0])
    # Gini: ordered pairs |1-2|,|1-4|,|2-4| twice = 12; 2 M sum = 2 * 3 * 7 = 42
    assert float(inequality(losses, "gini")) == pytest.approx(12 / 42, rel=1e-6)
    # Theil: mean 7/3, ratios 3/7, 6/7, 12/7
    r = [3 / 7, 6 / 7, 12 / 7]
    assert float(inequality(losses, "theil")) == pytest.approx(sum(x * math.log(x) for x in r) / 3, rel=1e-6)
    # VoL: logs are ln2 * [0, 1, 2], mean ln2, deviations ln2 * [-1, 0, 1]
    assert float(inequality(losses, "vol")) == pytest.approx(2 / 3 * math.log(2) ** 2, rel=1e-6)
    # equal losses: no inequality
    for kind in ("gini", "theil", "vol"):
        assert float(inequality(torch.full((4,), 2.5), kind)) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(FewshotError, match="unknown inequality"):
        inequality(losses, "atkinson")


# ----------------------------------------------------------------------------------------------- 7. vmap vs loop
@pytest.mark.parametrize("name, options", [
    ("maml", {}),
    ("anil", {}),
    ("metasgd", {}),
    ("cavia", {"context": 4, "adapt": "none"}),
])
def test_vmap_and_loop_agree(name: str, options: dict) -> None:
    """Same seed and episode: vmap (whole batch and one task per chunk) and a plain loop give the same loss,
    metrics and meta-gradients."""
    ep = image_episode(batch=3, seed=1)
    results = []
    for vec, chunk in (("loop", 0), ("vmap", 0), ("vmap", 1)):
        m = make(name, IMG, outputs=3, hidden=4, inner_steps=2, inner_lr=0.3, vectorize=vec, chunk=chunk,
                 **options)
        loss, metrics = m.loss(ep)
        loss.backward()
        results.append((loss.item(), metrics, grads_of(m)))
    (l0, m0, g0) = results[0]
    assert set(g0) == {n for n, _ in make(name, IMG, outputs=3, hidden=4, **options).named_parameters()}
    if name == "cavia":
        assert any(g.abs().sum() > 0 for n, g in g0.items() if n.startswith("net.film."))
    for (l1, m1, g1) in results[1:]:
        assert l1 == pytest.approx(l0, rel=1e-5)
        assert m1["acc"] == pytest.approx(m0["acc"])
        assert set(g1) == set(g0)
        for n in g0:
            # a conv bias right before batch norm has a true gradient of 0: compare it only to rounding level
            atol = 1e-4 * max(float(g.abs().max()) for g in g0.values()) if ".bias" in n and "convs" in n else 1e-6
            torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=atol, msg=n)


def test_cavia_conv4_runs_in_float64() -> None:
    """CAVIA on conv4 converted to float64 trains on float64 images, as it does on the MLP backbone."""
    ep = image_episode(batch=2).to(dtype=torch.float64)
    m = make("cavia", IMG, outputs=3, hidden=4, context=4).double()
    loss, _ = m.loss(ep)
    loss.backward()
    assert m.net.film.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------- 8. batch norm
def test_running_bn_updates_buffers_only_in_training() -> None:
    """bn="running": loss() in train mode moves every step's running statistics; in eval mode it does not."""
    m = make("maml", IMG, outputs=3, hidden=4, bn="running", inner_steps=2)
    ep = image_episode(batch=2)
    norms = m.net.norm_layers()
    assert norms and norms[0].running_mean.shape == (3, 4)          # one row per inner step + the query pass
    before = [(n.running_mean.clone(), n.running_var.clone()) for n in norms]
    m.train()
    m.loss(ep)
    for n, (mean, var) in zip(norms, before):
        for step in range(3):
            assert not torch.equal(n.running_mean[step], mean[step]), step
            assert not torch.equal(n.running_var[step], var[step]), step
    # step 0 normalises the first conv's outputs on the support with the meta-weights: check the numbers
    z = torch.stack([m.net.convs[0](sx) for sx in ep.support_x]).transpose(1, 2).flatten(2)   # [B, C, S*H*W]
    torch.testing.assert_close(norms[0].running_mean[0], 0.1 * z.mean(-1).mean(0), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(norms[0].running_var[0], 0.9 + 0.1 * z.var(-1).mean(0), rtol=1e-4, atol=1e-6)
    after = [(n.running_mean.clone(), n.running_var.clone()) for n in norms]
    m.eval()
    m.loss(ep)
    for n, (mean, var) in zip(norms, after):
        assert torch.equal(n.running_mean, mean) and torch.equal(n.running_var, var)


@pytest.mark.parametrize("bn, inductive", [("running", True), ("transductive", False)])
def test_eval_predictions_inductive_or_transductive(bn: str, inductive: bool) -> None:
    """In eval mode a query's logits ignore the other queries with running statistics, not with
    transductive batch norm."""
    m = make("maml", IMG, outputs=3, hidden=4, bn=bn, inner_steps=1)
    ep = image_episode(batch=1, queries=2)
    if bn == "running":                       # give the running statistics something other than 0/1
        m.train()
        for s in range(3):
            m.loss(image_episode(batch=2, seed=10 + s))
    m.eval()
    other = ep.query_x.clone()
    other[:, 1:] = torch.rand_like(other[:, 1:]) * 3
    a = m.predict(ep.support_x, ep.support_y, ep.query_x)
    b = m.predict(ep.support_x, ep.support_y, other)
    if inductive:
        torch.testing.assert_close(a[:, 0], b[:, 0], rtol=0, atol=1e-6)
        alone = m.predict(ep.support_x, ep.support_y, ep.query_x[:, :1])
        torch.testing.assert_close(alone[:, 0], a[:, 0], rtol=0, atol=1e-5)
    else:
        assert (a[:, 0] - b[:, 0]).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------- 9. predict
def test_predict_shapes_and_too_many_ways() -> None:
    """predict gives logits [B, M, ways] (ways from the labels or given), raw outputs for regression, and a
    FewshotError when asked for more ways than the head has."""
    m = make("maml", IMG, outputs=5, hidden=4, inner_steps=1)
    ep = image_episode(batch=2, ways=3, queries=2)
    out = m.predict(ep.support_x, ep.support_y, ep.query_x)
    assert out.shape == (2, 6, 3) and out.dtype == torch.float32 and not out.requires_grad
    assert m.predict(ep.support_x, ep.support_y, ep.query_x, ways=5).shape == (2, 6, 5)
    with pytest.raises(FewshotError, match="5-way head"):
        m.predict(ep.support_x, ep.support_y, ep.query_x, ways=6)

    reg = make("maml", (1,), outputs=1, mlp_hidden=[4], bn="none")
    rep = regression_episode(batch=2, dtype=torch.float32)
    assert reg.predict(rep.support_x, rep.support_y, rep.query_x).shape == (2, 6, 1)


def test_worker_processes_give_the_loop_numbers_exactly() -> None:
    """Splitting the task batch over single-threaded worker processes (``workers``) reproduces the in-process
    loop bit for bit: meta-gradients, losses, running statistics and predictions."""
    ep = image_episode(batch=5, seed=2)
    results = []
    for workers in (1, 3):
        torch.manual_seed(0)
        m = make("metasgd", IMG, outputs=3, hidden=4, bn="running", vectorize="loop", workers=workers)
        loss, metrics = m.loss(ep)
        loss.backward()
        m.eval()
        pred = m.predict(ep.support_x, ep.support_y, ep.query_x)
        results.append((loss.item(), grads_of(m), pred, {k: v.clone() for k, v in m.state_dict().items()}))
    (l0, g0, p0, s0), (l1, g1, p1, s1) = results
    assert l0 == l1
    assert all(torch.equal(g0[n], g1[n]) for n in g0)
    assert torch.equal(p0, p1)
    assert all(torch.equal(s0[k], s1[k]) for k in s0)



def _train_trace(vectorize: str, channels_last: bool, workers: int, threads: int, steps: int = 3):
    """Losses and final weights of ``steps`` Adam steps of float64 second-order MAML on fixed episodes."""
    from fewshot.models import set_channels_last
    torch.manual_seed(0)
    m = build("maml", IMG, outputs=3, hidden=4, inner_steps=1, vectorize=vectorize, workers=workers).double()
    set_channels_last(m, channels_last)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        losses = []
        for s in range(steps):
            loss, _ = m.loss(image_episode(batch=4, seed=20 + s).to(dtype=torch.float64))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        torch.set_num_threads(before)
        if m.__dict__.get("_pool") is not None:
            m._pool.close()
    return losses, {k: v.detach().clone() for k, v in m.state_dict().items()}


def test_task_axis_and_layout_choices_agree_to_rounding() -> None:
    """What ``vectorize``, ``channels_last`` and ``workers`` leave unchanged, exactly: vmap runs with the
    channels-last layout (it used to crash), and in float64 vmap, the loop in either layout, one process on
    two threads and two single-threaded processes give the same losses and weights over three Adam steps to
    1e-9 (relative); they differ only by the summation order of kernels (layout, threads, batched
    convolutions), which fp32 or bf16 rounding then shows."""
    ref_losses, ref_state = _train_trace("loop", False, workers=1, threads=1)
    for vec, cl, workers, threads in [("loop", True, 1, 2), ("loop", True, 2, 2), ("vmap", False, 1, 1),
                                      ("vmap", True, 1, 2)]:
        losses, state = _train_trace(vec, cl, workers, threads)
        assert losses == pytest.approx(ref_losses, rel=1e-9, abs=0), (vec, cl, workers, threads)
        for k in ref_state:
            if k.startswith("net.convs.") and k.endswith(".bias"):
                # a conv bias right before batch norm has a true gradient of 0: Adam turns its rounding
                # noise into steps of size lr, which batch norm then cancels (the losses above agree)
                continue
            torch.testing.assert_close(state[k], ref_state[k], rtol=1e-9, atol=1e-12,
                                       msg=f"{k} {(vec, cl, workers, threads)}")
    # fp32 with channels-last under vmap runs too (the layout is the loop's business; vmap gets NCHW copies)
    torch.manual_seed(0)
    m = build("maml", IMG, outputs=3, hidden=4, vectorize="vmap")
    from fewshot.models import set_channels_last
    set_channels_last(m, True)
    loss, _ = m.loss(image_episode(batch=2))
    loss.backward()
    assert all(p.grad is not None for p in m.parameters())


ALLOC_PROBE = """
import resource, sys, torch
from fewshot.parallel import tune_allocator
applied = tune_allocator()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
keep = [torch.ones(1 << 20) for _ in range(8)]    # a live heap, as a training step has
def step():                 # four 24 MB temporaries alive together, then freed
    ts = [torch.ones(6 << 20) for _ in range(4)]
    return sum(float(t[0]) for t in ts)
for _ in range(3):
    step()
f0 = faults()
for _ in range(50):
    step()
print(applied, faults() - f0)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_tuned_allocator_reuses_freed_memory_without_page_faults() -> None:
    """After ``tune_allocator`` (called by the CPU task loop and its workers), 50 rounds of four 24 MB
    temporaries cost almost no page faults. (glibc's defaults keep at most 64 MB of free heap, so they usually
    hand the freed 96 MB back to the kernel each round and fault its 24,576 pages in again -- 1.2 million
    faults here -- but how often depends on the heap's history, so only the tuned side is asserted.)
    ``FEWSHOT_TUNE_MALLOC=0`` leaves the defaults alone."""
    def probe(env):
        out = subprocess.run([sys.executable, "-c", ALLOC_PROBE], capture_output=True, text=True,
                             env={**os.environ, **env}, check=True).stdout.split()
        return out[0] == "True", int(out[1])
    applied, tuned = probe({})
    off, _ = probe({"FEWSHOT_TUNE_MALLOC": "0"})
    assert applied and not off
    assert tuned < 500, tuned

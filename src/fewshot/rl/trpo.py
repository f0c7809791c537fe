"""The trust-region outer step of MAML-RL (``outer: trpo``): TRPO (Schulman et al. 2015) on the
meta-objective, as the MAML paper meta-trains its policies (Finn et al. 2017, section 5.3).

On a rolled-out episode (:func:`fewshot.rl.meta.rollout_episode`) with meta-parameters ``theta``, inner
rollouts per task ``i`` and query rollouts drawn with the adapted ``theta'_i``:

- objective ``L(theta) = mean_i -E[w A pi(a|s; theta'_i(theta)) / pi(a|s; theta'_i)]`` over task ``i``'s
  query samples (importance-weighted; its gradient at ``theta`` is the policy-gradient meta-gradient the
  method computes anyway, second order through the inner step unless ``first_order``);
- constraint ``mean_i E[KL(pi(.|s; theta'_i) || pi(.|s; theta'_i(theta)))] <= max_kl`` on the query states;
- step: ``s = F^-1 g`` by ``cg_iters`` conjugate-gradient iterations (damping 0.01 added to ``F``, and the
  Fisher-vector products on every fifth query sample, as OpenAI baselines' TRPO does), scaled to the
  constraint's boundary, ``Delta = -sqrt(2 max_kl / s'Fs) s``; a backtracking line search takes
  ``0.8^k Delta`` for the first ``k < 15`` at which the objective decreases and the constraint holds (each
  candidate re-adapts every task from the candidate parameters, first order), else no step.

``F`` is the Hessian of the KL above: the Fisher of the adapted policies on the query states, pulled back
to ``theta`` through the inner update. ``exact=True`` (``exact_fisher``, the default) pulls it back
exactly, with forward- and reverse-mode derivatives through the inner step (third derivatives of the
policy; the trust-region part then takes about 4x as long, the whole meta-step about 2x). ``exact=False``
linearises the inner update without its Hessian term (``d theta' / d theta = I`` for the weights,
``d theta' / d alpha = (theta' - theta) / alpha`` for Meta-SGD's learned step sizes): two passes of the
policy network per iteration. Either way the line search checks the exact objective and KL, so the trust
region holds; only the direction and the first trial length differ. Measured on 2-D navigation: at
initialisation both products agree (cosine 0.998), but after 150 meta-steps the exact curvature along the
gradient is 13x the linearised one, the linearised step needs 7-10 backtracks (a step of 0.8^9 = 0.13 of
its trial length; the exact one needed 1 on the same episode, 5 on average over a 500-step run), and the
adapted training return after 50 meta-steps is -18.7 against -15.1 with the exact products (BENCHMARKS.md,
meta-RL).

The method returns ``-Delta`` as its loss's gradient, and its optimiser is plain SGD at rate 1
(:meth:`fewshot.methods.base.Method.outer_optimizer`), so the trainer, its checkpoints and exact resume
are unchanged. No randomness is drawn here.
"""
from __future__ import annotations

import math
from typing import Callable, Dict

import torch
from torch.func import jvp, vjp, vmap

from ..episodes import Episode
from .meta import adapted
from .pg import fisher_product, log_prob, policy_kl

Params = Dict[str, torch.Tensor]


def conjugate_gradient(fvp: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, iters: int = 10,
                       tol: float = 1e-10) -> torch.Tensor:
    """Approximate ``A^-1 b`` for a symmetric positive-definite ``A`` given as ``fvp(v) = A v``."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = b.clone()
    rr = r @ r
    for _ in range(iters):
        if rr <= tol:
            break
        Ap = fvp(p)
        alpha = rr / (p @ Ap).clamp(min=1e-30)
        x = x + alpha * p
        r = r - alpha * Ap
        rr_new = r @ r
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x


class _Flat:
    """Parameters dict <-> one flat vector (the trainable meta-parameters, in a fixed key order)."""

    def __init__(self, params: Params):
        self.keys = list(params)
        self.shapes = [params[k].shape for k in self.keys]
        self.sizes = [params[k].numel() for k in self.keys]

    def flat(self, d: Params) -> torch.Tensor:
        return torch.cat([d[k].reshape(-1).float() for k in self.keys])

    def unflat(self, v: torch.Tensor) -> Params:
        return {k: t.view(s) for k, t, s in zip(self.keys, v.split(self.sizes), self.shapes)}


class MetaTrustRegion:
    """The pieces of one trust-region step on a rolled-out episode ``ep``: :meth:`objective` (and the KL)
    at candidate meta-parameters, :meth:`fvp` (the Fisher-vector product), and :meth:`step`.

    ``keys``: the trainable meta-parameters the step moves (a flat vector over them, in this order). The
    Fisher-vector products use every ``fisher_stride``-th query sample of each task (a fixed stride over
    rollouts and time steps, as TRPO subsamples its states for them); the objective and KL use them all."""

    def __init__(self, method, ep: Episode, keys, damping: float = 1e-2, fisher_stride: int = 5,
                 exact: bool = True):
        self.method, self.ep, self.damping, self.exact = method, ep, damping, exact
        self.discrete = ep.extra["loss"] == "pg-discrete"
        self.theta_all = method.meta_params()
        self.theta = {k: self.theta_all[k] for k in keys}
        self.flat = _Flat(self.theta)
        qy = ep.query_y
        self.B = ep.query_x.shape[0]
        self.w, self.adv = qy[..., -1], qy[..., -2]
        self.actions = qy[..., :-2].squeeze(-1) if self.discrete else qy[..., :-2]
        self.wsum = self.w.sum(1).clamp(min=1)
        self.sx, self.sy = (ep.support_x, ep.support_y) if ep.extra.get("per_step") else \
            (ep.support_x[:, None], ep.support_y[:, None])          # a leading step axis
        self._fwd = vmap(lambda p, o: method.forward_with(p, o)[0].float())
        with torch.no_grad():
            self.old_params = self.adapt(self.theta_all)
            self.old_out = self._fwd(self.old_params, ep.query_x)
            self.old_lp = log_prob(self.old_out, self.actions, self.discrete)
        # d theta'_i / d theta, linearised: identity on the weights; Meta-SGD's step sizes move theta'_i
        # along (theta'_i - theta) / alpha
        self.lr_dirs = {}
        for k in keys:
            if k.startswith("lr:"):
                name = next(n for n in self.old_params if n.replace(".", "__") == k[3:])
                lr = self.theta[k]
                start = self.theta_all.get(name, torch.zeros_like(lr))      # CAVIA's context starts at 0
                ok = lr.abs() > 1e-8
                self.lr_dirs[k] = (name, torch.where(ok, (self.old_params[name] - start)
                                                     / torch.where(ok, lr, torch.ones_like(lr)), 0.0))
        sub = slice(None, None, fisher_stride)
        self.fx, self.fold, fw = ep.query_x[:, sub], self.old_out[:, sub], self.w[:, sub]
        self.fscale = (fw / fw.sum(1, keepdim=True).clamp(min=1) / self.B).unsqueeze(-1)

        c, kind = method.config, ep.extra["loss"]

        def pulled_back(f, p, u, old, sc):
            """``J' M J u`` for the output map ``f`` at ``p`` (``J`` its Jacobian, ``M`` the policy's Fisher
            in output space, weighted per sample by ``sc``)."""
            _, dout = jvp(f, (p,), (u,))
            _, pull = vjp(f, p)
            return pull(fisher_product(old, dout, self.discrete) * sc)[0]

        def at_adapted(p, u, o, old, sc):          # the Fisher of the adapted policy at theta'_i
            return pulled_back(lambda q: method.forward_with(q, o)[0].float(), p, u, old, sc)

        def through_inner(th, v, sx, sy, o, old, sc):      # ... as a function of theta, through the inner step
            def f(q):
                full, _ = method.inner_loop(q, sx, sy, c.inner_steps, c.inner_lr, False, kind=kind, per_step=True)
                return method.forward_with(full, o)[0].float()
            return pulled_back(f, th, v, old, sc)
        self._fvp = vmap(at_adapted)
        self._exact_fvp = vmap(through_inner, in_dims=(None, None, 0, 0, 0, 0, 0))

    def adapt(self, params: Params) -> Params:
        """Each task's adapted parameters (stacked on a task axis) from meta-parameters ``params``."""
        c, ep, B = self.method.config, self.ep, self.B
        if c.inner_steps == 0:
            out = {k: v.expand(B, *v.shape) for k, v in params.items() if not k.startswith("lr:")}
            if c.context:
                out["context"] = ep.query_x.new_zeros(B, c.context)
            return out
        return adapted(self.method, self.sx, self.sy, ep.extra["loss"], params)

    def objective(self, v: torch.Tensor) -> tuple:
        """``(L, mean KL)`` at the meta-parameters ``v`` (flat): re-adapted, importance-weighted."""
        with torch.no_grad():
            out = self._fwd(self.adapt({**self.theta_all, **self.flat.unflat(v)}), self.ep.query_x)
            ratio = (log_prob(out, self.actions, self.discrete) - self.old_lp).exp()
            loss = (-(self.w * self.adv * ratio).sum(1) / self.wsum).mean()
            kl = ((self.w * policy_kl(self.old_out, out, self.discrete)).sum(1) / self.wsum).mean()
        return float(loss), float(kl)

    def fvp(self, v: torch.Tensor) -> torch.Tensor:
        """``(F + damping I) v`` for a flat ``v``."""
        vd = self.flat.unflat(v)
        if self.exact and self.method.config.inner_steps > 0:     # (without an inner step both are exact)
            full_v = {k: vd[k] if k in vd else torch.zeros_like(t) for k, t in self.theta_all.items()}
            with torch.no_grad():
                back = self._exact_fvp(self.theta_all, full_v, self.sx, self.sy, self.fx, self.fold, self.fscale)
            return self.flat.flat({k: back[k].sum(0) for k in vd}) + self.damping * v
        u = {n: (vd[n].expand_as(p).clone() if n in vd else torch.zeros_like(p)) for n, p in self.old_params.items()}
        for k, (n, d) in self.lr_dirs.items():
            u[n] = u[n] + d * vd[k]
        with torch.no_grad():
            back = self._fvp(self.old_params, u, self.fx, self.fold, self.fscale)
        out = {k: back[k].sum(0) for k in vd if k in back}
        for k, (n, d) in self.lr_dirs.items():
            out[k] = (back[n] * d).sum(0)
        return self.flat.flat(out) + self.damping * v

    def step(self, grad: Params, max_kl: float = 0.01, cg_iters: int = 10, backtrack: float = 0.8,
             ls_steps: int = 15) -> tuple:
        """The step ``Delta`` (a dict over :attr:`theta`'s keys) for the objective's gradient ``grad``, and
        its metrics (``kl``: the mean KL after it; ``ls``: backtracking steps, ``ls_steps`` when none held)."""
        zero = {k: torch.zeros_like(v) for k, v in self.theta.items()}
        none = zero, {"kl": 0.0, "ls": float(ls_steps)}
        g = self.flat.flat(grad)
        if not torch.isfinite(g).all() or float(g @ g) == 0.0:
            return none
        s = conjugate_gradient(self.fvp, g, cg_iters)
        shs = float(s @ self.fvp(s))
        if not math.isfinite(shs) or shs <= 0:
            return none
        full = -math.sqrt(2 * max_kl / shs) * s
        start = self.flat.flat(self.theta)
        loss0 = float((-(self.w * self.adv).sum(1) / self.wsum).mean())      # the objective at theta (ratio 1)
        for k in range(ls_steps):
            step = (backtrack ** k) * full
            loss, kl = self.objective(start + step)
            if math.isfinite(loss) and loss < loss0 and kl <= max_kl:
                return self.flat.unflat(step), {"kl": kl, "ls": float(k)}
        return none


def trust_region_step(method, ep: Episode, meta_grad: Params, max_kl: float = 0.01, cg_iters: int = 10,
                      exact: bool = True) -> tuple:
    """:meth:`MetaTrustRegion.step` over the trainable meta-parameters that ``meta_grad`` names."""
    return MetaTrustRegion(method, ep, list(meta_grad), exact=exact).step(meta_grad, max_kl, cg_iters)

"""Gradient-based meta-learning on one functional inner loop, vectorised over tasks.

Every method here is a variation of :meth:`GradientMethod.inner_loop`, written once with
``torch.func.functional_call`` and ``torch.func.grad``:

- which parameters adapt (``adapt``: all, head (ANIL), body (BOIL), none; CAVIA context vectors),
- the step size (``inner_lr``; learned per-parameter tensors for Meta-SGD),
- the update rule (SGD, or Adam for Reptile), the number of steps, first or second order.

A *task function* runs the inner loop for one task and returns the task's outer loss. Its per-task
gradients with respect to the meta-parameters are computed over the task axis either with
``torch.func.vmap`` of ``torch.func.grad_and_value`` (``vectorize: vmap``, ``chunk`` tasks at a time to bound
memory) or with a plain loop (``vectorize: loop``) in which the same code differentiates with
``torch.autograd`` (faster on CPU) and the tasks can be shared among single-threaded worker processes
(``workers``, see :mod:`fewshot.parallel`); all give the same numbers (tested). The outer step then decides how the
per-task gradients combine -- the mean (MAML), agreement weights (Eshratifar et al. 2018), TAML's
inequality penalty (Jamal & Qi 2019) -- and hands the result to the trainer's optimiser as the gradient of
a surrogate loss whose value is the mean query loss. Reptile's per-task "gradient" is ``theta - theta'``.

Batch norm is an explicit mode recorded in the method config (see :mod:`fewshot.models.meta`).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field, make_dataclass
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, grad_and_value, vmap

from ..errors import FewshotError
from ..models.meta import BN_MODES, head_inputs, meta_network
from . import register
from .base import BackboneOptions, Method

LOSSES = ("auto", "ce", "mse", "bc", "pg", "pg-discrete")
ADAPT = ("all", "head", "body", "none")
COMBINE = ("mean", "agreement")
TAML_PENALTIES = ("none", "entropy", "gini", "theil", "vol")
VECTORIZE = ("auto", "loop", "vmap")
OUTER = ("gradient", "trpo")
INNER_RULES = ("sgd", "adam")

Params = Dict[str, torch.Tensor]


# ----------------------------------------------------------------------------------------------- helpers
def _upcast(t: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 (autocast outputs) to fp32 for losses; fp32 and fp64 stay as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def task_loss(out: torch.Tensor, y: torch.Tensor, kind: str = "auto") -> torch.Tensor:
    """Loss of one task's outputs ``[M, D]`` against labels ``[M]`` (int) or targets ``[M, D]`` (float).

    ``ce`` cross-entropy; ``mse`` mean squared error; ``bc`` behaviour cloning: squared error summed over
    action dimensions and averaged over time steps (cross-entropy for discrete actions); ``auto`` picks
    cross-entropy for integer labels and ``mse`` for float targets; ``pg`` / ``pg-discrete`` the
    policy-gradient surrogate of :func:`fewshot.rl.pg.pg_loss` (Gaussian / categorical policy) on packed
    ``(action, advantage, weight)`` targets.
    """
    out = _upcast(out)
    if kind in ("pg", "pg-discrete"):
        from ..rl.pg import pg_loss
        return pg_loss(out, y, discrete=kind == "pg-discrete")
    discrete = not torch.is_floating_point(y)
    if kind in ("ce",) or (kind in ("auto", "bc") and discrete):
        return F.cross_entropy(out, y)
    y = y.to(out.dtype).view_as(out)
    if kind == "bc":
        return (out - y).pow(2).sum(-1).mean()
    return F.mse_loss(out, y)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean predictive entropy ``-E_x sum_n p_n log p_n`` of logits ``[M, N]``."""
    logp = _upcast(logits).log_softmax(-1)
    return -(logp.exp() * logp).sum(-1).mean()


def inequality(losses: torch.Tensor, kind: str) -> torch.Tensor:
    """TAML's inequality measures of per-task losses ``[M]`` (all positive).

    gini: sum_ij |l_i - l_j| / (2 M sum_i l_i); theil: (1/M) sum (l_i/mean) ln(l_i/mean);
    vol (variance of logarithms): (1/M) sum (ln l_i - ln g)^2 with g the geometric mean.
    """
    l = _upcast(losses)
    M = l.numel()
    if kind == "gini":
        return (l.unsqueeze(0) - l.unsqueeze(1)).abs().sum() / (2 * M * l.sum())
    if kind == "theil":
        r = l / l.mean()
        return (r * r.log()).mean()
    if kind == "vol":
        ll = l.log()
        return (ll - ll.mean()).pow(2).mean()
    raise FewshotError(f"unknown inequality measure {kind!r}; choose gini, theil or vol")


def agreement_weights(flat_grads: torch.Tensor) -> torch.Tensor:
    """Gradient-agreement weights ``w_i = sum_j g_i.g_j / sum_k |sum_j g_k.g_j|`` for ``[B, P]`` gradients."""
    g = flat_grads.double()
    s = (g @ g.T).sum(1)
    denom = s.abs().sum()
    if float(denom) == 0.0:
        return torch.full_like(s, 1.0 / len(s)).to(flat_grads.dtype)
    return (s / denom).to(flat_grads.dtype)


def _autograd_grads(value: torch.Tensor, leaves: Params, create_graph: bool) -> Params:
    """``d value / d leaves`` as a dict like ``leaves``; zeros where ``value`` does not depend on a leaf."""
    gs = torch.autograd.grad(value, list(leaves.values()), create_graph=create_graph, allow_unused=True)
    return {k: g if g is not None else torch.zeros_like(leaves[k]) for k, g in zip(leaves, gs)}


def _check(value, allowed, what):
    if value not in allowed:
        raise FewshotError(f"unknown {what} {value!r}; choose from {', '.join(allowed)}")


# ----------------------------------------------------------------------------------------------- base
@dataclass
class GradientConfig(BackboneOptions):
    #: the whole network, head included: auto | conv4 | mlp (fewshot's functional nets), any other backbone
    #: name, package.module:factory, path/to/file.py:factory or timm:NAME (called with in_shape and outputs)
    backbone: str = "auto"
    head: str = ""                  #: the head ANIL adapts and BOIL keeps fixed ("": the last nn.Linear)
    hidden: int = 64                #: conv4 channels
    mlp_hidden: List[int] = field(default_factory=lambda: [40, 40])  #: mlp hidden sizes
    activation: str = "relu"        #: mlp activation: relu | tanh
    outputs: int = 0                #: head outputs: ways for classification (0: the run's --ways), target size
    bn: str = "transductive"        #: transductive | running (per-step statistics, inductive) | none
    inner_steps: int = 1            #: inner-loop steps during meta-training
    inner_lr: float = 0.4           #: inner-loop step size (alpha)
    test_steps: int = 0             #: inner steps at evaluation/prediction (0: same as inner_steps)
    first_order: bool = False       #: drop second-order terms (first-order MAML)
    adapt: str = "all"              #: which network parameters adapt: all | head (ANIL) | body (BOIL) | none
    learn_lr: bool = False          #: learn a per-parameter step-size tensor (Meta-SGD)
    context: int = 0                #: CAVIA context parameters (adapted; reset to 0 for every task)
    loss: str = "auto"              #: inner and outer loss: auto | ce | mse | bc (behaviour cloning)
    combine: str = "mean"           #: how task gradients combine: mean | agreement
    taml: str = "none"              #: TAML penalty: none | entropy | gini | theil | vol
    taml_weight: float = 1.0        #: lambda of the TAML penalty
    vectorize: str = "auto"         #: task axis: auto (loop for conv nets on CPU, else vmap) | loop | vmap
    chunk: int = 0                  #: vmap: tasks per chunk (0: the whole batch)
    workers: int = 0                #: loop on CPU: single-threaded processes sharing the tasks (0: one per thread)
    discount: float = 0.99          #: RL task families: discount of the returns-to-go
    baseline: bool = True           #: RL task families: subtract the linear feature baseline from the returns
    #: RL task families: the outer step: gradient (the run's optimiser, e.g. Adam, on the policy-gradient
    #: meta-objective) | trpo (a trust-region step, fewshot.rl.trpo; the run's --optimizer and --lr then do
    #: not apply, --grad-clip clips the step)
    outer: str = "gradient"
    max_kl: float = 0.01            #: outer trpo: the trust region (mean KL of the adapted policies)
    cg_iters: int = 10              #: outer trpo: conjugate-gradient iterations
    #: outer trpo: the Fisher-vector products through the inner step exactly (third derivatives), or
    #: (false) through it linearised without its Hessian: each meta-step about half as long, a worse
    #: direction (fewshot.rl.trpo)
    exact_fisher: bool = True


class GradientMethod(Method):
    """Shared machinery: the network, the inner loop, per-task gradients and their combination."""

    Config = GradientConfig
    run_defaults = {"ways": 5, "shots": 1, "queries": 15, "batch": 32, "val_queries": 15,
                    "train": {"schedule": "none"}}
    adapts_by_gradient = True
    #: vmap's randomness over tasks: fewshot's own nets draw nothing; any other module may (dropout)
    _randomness = "error"

    def __init__(self, config, in_shape):
        super().__init__(config, in_shape)
        c = config
        _check(c.bn, BN_MODES, "batch-norm mode")
        _check(c.adapt, ADAPT, "adapt choice")
        _check(c.loss, LOSSES, "loss")
        _check(c.combine, COMBINE, "combination")
        _check(c.taml, TAML_PENALTIES, "TAML penalty")
        _check(c.vectorize, VECTORIZE, "vectorize mode")
        _check(c.outer, OUTER, "outer step")
        if c.outer == "trpo" and (c.max_kl <= 0 or c.cg_iters < 1):
            raise FewshotError("outer trpo needs max_kl > 0 and cg_iters >= 1")
        if c.inner_steps < 0 or c.test_steps < 0:
            raise FewshotError("inner_steps and test_steps must be at least 0")
        if c.outputs < 1:
            raise FewshotError("outputs (the head size: ways, or the target size for regression) must be set")
        if c.adapt == "none" and not c.context:
            raise FewshotError("adapt none leaves nothing to adapt; give context > 0 (CAVIA) or adapt all/head/body")
        if c.combine == "agreement" and c.taml in ("gini", "theil", "vol"):
            raise FewshotError("choose either gradient agreement or a TAML inequality penalty, not both")
        steps = max(c.inner_steps, c.test_steps or c.inner_steps)
        head = "head."
        if self._build.backbone is None and c.backbone in ("auto", "conv4", "mlp") and not c.head:
            self.net = self.make_backbone(head="head", own=lambda kind: meta_network(
                kind, self.in_shape, c.outputs, c.hidden, c.mlp_hidden, c.bn, steps, c.context, c.activation))
        else:       # any other module: the additional path of fewshot.models.functional
            from ..models.functional import FunctionalNet
            module = self.make_backbone(outputs=c.outputs, head=c.head or None)
            self.net = FunctionalNet(module, self.in_shape, c.bn, steps, c.context, c.head or None,
                                     name=c.backbone)
            self._randomness = "different"
            head = self.net.head_prefix
            if head is None and c.adapt in ("head", "body"):
                raise FewshotError(f"adapt {c.adapt} needs a head: backbone {c.backbone} has no nn.Linear; "
                                   "name its head with --head")
        names = [n for n, p in self.net.named_parameters() if p.requires_grad]   # frozen ones stay fixed
        if c.adapt == "all":
            adapted = [n for n in names if not n.startswith("film.")]
        elif c.adapt == "head":
            adapted = [n for n in names if n.startswith(head)]
        elif c.adapt == "body":
            adapted = [n for n in names if not n.startswith((head, "film."))]
        else:
            adapted = []
        self.adapt_keys = adapted
        self.lrs = nn.ParameterDict()
        if c.learn_lr:
            for n, p in self.net.named_parameters():
                if n in adapted:
                    self.lrs[n.replace(".", "__")] = nn.Parameter(torch.full_like(p, c.inner_lr))
            if c.context:
                self.lrs["context"] = nn.Parameter(torch.full((c.context,), c.inner_lr))

    @property
    def inference_mode(self) -> str:
        """How queries are classified, for evaluation reports: transductive batch norm normalises each task's
        query set with its own statistics; running statistics (or none) classify each query alone."""
        return "transductive" if self.config.bn == "transductive" else "inductive"

    # ------------------------------------------------------------------ parameters as plain tensors
    def meta_params(self) -> Params:
        """The meta-parameters the task functions differentiate: network weights and learned step sizes."""
        p = {n: t.detach() for n, t in self.net.named_parameters()}
        p.update({"lr:" + k: t.detach() for k, t in self.lrs.items()})
        return p

    def _module_params(self) -> Dict[str, nn.Parameter]:
        p = dict(self.net.named_parameters())
        p.update({"lr:" + k: t for k, t in self.lrs.items()})
        return p

    def _lr(self, params: Params, key: str, lr: float):
        if self.config.learn_lr:
            return params["lr:" + key.replace(".", "__")]
        return lr

    # ------------------------------------------------------------------ the functional pieces
    def forward_with(self, params: Params, x: torch.Tensor, step: int = 0, twice: bool = False):
        """The network on ``x`` with ``params`` (network weights, optionally ``context``): ``(out, stats)``.
        ``twice``: the pass will be differentiated twice (batch norm picks a form that is cheap to)."""
        weights = {k: v for k, v in params.items() if not k.startswith("lr:") and k != "context"}
        return functional_call(self.net, weights, (x,), {"step": step, "context": params.get("context"),
                                                         "twice": twice})

    def initial_fast(self, params: Params, like: torch.Tensor) -> Params:
        fast = {k: params[k] for k in self.adapt_keys}
        if self.config.context:
            fast["context"] = torch.zeros(self.config.context, dtype=self.net.head.weight.dtype,
                                          device=like.device)
        return fast

    def inner_loop(self, params: Params, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float,
                   first_order: bool, rule: str = "sgd", betas=(0.9, 0.999), kind: str | None = None,
                   per_step: bool = False):
        """Adapt to one task: ``steps`` updates of the adapted parameters on ``(x, y)``.

        Returns the full parameter dict after adaptation and the batch statistics of each step (for the
        running batch-norm mode). Second order unless ``first_order``: the updates stay differentiable
        with respect to ``params``. ``kind``: the loss (default: the config's); ``per_step``: ``x`` and
        ``y`` have a leading step axis and step ``s`` uses ``x[s], y[s]`` (meta-RL: fresh rollouts per step).
        """
        fast = self.initial_fast(params, x)
        stats: list = []
        m = {k: torch.zeros_like(v) for k, v in fast.items()} if rule == "adam" else None
        v2 = {k: torch.zeros_like(v) for k, v in fast.items()} if rule == "adam" else None
        kind = kind or self.config.loss

        for s in range(steps):
            def support_loss(f, s=s):
                xs, ys = (x[s], y[s]) if per_step else (x, y)
                out, st = self.forward_with({**params, **f}, xs, s, twice=not first_order)
                return task_loss(out, ys, kind), st
            g, st = self.grad(support_loss, create_graph=not first_order)(fast)
            stats.append(st)
            if first_order:
                g = {k: t.detach() for k, t in g.items()}
            if rule == "sgd":
                fast = {k: fast[k] - self._lr(params, k, lr) * g[k] for k in fast}
            else:
                b1, b2 = betas
                t = s + 1
                m = {k: b1 * m[k] + (1 - b1) * g[k] for k in fast}
                v2 = {k: b2 * v2[k] + (1 - b2) * g[k] * g[k] for k in fast}
                fast = {k: fast[k] - lr * (m[k] / (1 - b1 ** t)) / ((v2[k] / (1 - b2 ** t)).sqrt() + 1e-8)
                        for k in fast}
        return {**params, **fast}, stats

    # ------------------------------------------------------------------ differentiation backends
    _backend = "func"

    def grad(self, f: Callable, create_graph: bool = True) -> Callable:
        """``torch.func.grad(f, has_aux=True)``, or its autograd twin in the per-task loop.

        Under ``vmap`` the inner gradient must be a function transform. In the plain loop the same
        inner loop runs on ``torch.autograd.grad`` instead (``create_graph`` only for second order), which
        measured about 1.5x faster on CPU for second-order MAML and skips building graphs that first-order
        methods would throw away. Both return ``(gradients like the argument, aux)``.
        """
        if self._backend == "func":
            return grad(f, has_aux=True)

        def run(arg):
            single = isinstance(arg, torch.Tensor)
            items = {"x": arg} if single else dict(arg)
            leaves = {k: v if v.requires_grad else v.detach().requires_grad_(True) for k, v in items.items()}
            with torch.enable_grad():
                value, aux = f(leaves["x"] if single else leaves)
                out = _autograd_grads(value, leaves, create_graph)
            return (out["x"] if single else out), aux
        return run

    # ------------------------------------------------------------------ running the task axis
    def _vectorize(self, device: torch.device) -> str:
        v = self.config.vectorize
        if v == "auto":
            # measured: on CPU a loop of per-task convolutions beats vmap's batched (grouped) ones, while
            # small MLPs are dominated by per-operation overhead, which vmap removes
            conv = any(isinstance(m, nn.Conv2d) for m in self.net.modules())
            return "loop" if device.type == "cpu" and conv else "vmap"
        return v

    def _workers(self, device: torch.device, batch: int) -> int:
        w = self.config.workers
        if not self.rebuildable:    # a module given in Python: worker processes cannot rebuild it
            return 1
        if w == 0:      # auto: one single-threaded process per intra-op thread on CPU
            w = torch.get_num_threads() if device.type == "cpu" else 1
        return max(1, min(int(w), batch))

    def map_tasks(self, fn: str, params: Params, *tensors: torch.Tensor, with_grad: bool = False, **kwargs):
        """``self.<fn>(params, *task_tensors, **kwargs)`` for every task of the batch, stacked along a new
        first axis: through ``vmap``, or a loop (split over worker processes when ``workers`` > 1).

        ``with_grad``: the function returns ``(value, aux)`` and the result is
        ``(d value / d params, (value, aux))`` per task, as ``torch.func.grad_and_value(fn, has_aux=True)`` gives.
        """
        B = tensors[0].shape[0]
        device = tensors[0].device
        mode = self._vectorize(device)
        if mode == "vmap":
            chunk = self.config.chunk or B
            f = functools.partial(getattr(self, fn), **kwargs) if kwargs else getattr(self, fn)
            f = grad_and_value(f, has_aux=True) if with_grad else f
            self._backend = "func"
            # vmap has no channels-last batching rules (and runs per-task convolutions as grouped ones
            # anyway): the weights go in as NCHW copies whatever layout the module keeps (a clone, since
            # .contiguous() keeps the channels-last strides of a 1-input-channel weight)
            params = {k: v.clone(memory_format=torch.contiguous_format) for k, v in params.items()}
            return vmap(f, in_dims=(None,) + (0,) * len(tensors), chunk_size=min(chunk, B),
                        randomness=self._randomness)(params, *tensors)
        if device.type == "cpu":
            from ..parallel import tune_allocator
            tune_allocator()
        workers = self._workers(device, B)
        if workers == 1:
            return self.local_map(fn, params, *tensors, with_grad=with_grad, **kwargs)
        from ..parallel import TaskPool
        pool = self.__dict__.get("_pool")
        if pool is None or pool.workers != workers - 1:
            if pool is not None:
                pool.close()
            pool = self.__dict__["_pool"] = TaskPool(self, workers - 1)
        bounds = [round(i * B / workers) for i in range(workers + 1)]
        shares = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
        sent = pool.submit(self, fn, tensors, shares[1:], with_grad, kwargs)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            mine = self.local_map(fn, params, *(t[shares[0]] for t in tensors), with_grad=with_grad, **kwargs)
        finally:
            torch.set_num_threads(threads)
            theirs = pool.collect(sent)
        theirs = torch.utils._pytree.tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, theirs)
        return torch.utils._pytree.tree_map(lambda *xs: torch.cat(xs), mine, *theirs)

    def local_map(self, fn: str, params: Params, *tensors: torch.Tensor, with_grad: bool = False, **kwargs):
        """The plain per-task loop of :meth:`map_tasks`, in this process, on ``torch.autograd``."""
        f = getattr(self, fn)

        def per_task(p, *ts):
            if not with_grad:
                return f(p, *ts, **kwargs)
            leaves = {k: v.detach().requires_grad_(True) for k, v in p.items()}
            with torch.enable_grad():
                value, aux = f(leaves, *ts, **kwargs)
                grads = _autograd_grads(value, leaves, create_graph=False)
            return grads, (value.detach(), aux)

        self._backend = "autograd"
        try:
            outs = [per_task(params, *(t[b] for t in tensors)) for b in range(tensors[0].shape[0])]
        finally:
            self._backend = "func"
        return torch.utils._pytree.tree_map(lambda *xs: torch.stack(xs), *outs)

    # ------------------------------------------------------------------ the contract
    def task_objective(self, params: Params, sx, sy, qx, qy, kind: str | None = None, per_step: bool = False):
        """Outer loss of one task after adaptation, with auxiliary outputs (loss, score, statistics).
        ``kind`` and ``per_step`` as in :meth:`inner_loop` (set by RL episodes)."""
        c = self.config
        kind = kind or c.loss
        full, stats = self.inner_loop(params, sx, sy, c.inner_steps, c.inner_lr, c.first_order, kind=kind,
                                      per_step=per_step)
        out, qstats = self.forward_with(full, qx, c.inner_steps)
        loss = task_loss(out, qy, kind)
        total = loss
        if c.taml == "entropy":
            before, _ = self.forward_with(params, qx, 0)
            total = total + c.taml_weight * (entropy(out) - entropy(before))
        score = loss.detach() if kind.startswith("pg") else self._score(out.detach(), qy)
        return total, {"loss": loss.detach(), "score": score, "stats": stats + [qstats]}

    def _score(self, out, y):
        if torch.is_floating_point(y):
            return (out.float() - y.float().view_as(out)).pow(2).mean()
        return (out.argmax(-1) == y).float().mean()

    def adapted_params(self, params: Params, x, y, kind: str | None = None) -> Params:
        """One task's parameters after ``x.shape[0]`` inner steps, step ``s`` on ``(x[s], y[s])``, without
        meta-gradient (meta-RL draws the next rollouts with them)."""
        full, _ = self.inner_loop(params, x, y, x.shape[0], self.config.inner_lr, True, kind=kind, per_step=True)
        return {k: v.detach() for k, v in full.items() if not k.startswith("lr:")}

    def task_gradients(self, episode):
        """Per-task gradients ``{name: [B, ...]}``, per-task outer losses ``[B]`` and auxiliaries."""
        kw = {k: episode.extra[k] for k in ("loss", "per_step") if k in episode.extra}
        if "loss" in kw:
            kw["kind"] = kw.pop("loss")
        grads, (losses, aux) = self.map_tasks("task_objective", self.meta_params(), episode.support_x,
                                              episode.support_y, episode.query_x, episode.query_y, with_grad=True,
                                              **kw)
        return grads, losses, aux

    def combine(self, grads: Params, losses: torch.Tensor) -> tuple:
        """Coefficients ``c_i`` of the meta-gradient ``sum_i c_i g_i``, and metrics of the combination."""
        c = self.config
        B = losses.shape[0]
        metrics = {}
        if c.combine == "agreement":
            flat = torch.cat([g.flatten(1).float() for g in grads.values()], 1)
            coef = agreement_weights(flat)
            metrics["agree_min"] = float(coef.min())
        else:
            coef = torch.full((B,), 1.0 / B, device=losses.device)
        if c.taml in ("gini", "theil", "vol"):
            l = losses.detach().float().clone().requires_grad_(True)
            with torch.enable_grad():
                ineq = inequality(l, c.taml)
                d = torch.autograd.grad(ineq, l)[0]
            coef = coef + c.taml_weight * d
            metrics["inequality"] = float(ineq.detach())
        return coef, metrics

    @staticmethod
    def _meta_gradient(grads: Params, coef: torch.Tensor) -> Params:
        """``sum_i coef_i g_i`` for each parameter's per-task gradients ``g`` ``[B, ...]``."""
        return {k: torch.tensordot(coef.to(g.dtype), g, dims=1) for k, g in grads.items()}

    def _surrogate(self, meta_grad: Params, value: torch.Tensor) -> torch.Tensor:
        """A surrogate loss whose gradient is ``meta_grad`` and whose value is ``value``."""
        mod = self._module_params()
        sur = value.new_zeros(())
        for k, g in meta_grad.items():
            sur = sur + (mod[k] * g.to(mod[k].dtype)).sum()
        return sur - sur.detach() + value.detach()

    def _trust_region(self, episode, meta_grad: Params, value: torch.Tensor, metrics: dict) -> torch.Tensor:
        """A surrogate whose gradient is minus the trust-region step of :mod:`fewshot.rl.trpo` (applied by
        :meth:`outer_optimizer`'s SGD at rate 1)."""
        from ..rl.trpo import trust_region_step
        mod = self._module_params()
        c = self.config
        step, info = trust_region_step(self, episode, {k: g for k, g in meta_grad.items() if mod[k].requires_grad},
                                       c.max_kl, c.cg_iters, c.exact_fisher)
        metrics.update(info)
        return self._surrogate({k: -v for k, v in step.items()}, value)

    def outer_optimizer(self, params):
        c = self.config
        return torch.optim.SGD(params, lr=1.0) if c.outer == "trpo" else None

    def _update_running_stats(self, stats) -> None:
        """Fold per-step batch statistics (``[step][layer] -> (mean [B, C], var [B, C])``) into the buffers."""
        if self.config.bn != "running" or not self.training:
            return
        layers = self.net.norm_layers()
        with torch.no_grad():
            for step, per_layer in enumerate(stats):
                for norm, (mean, var) in zip(layers, per_layer):
                    norm.update(step, mean.mean(0), var.mean(0))

    def loss(self, episode):
        from ..rl import meta as rl
        returns = None
        if rl.is_rl(episode):      # tasks, not examples: roll out, adapt, roll out again (fewshot.rl.meta)
            rl.check_rl_config(self)
            episode = rl.rollout_episode(self, episode)
            returns = episode.extra["return_before"], episode.extra["return_after"]
        elif self.config.outer != "gradient":
            raise FewshotError(f"outer {self.config.outer} is an outer step for RL task families (navigation2d, "
                               "bandit:...); other data train with outer gradient")
        grads, losses, aux = self.task_gradients(episode)
        coef, metrics = self.combine(grads, losses)
        self._update_running_stats(aux.get("stats", []))
        qloss = aux["loss"].mean()
        meta_grad = self._meta_gradient(grads, coef)
        if returns is not None and self.config.outer == "trpo":
            out = self._trust_region(episode, meta_grad, qloss, metrics)
        else:
            out = self._surrogate(meta_grad, qloss)
        metrics["query_loss"] = float(qloss)
        if returns is not None:
            metrics["return_pre"], metrics["return"] = float(returns[0].mean()), float(returns[1].mean())
        else:
            score = float(aux["score"].mean())
            metrics["mse" if torch.is_floating_point(episode.query_y) else "acc"] = score
        return out, metrics

    def adapt_predict(self, params: Params, sx, sy, qx, steps: int | None = None):
        """Outputs on the queries of one task after ``steps`` inner steps on its support (no meta-gradient)."""
        c = self.config
        steps = (c.test_steps or c.inner_steps) if steps is None else steps
        full, _ = self.inner_loop(params, sx, sy, steps, c.inner_lr, True)
        out, _ = self.forward_with(full, qx, steps)
        return out.detach()

    def predict(self, support_x, support_y, query_x, ways=None, steps: int | None = None):
        """Adapt to each task's support set (``steps``, default ``test_steps``) and return query outputs:
        logits ``[B, M, ways]`` (the first ``ways`` outputs of the head), or predictions for regression."""
        regression = torch.is_floating_point(support_y)
        if not regression:
            ways = int(ways) if ways is not None else int(support_y.max()) + 1
            head = self.config.outputs
            if ways > head:
                raise FewshotError(f"this {self.name} model has a {head}-way head; it cannot classify "
                                   f"{ways}-way tasks (train it with --ways {ways})")
        with torch.enable_grad():
            out = self.map_tasks("adapt_predict", self.meta_params(), support_x, support_y, query_x, steps=steps)
        return out if regression else out[..., :ways]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Features before the head (for plots), with the meta-learned weights."""
        return head_inputs(self.net, x)


# ----------------------------------------------------------------------------------------------- methods
@register("maml")
class MAML(GradientMethod):
    """MAML (Finn et al. 2017): second-order meta-gradient through the inner SGD steps."""


def _preset(base, **defaults):
    """A Config subclass of ``base.Config`` with other defaults."""
    return make_dataclass(base.Config.__name__, [(k, type(v), field(default=v)) for k, v in defaults.items()],
                          bases=(base.Config,))


@register("fomaml")
class FOMAML(GradientMethod):
    """First-order MAML: the meta-gradient ignores second-order terms."""
    Config = _preset(GradientMethod, first_order=True)


@register("anil")
class ANIL(GradientMethod):
    """ANIL (Raghu et al. 2020): only the head adapts in the inner loop."""
    Config = _preset(GradientMethod, adapt="head")


@register("boil")
class BOIL(GradientMethod):
    """BOIL (Oh et al. 2021): only the body adapts in the inner loop; the head is fixed."""
    Config = _preset(GradientMethod, adapt="body")


@register("metasgd")
class MetaSGD(GradientMethod):
    """Meta-SGD (Li et al. 2017): learned per-parameter step sizes, meta-trained with the weights."""
    Config = _preset(GradientMethod, learn_lr=True)


@register("cavia")
class CAVIA(GradientMethod):
    """CAVIA (Zintgraf et al. 2019): only context parameters adapt; the network is shared."""
    Config = _preset(GradientMethod, adapt="none", context=100, inner_lr=1.0)


@register("taml")
class TAML(GradientMethod):
    """TAML (Jamal & Qi 2019): MAML with an entropy or inequality (Gini/Theil/VoL) task-agnostic penalty."""
    Config = _preset(GradientMethod, taml="entropy", taml_weight=0.1)


@dataclass
class ADMLConfig(GradientConfig):
    adv_eps: float = 0.2            #: FGSM step (inputs are clipped to [clip_min, clip_max])
    adv_lr: float = 0.0             #: inner step size on adversarial data (alpha2; 0: inner_lr)
    clean_weight: float = 1.0       #: outer weight of the clean-adapted copy on adversarial queries
    adv_weight: float = 1.0         #: outer weight of the adversarially adapted copy on clean queries
    clip_min: float = 0.0           #: smallest input value of an adversarial example
    clip_max: float = 1.0           #: largest input value of an adversarial example


@register("adml")
class ADML(GradientMethod):
    """ADML (Yin et al. 2018): MAML on clean and FGSM-adversarial support and query sets."""
    Config = ADMLConfig

    def fgsm(self, params: Params, x, y):
        """``x + eps * sign(grad_x L)`` clipped to the data range, for the current meta-parameters."""
        frozen = {k: v.detach() for k, v in params.items()}

        def input_loss(xx):
            out, _ = self.forward_with(frozen, xx, 0)
            return task_loss(out, y, self.config.loss)
        gx, _ = self.grad(lambda xx: (input_loss(xx), ()), create_graph=False)(x)
        c = self.config
        return (x + c.adv_eps * gx.sign()).clamp(c.clip_min, c.clip_max).detach()

    def task_objective(self, params, sx, sy, qx, qy):
        c = self.config
        sx_adv, qx_adv = self.fgsm(params, sx, sy), self.fgsm(params, qx, qy)
        clean, stats = self.inner_loop(params, sx, sy, c.inner_steps, c.inner_lr, c.first_order)
        adv, _ = self.inner_loop(params, sx_adv, sy, c.inner_steps, c.adv_lr or c.inner_lr, c.first_order)
        out_ca, _ = self.forward_with(clean, qx_adv, c.inner_steps)
        out_ac, qstats = self.forward_with(adv, qx, c.inner_steps)
        l1, l2 = task_loss(out_ca, qy, c.loss), task_loss(out_ac, qy, c.loss)
        total = c.clean_weight * l1 + c.adv_weight * l2
        return total, {"loss": total.detach(), "score": self._score(out_ac.detach(), qy),
                       "stats": stats + [qstats]}


@dataclass
class ReptileConfig(GradientConfig):
    inner_steps: int = 5
    inner_lr: float = 1e-3
    inner_rule: str = "adam"        #: the inner optimiser: adam | sgd
    beta1: float = 0.0              #: inner Adam's beta1 (Nichol et al. use 0)
    test_steps: int = 50
    first_order: bool = True        #: Reptile has no second-order terms (fixed)


@register("reptile")
class Reptile(GradientMethod):
    """Reptile (Nichol et al. 2018): move the initialisation towards the task-adapted weights.

    Each task runs ``inner_steps`` SGD or Adam steps on all its examples (support and query); the task's
    "gradient" is ``theta - theta'`` and the trainer's optimiser applies their combination. With the SGD
    optimiser at learning rate epsilon this is exactly ``theta += epsilon * mean(theta' - theta)`` (batched
    Reptile); a batch of one task is serial Reptile.
    """
    Config = ReptileConfig
    run_defaults = {"ways": 5, "shots": 1, "queries": 9, "batch": 5, "val_queries": 15,
                    "train": {"optimizer": "sgd", "lr": 1.0, "schedule": "linear"}}

    def __init__(self, config, in_shape):
        super().__init__(config, in_shape)
        _check(config.inner_rule, INNER_RULES, "inner rule")
        if config.learn_lr or config.taml != "none":
            raise FewshotError("reptile has no learned step sizes or TAML penalty")

    def task_delta(self, params: Params, x, y):
        c = self.config
        full, stats = self.inner_loop(params, x, y, c.inner_steps, c.inner_lr, True, c.inner_rule, (c.beta1, 0.999))
        delta = {k: (params[k] - full[k]).detach() for k in self.adapt_keys}
        with torch.no_grad():
            out, _ = self.forward_with(full, x, c.inner_steps)
        # loss and score of the adapted weights on the task's own (training) examples
        return delta, {"loss": task_loss(out, y, c.loss).detach(), "score": self._score(out.detach(), y),
                       "stats": stats}

    def task_gradients(self, episode):
        x = torch.cat([episode.support_x, episode.query_x], 1)
        y = torch.cat([episode.support_y, episode.query_y], 1)
        grads, aux = self.map_tasks("task_delta", self.meta_params(), x, y)
        return grads, aux["loss"], aux

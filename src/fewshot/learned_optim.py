"""Learned optimisers: "Learning to learn by gradient descent by gradient descent" (Andrychowicz et al. 2016).

A small LSTM ``m`` with weights phi, shared by every coordinate of the optimisee's parameters, reads the
gradient of each coordinate and returns its update::

    g_t, h_{t+1} = m(grad f(theta_t), h_t; phi)        theta_{t+1} = theta_t + g_t

It is trained by truncated backpropagation through time on the meta-loss
``L(phi) = E_f [ sum_{t=1..T} w_t f(theta_t) ]`` (w_t = 1) over a distribution of optimisee problems f: a
trajectory of ``horizon`` steps is cut into segments of ``unroll`` steps; after each segment the mean of
f(theta_t) over its steps is backpropagated into phi, Adam updates phi, and theta and the LSTM state are
carried on, detached, into the next segment. As in the paper the gradients fed to the LSTM are treated as
inputs (d grad f(theta_t) / d phi = 0), so no second derivatives of f are needed.

Gradient preprocessing (the paper's appendix A) maps each gradient coordinate g to two inputs::

    (log|g| / p, sign(g))   if |g| >= e^{-p}
    (-1, e^p g)             otherwise                                             (p = 10)

which keeps inputs of very different magnitudes in a range an LSTM handles.

Optimisee problems (each object holds a batch of P independent problems, optimised in parallel):

- :class:`QuadraticProblems`: f(theta) = ||W theta - y||^2 with W in R^{10x10}, y in R^10 drawn from N(0, 1),
  the paper's synthetic quadratics; theta_0 ~ N(0, 1).
- :class:`MLPProblems`: a one-hidden-layer sigmoid MLP (20 units, as in the paper's MNIST network) on a
  freshly generated toy classification set per problem (4 classes in 2-D, each class a mixture of two
  Gaussian blobs, so the classes are not linearly separable); full-batch cross-entropy.

Baselines: SGD, Adam and RMSprop (``torch.optim``, default momenta) with the learning rate chosen by a grid
search on training problems (:func:`tune_baseline`).

Python API (there is no CLI command; ``benchmarks/lstm_optimizer.py`` runs the whole experiment)::

    >>> import torch
    >>> import fewshot.learned_optim as lo
    >>> net = lo.LSTMOptimizer()
    >>> lo.meta_train(net, lambda g: lo.QuadraticProblems(64, generator=g), iterations=200)
    >>> test = lo.QuadraticProblems(100, generator=torch.Generator().manual_seed(1))
    >>> curve = lo.run_learned(net, test, steps=100)          # losses [101, 100]: f(theta_t) per problem
    >>> lr, _ = lo.tune_baseline("adam", lambda g: lo.QuadraticProblems(64, generator=g), steps=100)
    >>> base = lo.run_baseline("adam", lr, test, steps=100)

:class:`LearnedOptimizer` wraps a trained network as a ``torch.optim.Optimizer`` for ordinary modules.
"""
from __future__ import annotations

import abc
import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .errors import FewshotError

State = List[Tuple[torch.Tensor, torch.Tensor]]
BASELINES = ("sgd", "adam", "rmsprop")
#: learning rates tried for each baseline: 10^-4 .. 10^1 in steps of a third of a decade
LR_GRID = tuple(float(10 ** (e / 3)) for e in range(-12, 4))


# ----------------------------------------------------------------------------------------------- preprocessing
def preprocess_gradients(g: torch.Tensor, p: float = 10.0) -> torch.Tensor:
    """Andrychowicz et al. (2016, appendix A): ``g [...] -> [..., 2]``.

    ``(log|g| / p, sign(g))`` where ``|g| >= e^{-p}``, else ``(-1, e^p g)``.
    """
    if p <= 0:
        raise FewshotError(f"the preprocessing constant p must be positive, got {p}")
    g = g.float() if g.dtype in (torch.float16, torch.bfloat16) else g
    big = g.abs() >= math.exp(-p)
    # clamp inside the log so that the unused branch never produces -inf (and NaN gradients)
    first = torch.where(big, g.abs().clamp_min(math.exp(-p)).log() / p, torch.full_like(g, -1.0))
    second = torch.where(big, torch.sign(g), g * math.exp(p))
    return torch.stack([first, second], -1)


# ----------------------------------------------------------------------------------------------- the optimiser
class LSTMOptimizer(nn.Module):
    """Coordinate-wise LSTM optimiser ``m(grad, h; phi) -> (update, h')`` (Andrychowicz et al. 2016).

    ``layers`` stacked LSTM cells of ``hidden`` units (the paper: 2 x 20) run on every coordinate as a batch
    (the weights are shared, the state is per coordinate); a linear layer maps the top hidden state to the
    update, multiplied by ``output_scale`` (0.1, as in the paper's experiments). Inputs are the preprocessed
    gradient (2 numbers per coordinate) or, with ``preprocess=False``, the raw gradient.
    """

    def __init__(self, hidden: int = 20, layers: int = 2, preprocess: bool = True, p: float = 10.0,
                 output_scale: float = 0.1):
        super().__init__()
        if hidden < 1 or layers < 1:
            raise FewshotError("the LSTM optimiser needs hidden >= 1 and layers >= 1")
        self.hidden, self.layers, self.preprocess, self.p = int(hidden), int(layers), bool(preprocess), float(p)
        self.output_scale = float(output_scale)
        inputs = 2 if preprocess else 1
        self.cells = nn.ModuleList(nn.LSTMCell(inputs if i == 0 else hidden, hidden) for i in range(layers))
        self.out = nn.Linear(hidden, 1)

    def initial_state(self, n: int, device=None, dtype=torch.float32) -> State:
        """Zero hidden and cell states for ``n`` coordinates: one ``(h, c)`` pair ``[n, hidden]`` per layer."""
        z = torch.zeros(n, self.hidden, device=device, dtype=dtype)
        return [(z, z) for _ in range(self.layers)]

    def forward(self, grad: torch.Tensor, state: Optional[State] = None) -> Tuple[torch.Tensor, State]:
        """Updates for gradients ``[n]`` (one per coordinate) and the new state."""
        if grad.dim() != 1:
            raise FewshotError(f"the LSTM optimiser takes a flat gradient [n], got shape {tuple(grad.shape)}")
        if state is None:
            state = self.initial_state(grad.shape[0], grad.device, self.out.weight.dtype)
        x = preprocess_gradients(grad, self.p) if self.preprocess else grad.unsqueeze(-1)
        x = x.to(self.out.weight.dtype)
        new: State = []
        for cell, (h, c) in zip(self.cells, state):
            h, c = cell(x, (h, c))
            new.append((h, c))
            x = h
        return self.out(x).squeeze(-1) * self.output_scale, new

    def step(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
             state: Optional[State] = None) -> Tuple[List[torch.Tensor], State]:
        """``theta_{t+1} = theta_t + g_t`` for parameters of any shapes; returns the new parameters and state."""
        if len(params) != len(grads):
            raise FewshotError(f"{len(params)} parameters but {len(grads)} gradients")
        for p, g in zip(params, grads):
            if p.shape != g.shape:
                raise FewshotError(f"a gradient of shape {tuple(g.shape)} for a parameter of shape {tuple(p.shape)}")
        flat = torch.cat([g.reshape(-1) for g in grads])
        update, state = self(flat, state)
        out, i = [], 0
        for p in params:
            n = p.numel()
            out.append(p + update[i:i + n].view_as(p).to(p.dtype))
            i += n
        return out, state


def detach_state(state: State) -> State:
    return [(h.detach(), c.detach()) for h, c in state]


class LearnedOptimizer(torch.optim.Optimizer):
    """A trained :class:`LSTMOptimizer` as a ``torch.optim.Optimizer``: ``p <- p + m(p.grad)``.

    The LSTM state is kept per coordinate between steps; the set of parameters with gradients must stay the
    same from step to step.
    """

    def __init__(self, params, net: LSTMOptimizer):
        super().__init__(params, {})
        self.net = net
        self._state: Optional[State] = None

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        ps = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not ps:
            return loss
        new, self._state = self.net.step([p.detach() for p in ps], [p.grad for p in ps], self._state)
        for p, q in zip(ps, new):
            p.copy_(q)
        return loss


# ----------------------------------------------------------------------------------------------- problems
class Problems(abc.ABC):
    """A batch of ``batch`` independent optimisee problems; parameters carry the problem index first."""

    batch: int

    @abc.abstractmethod
    def init_params(self) -> List[torch.Tensor]:
        """The starting point theta_0 (the same every call, so all optimisers start alike)."""

    @abc.abstractmethod
    def loss(self, params: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-problem losses ``[batch]``."""


class QuadraticProblems(Problems):
    """``f(theta) = ||W theta - y||^2``, W ``[dim, dim]`` and y ``[dim]`` from N(0, 1); theta_0 ~ N(0, 1)."""

    def __init__(self, batch: int, dim: int = 10, generator: Optional[torch.Generator] = None):
        if batch < 1 or dim < 1:
            raise FewshotError("quadratic problems need batch >= 1 and dim >= 1")
        self.batch, self.dim = int(batch), int(dim)
        self.W = torch.randn(batch, dim, dim, generator=generator)
        self.y = torch.randn(batch, dim, generator=generator)
        self.theta0 = torch.randn(batch, dim, generator=generator)

    def init_params(self) -> List[torch.Tensor]:
        return [self.theta0.clone()]

    def loss(self, params):
        (theta,) = params
        r = (self.W @ theta.unsqueeze(-1)).squeeze(-1) - self.y
        return r.pow(2).sum(-1)


def toy_classification(batch: int, n: int = 128, classes: int = 4, blobs: int = 2, spread: float = 0.35,
                       generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``batch`` toy 2-D data sets: ``x [batch, n, 2]``, ``y [batch, n]``. Each class is a mixture of
    ``blobs`` Gaussian blobs (std ``spread``) with centres uniform in [-2, 2]^2; classes are balanced."""
    centres = torch.rand(batch, classes, blobs, 2, generator=generator) * 4 - 2
    y = torch.arange(n) % classes
    y = y.unsqueeze(0).expand(batch, n).contiguous()
    which = torch.randint(0, blobs, (batch, n), generator=generator)
    c = centres[torch.arange(batch).unsqueeze(1), y, which]                 # [batch, n, 2]
    x = c + spread * torch.randn(batch, n, 2, generator=generator)
    return x, y


class MLPProblems(Problems):
    """A sigmoid MLP ``2 -> hidden -> classes`` trained by full-batch cross-entropy on a toy data set
    (:func:`toy_classification`), one data set and one random initialisation per problem."""

    def __init__(self, batch: int, hidden: int = 20, classes: int = 4, n: int = 128,
                 generator: Optional[torch.Generator] = None):
        if batch < 1 or hidden < 1 or classes < 2 or n < classes:
            raise FewshotError("MLP problems need batch >= 1, hidden >= 1, classes >= 2 and n >= classes")
        self.batch, self.hidden, self.classes = int(batch), int(hidden), int(classes)
        self.x, self.y = toy_classification(batch, n, classes, generator=generator)
        d = self.x.shape[-1]
        self._init = [torch.randn(batch, d, hidden, generator=generator) / math.sqrt(d),
                      torch.zeros(batch, hidden),
                      torch.randn(batch, hidden, classes, generator=generator) / math.sqrt(hidden),
                      torch.zeros(batch, classes)]

    def init_params(self):
        return [t.clone() for t in self._init]

    def logits(self, params) -> torch.Tensor:
        w1, b1, w2, b2 = params
        h = torch.sigmoid(self.x @ w1 + b1.unsqueeze(1))
        return h @ w2 + b2.unsqueeze(1)

    def loss(self, params):
        z = self.logits(params)
        ce = F.cross_entropy(z.reshape(-1, self.classes), self.y.reshape(-1), reduction="none")
        return ce.view(self.batch, -1).mean(1)


PROBLEMS: Dict[str, type] = {"quadratic": QuadraticProblems, "mlp": MLPProblems}


def problem_factory(kind: str, batch: int, **kwargs) -> Callable[[torch.Generator], Problems]:
    """``generator -> Problems`` for ``kind`` in ``quadratic`` | ``mlp``."""
    if kind not in PROBLEMS:
        raise FewshotError(f"unknown optimisee problem {kind!r}; choose from {', '.join(PROBLEMS)}")
    cls = PROBLEMS[kind]
    return lambda g: cls(batch, generator=g, **kwargs)


# ----------------------------------------------------------------------------------------------- running
def problem_grads(problems: Problems, params: Sequence[torch.Tensor]) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """Gradients of every problem's loss at ``params`` (detached: inputs to the optimiser) and the losses."""
    leaves = [p.detach().requires_grad_(True) for p in params]
    with torch.enable_grad():
        losses = problems.loss(leaves)
        grads = torch.autograd.grad(losses.sum(), leaves)   # problems are independent: sum = per problem
    return list(grads), losses.detach()


def run_learned(net: LSTMOptimizer, problems: Problems, steps: int) -> torch.Tensor:
    """Optimise ``problems`` for ``steps`` steps with the learned optimiser: losses ``[steps + 1, batch]``
    (row t: f(theta_t); row 0 is the starting point)."""
    params = problems.init_params()
    state = None
    rows = []
    with torch.no_grad():
        for _ in range(steps):
            grads, losses = problem_grads(problems, params)
            rows.append(losses)
            params, state = net.step(params, grads, state)
        rows.append(problems.loss(params).detach())
    return torch.stack(rows)


def run_baseline(name: str, lr: float, problems: Problems, steps: int) -> torch.Tensor:
    """Optimise ``problems`` with SGD, Adam or RMSprop at ``lr``: losses ``[steps + 1, batch]``."""
    if name not in BASELINES:
        raise FewshotError(f"unknown baseline optimiser {name!r}; choose from {', '.join(BASELINES)}")
    params = [p.detach().clone().requires_grad_(True) for p in problems.init_params()]
    opt = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "rmsprop": torch.optim.RMSprop}[name](params, lr=lr)
    rows = []
    for _ in range(steps):
        with torch.enable_grad():
            losses = problems.loss(params)
            opt.zero_grad()
            losses.sum().backward()
        rows.append(losses.detach())
        opt.step()
    with torch.no_grad():
        rows.append(problems.loss(params).detach())
    return torch.stack(rows)


def _final_score(curve: torch.Tensor) -> float:
    """Mean final loss; a diverged run (any non-finite loss) scores +inf."""
    if not bool(torch.isfinite(curve).all()):
        return math.inf
    return float(curve[-1].mean())


def tune_baseline(name: str, make: Callable[[torch.Generator], Problems], steps: int,
                  lrs: Sequence[float] = LR_GRID, seed: int = 0) -> Tuple[float, Dict[float, float]]:
    """Grid search of ``name``'s learning rate on training problems ``make(generator)``: the lr with the
    lowest mean loss after ``steps`` steps, and every lr's score."""
    problems = make(torch.Generator().manual_seed(seed))
    scores = {float(lr): _final_score(run_baseline(name, lr, problems, steps)) for lr in lrs}
    best = min(scores, key=lambda k: scores[k])
    if not math.isfinite(scores[best]):
        raise FewshotError(f"{name} diverged at every learning rate tried")
    return best, scores


def meta_train(net: LSTMOptimizer, make: Callable[[torch.Generator], Problems], iterations: int,
               unroll: int = 20, horizon: int = 100, lr: float = 1e-3, clip: float = 1.0, seed: int = 0,
               log: Optional[Callable[[int, float], None]] = None) -> List[float]:
    """Meta-train ``net`` by truncated BPTT; returns the meta-loss of every iteration.

    Each iteration draws a fresh batch of problems ``make(generator)`` and optimises it for ``horizon``
    steps in segments of ``unroll``; each segment's meta-loss ``(1/unroll) sum_t mean_problems f(theta_t)``
    is backpropagated into the LSTM's weights (gradient norm clipped at ``clip``, 0: off) and Adam(``lr``)
    steps once per segment. The returned value per iteration is the mean over its segments.
    """
    if unroll < 1 or horizon < unroll or iterations < 1:
        raise FewshotError("meta-training needs iterations >= 1 and 1 <= unroll <= horizon")
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    history = []
    net.train()
    for it in range(iterations):
        problems = make(g)
        params = problems.init_params()
        state = None
        seg_losses = []
        for _ in range(horizon // unroll):
            meta = 0.0
            with torch.enable_grad():
                for _ in range(unroll):
                    grads, _ = problem_grads(problems, params)
                    params, state = net.step(params, grads, state)
                    meta = meta + problems.loss(params).mean()
                meta = meta / unroll
                opt.zero_grad()
                meta.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
            opt.step()
            params = [p.detach() for p in params]
            state = detach_state(state)
            seg_losses.append(float(meta.detach()))
        history.append(sum(seg_losses) / len(seg_losses))
        if log is not None:
            log(it, history[-1])
    return history


def mean_ci(values: torch.Tensor) -> Tuple[float, float]:
    """Mean and 95% confidence half-width ``1.96 sigma / sqrt(n)`` of a 1-D tensor."""
    v = values.double().flatten()
    n = v.numel()
    sd = float(v.std(correction=1)) if n > 1 else 0.0
    return float(v.mean()), 1.96 * sd / math.sqrt(n)

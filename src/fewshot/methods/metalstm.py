"""Meta-LSTM learner: "Optimization as a model for few-shot learning" (Ravi & Larochelle, ICLR 2017).

The update of an LSTM cell state, ``c_t = f_t * c_{t-1} + i_t * c~_t``, is gradient descent when the cell
state holds the learner's parameters (c_t = theta_t), the candidate is the negative gradient
(c~_t = -grad_{theta_{t-1}} L_t), f_t = 1 and i_t = alpha. The meta-learner learns both gates per
coordinate -- the input gate as an adaptive learning rate, the forget gate as an adaptive weight decay::

    i_t = sigma(W_I [h_t, theta_{t-1}, i_{t-1}] + b_I)
    f_t = sigma(W_F [h_t, theta_{t-1}, f_{t-1}] + b_F)
    theta_t = c_t = f_t * c_{t-1} + i_t * (-grad_t)

and the learner's initial parameters theta_0 = c_0. As in the paper the meta-learner has two layers, both
shared across coordinates: a standard LSTM (``lstm_hidden`` = 20 units) reads each coordinate's
preprocessed gradient and the preprocessed support loss (Andrychowicz et al. 2016's log-magnitude / sign
transform, p = 10; see :func:`fewshot.learned_optim.preprocess_gradients`) and its hidden state h_t feeds
the two gates above. (The paper writes the gate inputs as [grad_t, L_t, theta_{t-1}, i_{t-1}]; grad_t and
L_t enter through h_t.) Gate weights start in U(-0.01, 0.01), b_F in U(4, 6) (f ~ 1: keep the parameters)
and b_I in U(-5, -4) (i ~ 0.01: a small learning rate), as the paper recommends.

Per task: T = ``inner_steps`` updates on the whole support set, then the query loss at theta_T; its
gradient trains the meta-learner and theta_0. As in the paper, the learner's gradients and losses are
inputs to the meta-learner (no second derivatives through grad_t); the meta-gradient flows through the
cell states and the gates. Batch norm in the learner always normalises with the statistics of the batch at
hand (the support set during adaptation, the task's query set at the end): transductive, as in the paper.

Defaults: the learner is the paper's Conv-4 with 32 channels and a linear head of ``outputs`` classes (the
run's ways). The paper uses T = 12 updates for 1-shot and 5 for 5-shot; ``inner_steps`` defaults to 12 and
``test_steps`` (0: the same) sets T at evaluation. The paper trains with Adam and clips gradients; the run
defaults clip the meta-gradient norm at 0.25.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..errors import FewshotError
from ..learned_optim import preprocess_gradients
from ..models.meta import head_inputs, meta_network
from . import register
from .base import BackboneOptions, Method, accuracy, infer_ways
from .gbml import task_loss

BN = ("transductive", "none")


def cell_update(c_prev: torch.Tensor, grad: torch.Tensor, f: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
    """``c_t = f_t * c_{t-1} + i_t * (-grad_t)``: the learner's new parameters."""
    return f * c_prev - i * grad


def gate(w: torch.Tensor, b: torch.Tensor, h: torch.Tensor, c_prev: torch.Tensor, g_prev: torch.Tensor):
    """``sigma(w . [h, c_{t-1}, g_{t-1}] + b)`` for every coordinate: ``h [n, H]``, ``c_prev``/``g_prev [n]``,
    ``w [H + 2]`` -> ``[n]``."""
    H = h.shape[1]
    return torch.sigmoid(h @ w[:H] + c_prev * w[H] + g_prev * w[H + 1] + b)


@register("metalstm")
class MetaLSTM(Method):
    """Meta-LSTM learner (Ravi & Larochelle 2017): an LSTM whose cell state is the learner's parameters."""

    @dataclass
    class Config(BackboneOptions):
        #: the learner, head included: conv4 for images, mlp for vectors, or any other backbone (a name,
        #: package.module:factory, file.py:factory, timm:NAME; its every parameter is a cell of the LSTM)
        backbone: str = "auto"
        hidden: int = 32                #: learner conv4 channels (the paper: 32)
        mlp_hidden: List[int] = field(default_factory=lambda: [40, 40])  #: mlp hidden sizes
        outputs: int = 0                #: learner head size (0: the run's --ways)
        bn: str = "transductive"        #: learner batch norm: transductive (batch statistics) | none
        inner_steps: int = 12           #: T, learner updates on the support (paper: 12 for 1-shot, 5 for 5-shot)
        test_steps: int = 0             #: T at evaluation and prediction (0: inner_steps)
        lstm_hidden: int = 20           #: units of the first (standard, coordinate-wise) LSTM layer
        preprocess_p: float = 10.0      #: p of the gradient/loss preprocessing
        forget_bias_min: float = 4.0    #: b_F ~ U(forget_bias_min, forget_bias_max): f starts near 1
        forget_bias_max: float = 6.0    #: upper end of the b_F range
        input_bias_min: float = -5.0    #: b_I ~ U(input_bias_min, input_bias_max): i starts near 0.01
        input_bias_max: float = -4.0    #: upper end of the b_I range

    run_defaults = {"ways": 5, "shots": 1, "queries": 15, "batch": 4, "val_queries": 15,
                    "train": {"schedule": "none", "lr": 1e-3, "grad_clip": 0.25}}

    def __init__(self, config: "MetaLSTM.Config", in_shape):
        super().__init__(config, in_shape)
        c = config
        if c.bn not in BN:
            raise FewshotError(f"metalstm batch norm must be one of {', '.join(BN)}, got {c.bn!r}")
        if c.outputs < 1:
            raise FewshotError("outputs (the learner's head size, usually the ways) must be set")
        if c.inner_steps < 0 or c.test_steps < 0:
            raise FewshotError("inner_steps and test_steps must be at least 0")
        if c.lstm_hidden < 1:
            raise FewshotError("lstm_hidden must be at least 1")
        for name in ("forget_bias", "input_bias"):
            lo, hi = getattr(c, name + "_min"), getattr(c, name + "_max")
            if lo > hi:
                raise FewshotError(f"{name}_min ({lo}) must not exceed {name}_max ({hi})")
        #: the learner; its parameters are theta_0 = c_0 (meta-learned)
        if self._build.backbone is None and c.backbone in ("auto", "conv4", "mlp"):
            self.net = self.make_backbone(head="head", own=lambda kind: meta_network(
                kind, self.in_shape, c.outputs, c.hidden, c.mlp_hidden, c.bn, 1))
        else:
            from ..models.functional import FunctionalNet
            self.net = FunctionalNet(self.make_backbone(outputs=c.outputs), self.in_shape, c.bn, 1,
                                     name=c.backbone)
        self._names = [n for n, _ in self.net.named_parameters()]
        self._shapes = [p.shape for _, p in self.net.named_parameters()]
        # the meta-learner: LSTM over (preprocessed grad, preprocessed loss), then the two gates
        self.lstm = nn.LSTMCell(4, c.lstm_hidden)
        H = c.lstm_hidden
        self.w_f = nn.Parameter(torch.empty(H + 2).uniform_(-0.01, 0.01))
        self.w_i = nn.Parameter(torch.empty(H + 2).uniform_(-0.01, 0.01))
        self.b_f = nn.Parameter(torch.empty(()).uniform_(c.forget_bias_min, c.forget_bias_max))
        self.b_i = nn.Parameter(torch.empty(()).uniform_(c.input_bias_min, c.input_bias_max))

    @property
    def inference_mode(self) -> str:
        return "transductive" if self.config.bn == "transductive" else "inductive"

    # ------------------------------------------------------------------ the learner as a flat cell state
    @property
    def num_learner_params(self) -> int:
        return sum(s.numel() for s in self._shapes)

    def theta0(self) -> torch.Tensor:
        """c_0: the learner's (meta-learned) initial parameters as one flat fp32 vector."""
        return torch.cat([p.reshape(-1) for p in self.net.parameters()]).float()

    def unflatten(self, c: torch.Tensor) -> Dict[str, torch.Tensor]:
        parts = torch.split(c, [s.numel() for s in self._shapes])
        return {n: t.view(s) for n, t, s in zip(self._names, parts, self._shapes)}

    def learner(self, c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The learner's outputs on ``x [M, ...]`` with parameters ``c`` (flat)."""
        out, _ = functional_call(self.net, self.unflatten(c), (x,), {"step": 0})
        return out

    def _support_grad(self, c: torch.Tensor, x, y) -> Tuple[torch.Tensor, torch.Tensor]:
        """Gradient and value of the support loss at ``c``, both detached (inputs to the meta-learner)."""
        leaf = c.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = task_loss(self.learner(leaf, x), y, "ce")
            (g,) = torch.autograd.grad(loss, leaf)
        return g.detach().float(), loss.detach().float()

    # ------------------------------------------------------------------ the meta-learner
    def meta_step(self, c, grad, loss, state):
        """One coordinate-wise meta-learner step: ``state = (h, s, f_prev, i_prev)`` -> new ``c`` and state.

        Runs in fp32 (autocast off): the gates and the cell state are the learner's weights."""
        h, s, f_prev, i_prev = state
        n = c.shape[0]
        with torch.autocast(c.device.type, enabled=False):
            p = self.config.preprocess_p
            x = torch.cat([preprocess_gradients(grad, p), preprocess_gradients(loss.view(1), p).expand(n, 2)], 1)
            h, s = self.lstm(x, (h, s))
            f = gate(self.w_f, self.b_f, h, c, f_prev)
            i = gate(self.w_i, self.b_i, h, c, i_prev)
            c = cell_update(c, grad, f, i)
        return c, (h, s, f, i)

    def initial_state(self, n: int, device) -> tuple:
        z = torch.zeros(n, self.config.lstm_hidden, device=device)
        zn = torch.zeros(n, device=device)
        return z, z, zn, zn

    def adapt(self, sx: torch.Tensor, sy: torch.Tensor, steps: int, meta_grad: bool = True,
              record: Optional[list] = None) -> torch.Tensor:
        """theta_T for one task (support ``sx [S, ...]``, ``sy [S]``) after ``steps`` meta-learner updates.

        ``meta_grad``: keep the graph from theta_0 and the meta-learner's weights to theta_T (training);
        otherwise every step runs without a graph. ``record`` receives ``(mean i_t, mean f_t)`` per step."""
        c = self.theta0()
        if not meta_grad:
            c = c.detach()
        state = self.initial_state(c.shape[0], c.device)
        for _ in range(steps):
            grad, loss = self._support_grad(c, sx, sy)
            with torch.set_grad_enabled(meta_grad and torch.is_grad_enabled()):
                c, state = self.meta_step(c, grad, loss, state)
            if record is not None:
                record.append((float(state[3].mean()), float(state[2].mean())))
        return c

    # ------------------------------------------------------------------ the contract
    def _check_ways(self, ways: int) -> None:
        head = self.config.outputs
        if ways > head:
            raise FewshotError(f"this metalstm model has a {head}-way head; it cannot classify {ways}-way tasks "
                               f"(train it with --ways {ways})")

    def loss(self, episode):
        self._check_ways(episode.ways)
        T = self.config.inner_steps
        losses, logits = [], []
        for b in range(episode.batch):
            c = self.adapt(episode.support_x[b], episode.support_y[b], T, meta_grad=True)
            out = self.learner(c, episode.query_x[b]).float()[:, :episode.ways]
            losses.append(F.cross_entropy(out, episode.query_y[b]))
            logits.append(out.detach())
        loss = torch.stack(losses).mean()
        acc = accuracy(torch.stack(logits), episode.query_y)
        return loss, {"ce": float(loss.detach()), "acc": float(acc.mean())}

    def predict(self, support_x, support_y, query_x, ways=None, steps: Optional[int] = None):
        """Adapt theta_0 to each task's support with the meta-learner (``steps``, default ``test_steps``)
        and return the query logits ``[B, M, ways]``."""
        ways = infer_ways(support_y, ways)
        self._check_ways(ways)
        c = self.config
        steps = (c.test_steps or c.inner_steps) if steps is None else int(steps)
        outs = []
        for b in range(support_x.shape[0]):
            theta = self.adapt(support_x[b], support_y[b], steps, meta_grad=False)
            with torch.no_grad():
                outs.append(self.learner(theta, query_x[b]).float()[:, :ways])
        return torch.stack(outs)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Learner features before the head, with theta_0 (for plots)."""
        return head_inputs(self.net, x)

    def extra_plots(self, run, dataset, out_dir) -> list:
        """``metalstm_gates.png``: the mean input gate (learning rate) and forget gate over the inner steps,
        on 20 held-out tasks of the run's test setting (each task a thin line, their mean thick)."""
        from ..episodes import EpisodeSampler
        from ..figures import pyplot, save_figure
        from pathlib import Path
        cfg = run.config
        ways = min(int(cfg.test_ways), self.config.outputs, len(dataset))
        per_class = min(len(dataset.images(k)) for k in range(len(dataset)))
        shots = max(1, min(int(cfg.test_shots), per_class - 1))
        queries = max(1, min(int(cfg.test_queries), per_class - shots))
        sampler = EpisodeSampler(dataset, ways, shots, queries, batch=20, device=run.device, seed=0)
        ep = sampler.sample()
        steps = self.config.test_steps or self.config.inner_steps
        was = self.training
        self.eval()
        curves = []
        try:
            for b in range(ep.batch):
                rec: list = []
                self.adapt(ep.support_x[b], ep.support_y[b], steps, meta_grad=False, record=rec)
                curves.append(rec)
        finally:
            self.train(was)
        if not steps:
            return []
        plt = pyplot()
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        t = list(range(1, steps + 1))
        for k, (ax, title) in enumerate(zip(axes, ("input gate i_t (learning rate)", "forget gate f_t"))):
            vals = torch.tensor([[r[k] for r in rec] for rec in curves])
            for row in vals:
                ax.plot(t, row.tolist(), color="tab:blue", alpha=0.2, lw=0.8)
            ax.plot(t, vals.mean(0).tolist(), color="tab:blue", lw=2)
            ax.set_xlabel("inner step t")
            ax.set_xticks(t if steps <= 20 else t[::max(1, steps // 10)])
            ax.set_title(f"mean {title} over coordinates")
        fig.suptitle(f"metalstm on {ep.batch} held-out {ways}-way {shots}-shot tasks")
        return [save_figure(plt, fig, Path(out_dir) / "metalstm_gates.png")]

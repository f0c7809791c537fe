"""Matching networks (Vinyals, Blundell, Lillicrap, Kavukcuoglu & Wierstra 2016, "Matching Networks for One
Shot Learning", NeurIPS).

A query x̂ is labelled by attention over the labelled support S = {(x_i, y_i)}:

    a(x̂, x_i) = exp(s c_i) / Σ_j exp(s c_j),   c_i = cos(f(x̂), g(x_i)),
    P(y = n | x̂, S) = Σ_i a(x̂, x_i) 1[y_i = n].

The logits returned are the exact log-probabilities, computed stably as
``log P(n) = logsumexp_{i: y_i = n}(s c_i) - logsumexp_i(s c_i)`` (never ``log`` of a sum of small
probabilities), and the loss is their negative log-likelihood on the query labels.

Scale s. The paper uses the plain cosine (s = 1). Cosines lie in [-1, 1], so with s = 1 the attention can never
be sharp: in a 5-way 1-shot task the best possible probability of the right class is e / (e + 4/e) ~ 0.65,
the NLL cannot fall below ~0.43 and its gradient keeps pushing every cosine to +-1 instead of shaping the
embedding. We therefore learn s (``learn_scale``, initialised at ``scale`` = 10, as the learned temperature
of cosine classifiers, e.g. Gidaris & Komodakis 2018, Oreshkin et al. 2018); ``--learn-scale false --scale 1``
gives the paper's exact model.

Full context embeddings (``fce``), paper Appendix A.2 (f' is the backbone):

- support: g(x_i, S) = h_fwd_i + h_bwd_i + f'(x_i), a bidirectional LSTM over the support embeddings with a
  skip connection. The BiLSTM reads the support *in the order given*; episodes present it class by class
  (label 0's shots first), so this order, not a random one, is what it learns from. Everything else is
  invariant to the order of the support.
- query: an LSTM run for K = ``fce_steps`` processing steps attending over g(S):
  ĥ_k, c_k = LSTM(f'(x̂), [h_{k-1}, r_{k-1}], c_{k-1});  h_k = ĥ_k + f'(x̂);
  r_k = Σ_i softmax_i(h_k · g(x_i)) g(x_i);  f(x̂, S) = h_K,   with h_0 = f'(x̂), r_0 = 0, c_0 = 0.
  The recurrent weights read the concatenated state [h_{k-1}, r_{k-1}] (2D numbers); the cell has D units.
  All tasks and queries are processed at once (no loop over queries). Queries do not see each other.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FewshotError
from . import register
from .base import Method, accuracy, infer_ways, add_log_scale
from ..models.backbones import feature_dim
from .protonet import encoder, EncoderOptions


def cosine_matrix(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Cosine similarities between queries ``[B, M, D]`` and support ``[B, S, D]`` -> ``[B, M, S]``
    (norms clamped at 1e-8, so a zero vector has cosine 0 with everything)."""
    qn = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    sn = s / s.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    return qn @ sn.transpose(1, 2)


def attention_log_probs(att_logits: torch.Tensor, support_y: torch.Tensor, ways: int) -> torch.Tensor:
    """log Σ_{i in class n} softmax_i(att_logits): ``[B, M, S]`` attention logits and support labels ``[B, S]``
    -> class log-probabilities ``[B, M, ways]``, as a difference of two logsumexps (exact and stable)."""
    onehot = F.one_hot(support_y, ways).bool()                              # [B, S, N]
    if bool((~onehot.any(1)).any()):
        raise FewshotError("every class of a task needs at least one support example")
    masked = att_logits.unsqueeze(-1).masked_fill(~onehot.unsqueeze(1), float("-inf"))   # [B, M, S, N]
    return masked.logsumexp(2) - att_logits.logsumexp(-1, keepdim=True)


class AttentionLSTM(nn.Module):
    """The query side of full context embeddings: K steps of an LSTM whose recurrent input is the state
    [h_{k-1}, r_{k-1}] (see the module docstring); batched over every query of every task."""

    def __init__(self, dim: int, steps: int):
        super().__init__()
        self.dim, self.steps = dim, int(steps)
        self.inp = nn.Linear(dim, 4 * dim)                 # W_x f'(x̂) + b
        self.rec = nn.Linear(2 * dim, 4 * dim, bias=False)  # W_h [h_{k-1}, r_{k-1}]

    def read(self, h: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """r = Σ_i softmax_i(h · g_i) g_i for queries ``h`` ``[B, M, D]`` over the support ``g`` ``[B, S, D]``."""
        return (h @ g.transpose(1, 2)).softmax(-1) @ g

    def forward(self, zq: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """f(x̂, S) ``[B, M, D]`` for query embeddings ``zq`` ``[B, M, D]`` and support ``g`` ``[B, S, D]``."""
        h, r, c = zq, torch.zeros_like(zq), torch.zeros_like(zq)
        x_part = self.inp(zq)
        for _ in range(self.steps):
            i, f, o, u = (x_part + self.rec(torch.cat([h, r], -1))).chunk(4, -1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(u)
            h = torch.sigmoid(o) * torch.tanh(c) + zq
            r = self.read(h, g)
        return h


@register("matching")
class MatchingNet(Method):
    """Matching network: softmax attention over cosine similarities to the support (Vinyals et al. 2016)."""

    @dataclass
    class Config(EncoderOptions):
        fce: bool = False               #: full context embeddings (BiLSTM support, attention-LSTM queries)
        fce_steps: int = 5              #: K processing steps of the query LSTM (the paper does not fix K)
        learn_scale: bool = True        #: learn the scale s of the cosines (see the module docstring)
        scale: float = 10.0             #: (initial) scale s; 1 with learn_scale false is the paper's model

    run_defaults = {"ways": 5, "shots": 1, "queries": 15, "val_queries": 15}

    def __init__(self, config: "MatchingNet.Config", in_shape):
        super().__init__(config, in_shape)
        if config.scale <= 0:
            raise FewshotError(f"scale must be positive, got {config.scale}")
        if config.fce and config.fce_steps < 1:
            raise FewshotError(f"fce_steps must be at least 1, got {config.fce_steps}")
        self.backbone = encoder(self)
        add_log_scale(self, config.scale, config.learn_scale)
        if config.fce:
            dim = feature_dim(self.backbone, self.in_shape)
            self.support_lstm = nn.LSTM(dim, dim, batch_first=True, bidirectional=True)
            self.query_lstm = AttentionLSTM(dim, config.fce_steps)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """f'(x): the backbone's features (context-free; FCE needs a support set)."""
        return self.backbone(x)

    def _embed_both(self, sx: torch.Tensor, qx: torch.Tensor):
        B, S, Q = sx.shape[0], sx.shape[1], qx.shape[1]
        z = self.backbone(torch.cat([sx.flatten(0, 1), qx.flatten(0, 1)]))
        return z[:B * S].view(B, S, -1), z[B * S:].view(B, Q, -1)

    def context(self, zs: torch.Tensor, zq: torch.Tensor):
        """(g(S), f(x̂, S)): full context embeddings when ``fce`` is on, else the inputs unchanged."""
        if not self.config.fce:
            return zs, zq
        out, _ = self.support_lstm(zs)                     # [B, S, 2D]: forward and backward halves
        D = zs.shape[-1]
        g = out[..., :D] + out[..., D:] + zs
        return g, self.query_lstm(zq, g)

    def match(self, g: torch.Tensor, support_y: torch.Tensor, f: torch.Tensor, ways: int) -> torch.Tensor:
        """Class log-probabilities ``[B, M, ways]`` from support ``g`` ``[B, S, D]`` and queries ``f``
        ``[B, M, D]`` (in fp32, also under bf16 autocast)."""
        with torch.autocast(g.device.type, enabled=False):
            att = cosine_matrix(f.float(), g.float()) * self.log_scale.float().exp()
            return attention_log_probs(att, support_y, ways)

    def predict(self, support_x, support_y, query_x, ways=None):
        ways = infer_ways(support_y, ways)
        zs, zq = self._embed_both(support_x, query_x)
        g, f = self.context(zs, zq)
        return self.match(g, support_y, f, ways)

    def loss(self, episode):
        logp = self.predict(episode.support_x, episode.support_y, episode.query_x, episode.ways)
        loss = F.nll_loss(logp.flatten(0, 1), episode.query_y.flatten())
        return loss, {"ce": float(loss.detach()), "acc": float(accuracy(logp.detach(), episode.query_y).mean()),
                      "scale": float(self.log_scale.detach().exp())}

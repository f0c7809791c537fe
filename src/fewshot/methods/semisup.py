"""Semi-supervised prototypical networks (Ren, Triantafillou, Ravi, Snell, Swersky, Tenenbaum, Larochelle &
Zemel 2018, "Meta-learning for semi-supervised few-shot classification").

Each task has a labelled support S, queries Q and unlabelled examples R (``episode.extra["unlabeled_x"]``;
some may come from *distractor* classes that are none of the task's ways). Prototypes start as the class
means of S (squared Euclidean, as in the prototypical network) and are refined by soft k-means over R:

    z~_jc = softmax_c( -||h(x~_j) - p_c||^2 )                                          (soft assignment)
    p~_c  = ( sum_i h(x_i) z_ic + sum_j h(x~_j) z~_jc ) / ( sum_i z_ic + sum_j z~_jc )   (z_ic = 1[y_i = c])

and the queries are classified by softmax(-||h(x) - p~_c||^2) over the N refined prototypes. Modes:

- ``kmeans``: the plain refinement above.
- ``distractor``: an extra cluster for unlabelled examples of no class, centred at the origin, with a
  learned length scale r: its assignment logit is -||h - 0||^2 / r^2 - A(r), A(r) = 1/2 log(2 pi) + log r
  (the N class clusters keep r = 1 and A(1) = 1/2 log(2 pi), the same constant for all of them). The
  distractor cluster is dropped before classifying the queries.
- ``masked``: each class cluster c computes normalised distances d~_jc = d_jc / mean_j d_jc of the unlabelled
  examples, and a small MLP maps their statistics over j (min, max, variance, skewness, kurtosis) to a soft
  threshold beta_c and slope gamma_c; unlabelled example j counts in cluster c with weight
  z~_jc * sigmoid(-gamma_c (d~_jc - beta_c)), so far-away points (likely distractors) are masked out.

``steps`` refinement steps are applied (the paper trains and tests with one). With no unlabelled examples in
an episode the method is exactly a prototypical network. ``fewshot predict`` has labelled support and
queries only; with ``transductive_predict`` the queries themselves serve as the unlabelled set there.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FewshotError
from . import register
from .base import accuracy, infer_ways
from .protonet import EncoderOptions, ProtoNet, distance, prototypes

MODES = ("kmeans", "distractor", "masked")
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _moments(d: torch.Tensor) -> torch.Tensor:
    """Min, max, variance, skewness and kurtosis over the unlabelled axis: ``[B, U, C]`` -> ``[B, C, 5]``."""
    mean = d.mean(1, keepdim=True)
    c = d - mean
    var = c.pow(2).mean(1)
    std = var.clamp_min(1e-8).sqrt()
    skew = c.pow(3).mean(1) / std.pow(3)
    kurt = c.pow(4).mean(1) / std.pow(4)
    return torch.stack([d.min(1).values, d.max(1).values, var, skew, kurt], dim=-1)


def refine_prototypes(protos: torch.Tensor, zs: torch.Tensor, ys: torch.Tensor, zu: torch.Tensor,
                      mode: str = "kmeans", steps: int = 1, log_radius: torch.Tensor | None = None,
                      mask_net: nn.Module | None = None) -> torch.Tensor:
    """Soft k-means refinement of prototypes ``[B, N, D]`` with unlabelled embeddings ``zu`` ``[B, U, D]``.

    ``zs``/``ys`` are the labelled support embeddings and labels (they keep weight 1 for their class).
    ``log_radius`` (``distractor`` mode) is log r of the distractor cluster; ``mask_net`` (``masked`` mode)
    maps the 5 distance statistics of a cluster to (beta, gamma). Returns the refined ``[B, N, D]``.
    """
    B, N, D = protos.shape
    onehot = F.one_hot(ys, N).to(zs.dtype)                           # [B, S, N]
    sup_sum = onehot.transpose(1, 2) @ zs                            # [B, N, D]
    sup_cnt = onehot.sum(1)                                          # [B, N]
    p = protos
    for _ in range(steps):
        if mode == "distractor":
            # the distractor cluster sits at the origin and is re-estimated like the others
            p = torch.cat([p, torch.zeros_like(p[:, :1])], dim=1) if p.shape[1] == N else p
        d = distance(zu, p, "sqeuclidean")                           # [B, U, N(+1)]
        if mode == "distractor":
            r2 = (2 * log_radius).exp()
            logit = torch.cat([-d[..., :N] - _HALF_LOG_2PI,
                               -d[..., N:] / r2 - (_HALF_LOG_2PI + log_radius)], dim=-1)
        else:
            logit = -d
        z = logit.softmax(-1)                                        # [B, U, N(+1)]
        if mode == "masked":
            dn = d / d.mean(1, keepdim=True).clamp_min(1e-8)        # normalised distances
            beta, gamma = mask_net(_moments(dn)).unbind(-1)          # [B, N] each
            z = z * torch.sigmoid(-gamma.unsqueeze(1) * (dn - beta.unsqueeze(1)))
        zc = z[..., :N]                                              # class clusters only
        num = sup_sum + zc.transpose(1, 2) @ zu
        den = sup_cnt + zc.sum(1)
        new = num / den.unsqueeze(-1)
        if mode == "distractor":
            zd = z[..., N:]
            dist = (zd.transpose(1, 2) @ zu) / zd.sum(1).clamp_min(1e-8).unsqueeze(-1)
            p = torch.cat([new, dist], dim=1)
        else:
            p = new
    return p[:, :N]


@register("semisup")
class SemiSupervisedProtoNet(ProtoNet):
    """Semi-supervised prototypical network: soft k-means over unlabelled examples (Ren et al. 2018)."""

    compilable = False       #: soft k-means refinement: not checked under torch.compile

    @dataclass
    class Config(EncoderOptions):
        mode: str = "kmeans"            #: kmeans | distractor | masked
        steps: int = 1                  #: soft k-means refinement steps
        mask_hidden: int = 20           #: masked mode: hidden units of the threshold/slope MLP
        transductive_predict: bool = False  #: ``fewshot predict``: refine with the queries as unlabelled set

    def __init__(self, config: "SemiSupervisedProtoNet.Config", in_shape):
        if config.mode not in MODES:
            raise FewshotError(f"unknown semi-supervised mode {config.mode!r}; choose from {', '.join(MODES)}")
        if config.steps < 1:
            raise FewshotError(f"steps must be at least 1, got {config.steps}")
        base = ProtoNet.Config(**{f.name: getattr(config, f.name) for f in fields(EncoderOptions)})
        super().__init__(base, in_shape)
        config.backbone = base.backbone         # as recorded by make_backbone (a module given in Python)
        self.config = config
        self.log_radius = nn.Parameter(torch.zeros(())) if config.mode == "distractor" else None
        self.mask_net = None
        if config.mode == "masked":
            self.mask_net = nn.Sequential(nn.Linear(5, config.mask_hidden), nn.Tanh(),
                                          nn.Linear(config.mask_hidden, 2))
            # start as "keep everything closer than the mean distance, with a moderate slope"
            nn.init.zeros_(self.mask_net[2].weight)
            with torch.no_grad():
                self.mask_net[2].bias.copy_(torch.tensor([1.0, 1.0]))

    def _embed_all(self, xs):
        """Embed several ``[B, n_i, ...]`` tensors in one backbone pass -> list of ``[B, n_i, D]``."""
        B = xs[0].shape[0]
        z = self.backbone(torch.cat([x.flatten(0, 1) for x in xs]))
        parts = z.split([B * x.shape[1] for x in xs])
        return [p.view(B, x.shape[1], -1) for p, x in zip(parts, xs)]

    def _semi_logits(self, support_x, support_y, query_x, ways, unlabeled_x=None):
        ways = infer_ways(support_y, ways)
        if unlabeled_x is None or unlabeled_x.shape[1] == 0:
            zs, zq = self._embed_all([support_x, query_x])
            zu = None
        else:
            zs, zq, zu = self._embed_all([support_x, query_x, unlabeled_x])
        with torch.autocast(zs.device.type, enabled=False):
            zs, zq = zs.float(), zq.float()
            p = prototypes(zs, support_y, ways)
            if zu is not None:
                p = refine_prototypes(p, zs, support_y, zu.float(), self.config.mode, self.config.steps,
                                      self.log_radius, self.mask_net)
            return -distance(zq, p, "sqeuclidean")

    def predict(self, support_x, support_y, query_x, ways=None, unlabeled_x=None):
        if unlabeled_x is None and self.config.transductive_predict:
            unlabeled_x = query_x
        return self._semi_logits(support_x, support_y, query_x, ways, unlabeled_x)

    def predict_episode(self, episode):
        return self._semi_logits(episode.support_x, episode.support_y, episode.query_x, episode.ways,
                                 episode.extra.get("unlabeled_x"))

    def loss(self, episode):
        logits = self.predict_episode(episode)
        loss = F.cross_entropy(logits.flatten(0, 1), episode.query_y.flatten())
        metrics = {"ce": float(loss.detach()), "acc": float(accuracy(logits.detach(), episode.query_y).mean())}
        if self.log_radius is not None:
            metrics["radius"] = float(self.log_radius.detach().exp())
        return loss, metrics

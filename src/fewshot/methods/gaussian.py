"""Gaussian prototypical networks (Fort 2017, "Gaussian Prototypical Networks for Few-Shot Learning on
Omniglot", arXiv:1708.02735).

The encoder maps an image to an embedding x (size D) *and* a raw covariance part r: one number per image
("radius", an isotropic Gaussian) or one per embedding dimension ("diagonal"). The raw part becomes a
diagonal *inverse* covariance s (every entry >= 1 for the fixed transforms) by one of

- ``softplus``: s = 1 + softplus(r),
- ``sigmoid``:  s = 1 + sigmoid(r),
- ``sigmoid4``: s = 1 + 4 sigmoid(r),
- ``learned``:  s = offset + scale * softplus(r / div), with offset, scale and div trainable (init 1.0).

A class prototype is the precision-weighted mean of its support embeddings, per dimension,

    p_c = sum_i s_i * x_i / sum_i s_i,

and the class's inverse covariance is the *sum* of its examples' inverse covariances, S_c = sum_i s_i
(Fort's choice, also in his released code: the class covariance combines the support points' confidence regions as independent
Gaussian measurements of one point, so precisions add; a class seen through many confident examples gets
a tighter metric). The distance of a query embedding q to class c is the Mahalanobis distance under S_c,

    d_c(q) = sqrt((q - p_c)^T diag(S_c) (q - p_c)),

and p(y = c | q) = softmax_c(-d_c(q)). Fort uses the distance itself, not its square, as the (negative)
logit; ``squared=true`` uses -d^2 instead, the prototypical-network convention. Only the class's inverse
covariance enters the distance (the query's own s is not used).

Defaults: radius covariance, 1 + softplus, D = 64 (the configuration of the author's released code, whose
distance is likewise the non-squared ||(q - p_c) * sqrt(S_c)|| used as a negative logit).

Encoder (images): 4 x [conv 3x3, ReLU, max-pool 2] with channels [64, 64, 64, D + c] and no batch norm by
default (``batch_norm=true`` adds batch norm to every layer; the released code normalises every layer),
c = 1 (radius) or D (diagonal). The first D channels are the embedding,
the rest the raw covariance; when the last feature map is larger than 1x1 the embedding is the flattened
D-channel map, and the raw covariance is the spatial mean of the covariance channel (radius) or the
flattened covariance channels (diagonal, one entry per embedding entry). Vector inputs use an MLP whose
output is split the same way (``batch_norm`` applies to its hidden layers too).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FewshotError
from ..models import Conv4, MLP
from ..models.backbones import feature_dim
from . import register
from .base import BackboneOptions, Method, accuracy, infer_ways

COVARIANCES = ("radius", "diagonal")
TRANSFORMS = ("softplus", "sigmoid", "sigmoid4", "learned")


class InverseCovariance(nn.Module):
    """Raw covariance output -> diagonal inverse covariance by one of :data:`TRANSFORMS`."""

    def __init__(self, kind: str = "softplus"):
        super().__init__()
        if kind not in TRANSFORMS:
            raise FewshotError(f"unknown covariance transform {kind!r}; choose from {', '.join(TRANSFORMS)}")
        self.kind = kind
        if kind == "learned":
            self.offset = nn.Parameter(torch.tensor(1.0))
            self.scale = nn.Parameter(torch.tensor(1.0))
            self.div = nn.Parameter(torch.tensor(1.0))

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        if self.kind == "softplus":
            return 1 + F.softplus(raw)
        if self.kind == "sigmoid":
            return 1 + torch.sigmoid(raw)
        if self.kind == "sigmoid4":
            return 1 + 4 * torch.sigmoid(raw)
        return self.offset + self.scale * F.softplus(raw / self.div)


def gaussian_prototypes(z: torch.Tensor, s: torch.Tensor, y: torch.Tensor, ways: int) -> tuple:
    """Precision-weighted prototypes and class inverse covariances.

    ``z`` ``[B, S, D]`` support embeddings, ``s`` ``[B, S, D]`` or ``[B, S, 1]`` their inverse covariances,
    ``y`` ``[B, S]`` labels in ``0..ways-1`` -> ``(p [B, ways, D], S [B, ways, D or 1])`` with
    p_c = sum_i s_i x_i / sum_i s_i and S_c = sum_i s_i over the class's support.
    """
    onehot = F.one_hot(y, ways).to(z.dtype).transpose(1, 2)       # [B, N, S]
    if bool((onehot.sum(-1) == 0).any()):
        raise FewshotError("every class of a task needs at least one support example")
    S = onehot @ s                                                 # [B, N, D or 1]
    p = (onehot @ (s * z)) / S                                     # [B, N, D]
    return p, S


def gaussian_distance(q: torch.Tensor, p: torch.Tensor, S: torch.Tensor, squared: bool = False) -> torch.Tensor:
    """d_c(q) = sqrt(sum_j S_cj (q_j - p_cj)^2) for queries ``[B, M, D]``, prototypes ``[B, N, D]`` and
    class inverse covariances ``[B, N, D]`` (or ``[B, N, 1]``) -> ``[B, M, N]`` (squared if asked)."""
    S = S.expand_as(p)
    # sum_j S q^2 - 2 sum_j S p q + sum_j S p^2, each a batched matrix product
    d2 = (q.pow(2) @ S.transpose(1, 2) - 2 * q @ (S * p).transpose(1, 2)
          + (S * p.pow(2)).sum(-1).unsqueeze(1)).clamp_min(0)
    return d2 if squared else d2.clamp_min(1e-12).sqrt()


@register("gaussian")
class GaussianProtoNet(Method):
    """Gaussian prototypical network: precision-weighted prototypes and a class-dependent metric (Fort 2017)."""

    @dataclass
    class Config(BackboneOptions):
        #: conv4 for images, mlp for vectors; any other backbone (a name, package.module:factory,
        #: file.py:factory, timm:NAME) must give embedding + 1 (radius) or 2 x embedding (diagonal) outputs
        backbone: str = "auto"
        hidden: int = 64                #: channels of the first three conv layers
        embedding: int = 64             #: D: embedding channels of the last conv layer (mlp: output size)
        mlp_hidden: List[int] = field(default_factory=lambda: [256, 256])  #: mlp hidden sizes
        covariance: str = "radius"      #: radius (1 number per image) | diagonal (D numbers)
        transform: str = "softplus"     #: softplus | sigmoid | sigmoid4 | learned (raw -> inverse covariance)
        batch_norm: bool = False        #: Fort's encoder has none
        squared: bool = False           #: logits -d^2 instead of Fort's -d

    def __init__(self, config: "GaussianProtoNet.Config", in_shape):
        super().__init__(config, in_shape)
        if config.covariance not in COVARIANCES:
            raise FewshotError(f"unknown covariance {config.covariance!r}; choose from {', '.join(COVARIANCES)}")
        if config.embedding < 1:
            raise FewshotError(f"embedding must be at least 1, got {config.embedding}")
        self.transform = InverseCovariance(config.transform)
        cov = 1 if config.covariance == "radius" else config.embedding
        def own(kind):
            if kind == "auto":
                kind = "conv4" if len(self.in_shape) == 3 else "mlp"
            if kind == "conv4":
                if len(self.in_shape) != 3:
                    raise FewshotError(f"conv4 needs image inputs (C, H, W), got shape {self.in_shape}")
                if min(self.in_shape[1:]) < 16:
                    raise FewshotError(f"conv4 needs images of at least 16x16 pixels, got "
                                       f"{self.in_shape[1]}x{self.in_shape[2]}")
                return Conv4(self.in_shape[0], config.hidden, out_channels=config.embedding + cov,
                             flatten=False, batch_norm=config.batch_norm)
            if kind == "mlp":
                return MLP(int(torch.Size(self.in_shape).numel()), tuple(config.mlp_hidden),
                           config.embedding + cov, batch_norm=config.batch_norm)
            return None
        self.backbone = self.make_backbone(own=own)
        if not isinstance(self.backbone, (Conv4, MLP)):
            width = feature_dim(self.backbone, self.in_shape)
            if width != config.embedding + cov:
                fit = width - 1 if config.covariance == "radius" else width / 2
                hint = f" (set --embedding {int(fit)})" if fit >= 1 and fit == int(fit) else ""
                raise FewshotError(f"backbone {config.backbone} gives {width} features; gaussian with covariance "
                                   f"{config.covariance} needs embedding + {cov} = {config.embedding + cov}{hint}")

    # ---- encoder: embedding and inverse covariance
    def encode(self, x: torch.Tensor) -> tuple:
        """``(z [M, D'], s [M, D' or 1])`` for inputs ``[M, ...]`` (D' = D times the final map's area)."""
        out = self.backbone(x)
        D = self.config.embedding
        if out.dim() == 4:                                      # conv map [M, D + c, h, w]
            z = out[:, :D].flatten(1)
            raw = out[:, D:]
            raw = raw.mean((1, 2, 3)).unsqueeze(1) if self.config.covariance == "radius" else raw.flatten(1)
        else:
            z, raw = out[:, :D], out[:, D:]
        return z, self.transform(raw.float())

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x)[0]

    def _logits(self, zs, ss, ys, zq, ways):
        with torch.autocast(zs.device.type, enabled=False):
            p, S = gaussian_prototypes(zs.float(), ss.float(), ys, ways)
            return -gaussian_distance(zq.float(), p, S, squared=self.config.squared)

    def predict(self, support_x, support_y, query_x, ways=None):
        ways = infer_ways(support_y, ways)
        B, S, Q = support_x.shape[0], support_x.shape[1], query_x.shape[1]
        z, s = self.encode(torch.cat([support_x.flatten(0, 1), query_x.flatten(0, 1)]))
        zs, ss = z[:B * S].view(B, S, -1), s[:B * S].view(B, S, -1)
        zq = z[B * S:].view(B, Q, -1)
        return self._logits(zs, ss, support_y, zq, ways)

    def loss(self, episode):
        logits = self.predict(episode.support_x, episode.support_y, episode.query_x, episode.ways)
        loss = F.cross_entropy(logits.flatten(0, 1), episode.query_y.flatten())
        return loss, {"ce": float(loss.detach()), "acc": float(accuracy(logits.detach(), episode.query_y).mean())}
